"""Step 6 of the request path, forward: send the request to the chosen backend and relay its answer.

`forward` returns as soon as the backend's headers arrive. A failure before the client saw a byte
(connect error, timeout, 5xx, 429, a broken body) raises `UpstreamFailure` with the attempt
abandoned, so the caller may retry on another model. A non-streamed answer is read whole and
settled; a stream is relayed chunk by chunk while `SseUsage` counts it, and settled when it ends,
fails (an SSE error event tells the client), runs past the upstream timeout, or the client leaves.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse

from router_service.proxy import openai_errors as errors
from router_service.proxy.attempt import Attempt
from router_service.proxy.request import ParsedRequest
from router_service.proxy.upstream import (
    Backend,
    SseUsage,
    UpstreamFailure,
    Usage,
    open_upstream,
    response_headers,
    usage_from_body,
)


class RelayResponse(StreamingResponse):
    """A streamed response that always runs `on_close`, also when it never started sending."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


def upstream_body(parsed: ParsedRequest, backend: Backend) -> bytes:
    """The body the backend gets: the client's bytes untouched when they already name the backend's
    model, else the payload with `model` rewritten."""
    if parsed.model == backend.upstream_model:
        return parsed.raw
    payload = {**parsed.payload, "model": backend.upstream_model}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


async def forward(
    client: httpx.AsyncClient,
    backend: Backend,
    path: str,
    parsed: ParsedRequest,
    attempt: Attempt,
    *,
    extra_headers: dict[str, str],
    out_headers: dict[str, str],
    upstream_timeout: float,
    prompt_tokens: int,
) -> Response:
    """One upstream call. Raises UpstreamFailure (attempt abandoned) before the client saw anything."""
    model = backend.name
    try:
        response = await open_upstream(client, backend, path, upstream_body(parsed, backend), extra_headers)
    except UpstreamFailure as exc:
        attempt.abandon(exc.kind)
        raise
    except BaseException:
        attempt.settle(None, "cancelled")
        raise
    attempt.first_byte()
    headers = {**response_headers(response), **out_headers}
    is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
    if parsed.stream and is_sse and response.status_code == 200:
        return relay(response, attempt, headers, model, upstream_timeout, prompt_tokens)

    try:
        content = await response.aread()
    except httpx.HTTPError as exc:
        attempt.abandon("protocol")
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "protocol"
        raise UpstreamFailure(kind, f"{model}: response body failed ({type(exc).__name__})") from exc
    except BaseException:
        attempt.settle(None, "cancelled")
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()
    if response.status_code >= 400:
        attempt.settle(None, "client_error")
    else:
        attempt.settle(usage_from_body(content) or Usage(prompt_tokens, 0, False), "ok")
    return Response(content=content, status_code=response.status_code, headers=headers)


def relay(
    response: httpx.Response,
    attempt: Attempt,
    headers: dict[str, str],
    model: str,
    upstream_timeout: float,
    prompt_tokens: int,
) -> RelayResponse:
    """Pass an SSE stream through chunk by chunk; settle it however it ends."""
    deadline = time.monotonic() + upstream_timeout
    watcher = SseUsage()

    async def chunks() -> AsyncIterator[bytes]:
        outcome = "ok"
        try:
            async for chunk in response.aiter_raw():
                watcher.feed(chunk)
                yield chunk
                if time.monotonic() > deadline:
                    outcome = "timeout"
                    yield errors.sse_error_event(
                        f"Upstream {model} exceeded the {upstream_timeout:g} s limit; stream ended.",
                        "server_error",
                        "upstream_timeout",
                    )
                    return
            if watcher.errored:
                outcome = "midstream_error"
            elif not watcher.done:
                outcome = "midstream_error"
                yield errors.sse_error_event(
                    f"Upstream {model} ended the stream early.", "server_error", "upstream_error"
                )
        except httpx.HTTPError as exc:
            outcome = "midstream_error"
            yield errors.sse_error_event(
                f"Upstream {model} failed mid-stream ({type(exc).__name__}).",
                "server_error",
                "upstream_error",
            )
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            attempt.settle(watcher.usage(prompt_tokens), outcome)
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def close() -> None:
        # The client may leave before the body is ever iterated: the relay's own `finally`
        # then never runs, so the response settles here (both paths are idempotent).
        attempt.settle(watcher.usage(prompt_tokens), "cancelled")
        await response.aclose()

    headers.setdefault("cache-control", "no-cache")
    headers["x-accel-buffering"] = "no"
    return RelayResponse(chunks(), close, status_code=200, headers=headers)
