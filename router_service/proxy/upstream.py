"""Talking to backends: failure classification, usage accounting.

`open_upstream` sends a request to one endpoint of a backend (over that endpoint's pool, see
`connections.py`) and returns as soon as the response headers arrive (the body is not read), or
raises `UpstreamFailure` saying whether the failure happened before the first byte and may be
retried elsewhere (connect error, timeout, 5xx, 429). Streaming bodies are then
cut into whole server-sent events by `SseEvents` (a client never gets half an event) and relayed
while `SseUsage` watches them go by: it takes the `usage` object when the backend sends one and
otherwise counts the generated tokens (one content delta per token, as vLLM emits them).
Response headers reach the client only when an OpenAI client needs them (`response_headers`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from router_service.config import BackendConfig

# The backend's response headers that reach the client: what an OpenAI client reads. Everything
# else (cookies, CORS grants, servers' and proxies' internal headers, hop-by-hop headers) stays here.
PASSED_RESPONSE_HEADERS = frozenset({"content-type", "cache-control", "retry-after"})
_MAX_ERROR_BODY = 4096
_MAX_SSE_LINE = 1 << 20

TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)
"""What a broken connection or a malformed response raises while a body is read."""


@dataclass(frozen=True)
class Backend:
    """A backend as the request path needs it (resolved once per config load). Where its replicas
    are is the load tracker's business (endpoints change between config loads)."""

    name: str
    upstream_model: str
    capabilities: frozenset[str]
    headers: CIMultiDict[str]
    config: BackendConfig

    @classmethod
    def from_config(cls, b: BackendConfig) -> Backend:
        headers = CIMultiDict({"content-type": "application/json", "accept-encoding": "identity"})
        if b.api_key_env:
            key = os.environ.get(b.api_key_env)
            if not key:
                raise ValueError(
                    f"backends[{b.name}].apiKeyEnv: environment variable {b.api_key_env!r} is not set"
                )
            headers["authorization"] = f"Bearer {key}"
        return cls(
            name=b.name,
            upstream_model=b.upstream_model or b.name,
            capabilities=frozenset(b.capabilities),
            headers=headers,
            config=b,
        )


class UpstreamFailure(Exception):
    """The backend did not give a usable answer before the first byte."""

    def __init__(self, kind: str, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | status | protocol
        self.status = status
        self.body = body
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in {"connect", "timeout", "protocol"} or (
            self.status is not None and (self.status >= 500 or self.status == 429)
        )


async def open_upstream(
    session: aiohttp.ClientSession,
    backend: Backend,
    endpoint: str,
    path: str,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """POST `body` to `endpoint` (a replica of `backend`); returns once headers arrive with status
    < 500 (and not 429).

    The response body is left unread (the caller streams or reads it and must release it). A 4xx
    other than 429 is returned as is: the client's request is at fault, another model would
    refuse it as well.
    """
    headers = backend.headers
    if extra_headers:
        headers = headers.copy()
        headers.update(extra_headers)
    try:
        response = await session.post(endpoint + path, data=body, headers=headers, allow_redirects=False)
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamFailure(
            "timeout", f"{backend.name}: timed out before the first byte ({type(exc).__name__})"
        ) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamFailure("protocol", f"{backend.name}: broken response ({exc!r})") from exc
    except TRANSPORT_ERRORS as exc:
        raise UpstreamFailure(
            "connect", f"{backend.name}: cannot connect ({exc or type(exc).__name__})"
        ) from exc
    if response.status >= 500 or response.status == 429:
        try:
            err_body = await _read_capped(response, _MAX_ERROR_BODY)
        except TRANSPORT_ERRORS:
            err_body = b""
        finally:
            response.close()
        raise UpstreamFailure(
            "status",
            f"{backend.name}: answered {response.status}{': ' + _error_message(err_body) if err_body else ''}",
            status=response.status,
            body=err_body,
        )
    return response


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    out = bytearray()
    async for chunk in response.content.iter_any():
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                return err["message"][:300]
            if isinstance(data.get("message"), str):
                return data["message"][:300]
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace")


def response_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    """Backend headers worth passing to the client (`PASSED_RESPONSE_HEADERS`)."""
    return {k.lower(): v for k, v in response.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}


# --- usage ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reported: bool  # False: counted or estimated by the router

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_obj(obj: object) -> Usage | None:
    """The `usage` object of an OpenAI response (chat, completions, embeddings)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    total = usage.get("total_tokens")
    if not isinstance(prompt, int):
        if isinstance(total, int):
            return Usage(0, total, True)
        return None
    if not isinstance(completion, int):
        completion = (total - prompt) if isinstance(total, int) else 0
    return Usage(prompt, max(0, completion), True)


def usage_from_body(body: bytes) -> Usage | None:
    try:
        return usage_from_obj(json.loads(body))
    except ValueError:
        return None


_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
_CONTENT_RE = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')
_EVENT_END_RE = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseEvents:
    """Cuts a byte stream into whole server-sent events (each with its blank-line terminator).

    What is left between chunks is the start of an unfinished event; it is never relayed alone, so
    an error event the router adds after a failure is always an event of its own. An unfinished
    event longer than 1 MiB is dropped (and counted in `dropped`).
    """

    __slots__ = ("_buffer", "dropped")

    def __init__(self) -> None:
        self._buffer = b""
        self.dropped = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END_RE.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        rest = data[start:]
        if len(rest) > _MAX_SSE_LINE:
            rest, self.dropped = b"", self.dropped + 1
        self._buffer = rest
        return events

    @property
    def pending(self) -> bool:
        """An event was begun and not finished."""
        return bool(self._buffer.strip())


def _event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


class SseUsage:
    """Watches whole server-sent events of an OpenAI stream without altering them.

    Parses JSON only for the event that carries `usage`, and otherwise counts events with
    non-empty generated text. `event()` says whether an event only carries usage (the final chunk
    of a stream asked for `stream_options.include_usage`), so the relay can leave it out.
    """

    __slots__ = ("counted", "done", "errored", "reported")

    def __init__(self) -> None:
        self.counted = 0
        self.reported: Usage | None = None
        self.done = False
        self.errored = False

    def event(self, event: bytes) -> bool:
        """Take one whole event; True when it carries usage and no choices."""
        payload = _event_data(event)
        if not payload:
            return False
        if payload == b"[DONE]":
            self.done = True
            return False
        if _USAGE_RE.search(payload):
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            usage = usage_from_obj(obj)
            if usage is not None:
                self.reported = usage
            if isinstance(obj, dict) and obj.get("choices"):
                self._count(payload)
                return False
            return usage is not None
        if payload.startswith(b'{"error"'):
            self.errored = True
            return False
        self._count(payload)
        return False

    def _count(self, payload: bytes) -> None:
        self.counted += len(_CONTENT_RE.findall(payload))

    def usage(self, prompt_estimate: int) -> Usage:
        if self.reported is not None:
            return self.reported
        return Usage(prompt_estimate, self.counted, False)
