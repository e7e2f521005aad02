"""Step 6 of the request path, forward: send the request to the chosen replica and relay its answer.

`forward` returns once the backend has shown it is answering: for a stream, its response headers
and first whole event within `first_byte` seconds; for a plain answer, the whole of it within the
attempt's total time (servers send its headers only when it is complete; a hung endpoint is left
when its circuit breaker opens, see pipeline.py). Anything that goes wrong before that (connect
error, no first byte in time, 5xx, 429, a broken body) raises `UpstreamFailure` with the attempt
abandoned, so the caller may retry on another model.

A stream is relayed by `Relay` whole event by whole event, so whatever ends it, the client's SSE
parser is never left inside a half-sent event and any error event the router adds is read as one:
the backend failing or ending early, the attempt running past its total time, or the router
shutting down (`Relay.stop`) all end with an OpenAI-shaped error event, which OpenAI clients raise
as `APIError`. A client that stops reading for `client_stall` seconds is dropped; one that leaves
is noticed at once. Either way the relay settles the attempt (in-flight slot freed, reservation
charged with the usage seen) and closes the backend's stream.

The router asks a streaming backend for `stream_options.include_usage`, so every stream is charged
its true usage, and leaves the usage-only final event out when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, MutableSet
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
from starlette.responses import Response

from router_service.proxy import openai_errors as errors
from router_service.proxy.attempt import Attempt
from router_service.proxy.request import ParsedRequest
from router_service.proxy.upstream import (
    TRANSPORT_ERRORS,
    Backend,
    SseEvents,
    SseUsage,
    UpstreamFailure,
    open_upstream,
    response_headers,
    usage_from_body,
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The limits of one attempt, in seconds."""

    first_byte: float  # response headers (and a stream's first event)
    total: float  # the whole answer
    client_stall: float  # a streaming client that reads nothing for this long is dropped


def upstream_body(parsed: ParsedRequest, backend: Backend, ceiling: int | None = None) -> bytes:
    """The body the backend gets: the client's bytes untouched when nothing needs changing, else the
    payload with `model` rewritten, `stream_options.include_usage` asked for a stream (the router
    charges true usage), and the router's max_tokens `ceiling` set (in every limit field the client
    used, else the API's own)."""
    payload = parsed.payload
    changes: dict[str, Any] = {}
    if parsed.model != backend.upstream_model:
        changes["model"] = backend.upstream_model
    if parsed.stream and not parsed.usage_requested:
        options = payload.get("stream_options")
        changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if ceiling is not None:
        fields = [f for f in ("max_completion_tokens", "max_tokens") if payload.get(f) is not None]
        for name in fields or ["max_completion_tokens" if "messages" in payload else "max_tokens"]:
            changes[name] = ceiling
    if not changes:
        return parsed.raw
    return json.dumps({**payload, **changes}, separators=(",", ":"), ensure_ascii=False).encode()


async def forward(
    session: aiohttp.ClientSession,
    backend: Backend,
    endpoint: str,
    path: str,
    parsed: ParsedRequest,
    attempt: Attempt,
    *,
    extra_headers: dict[str, str],
    out_headers: dict[str, str],
    timeouts: Timeouts,
    prompt_tokens: int,
    ceiling: int | None = None,
    streams: MutableSet[Relay] | None = None,
) -> Response:
    """One upstream call to `endpoint`, a replica of `backend`. Raises UpstreamFailure (attempt
    abandoned) before the client saw anything. `streams`, when given, holds every relay while it is
    open (the router stops them on shutdown)."""
    model = backend.name
    deadline = time.monotonic() + timeouts.total
    body = upstream_body(parsed, backend, ceiling)
    # A stream's headers and first event come at once; a non-streamed answer's headers only when it
    # is complete (vLLM), so it gets the total time (a hung endpoint is caught by its breaker).
    header_limit = min(timeouts.first_byte, timeouts.total) if parsed.stream else timeouts.total
    try:
        async with asyncio.timeout(header_limit):
            response = await open_upstream(session, backend, endpoint, path, body, extra_headers)
    except TimeoutError:
        attempt.abandon("timeout")
        raise UpstreamFailure("timeout", f"{model}: no response within {header_limit:g} s") from None
    except UpstreamFailure as exc:
        attempt.abandon(exc.kind, "neutral" if exc.status == 429 else "failure")
        raise
    except BaseException:
        attempt.settle(None, "cancelled", "neutral", consumed=False)
        raise
    headers = {**response_headers(response), **out_headers}
    is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
    if parsed.stream and is_sse and response.status == 200:
        relay = Relay(
            response,
            attempt,
            headers,
            model=model,
            timeouts=timeouts,
            deadline=deadline,
            prompt_tokens=prompt_tokens,
            usage_requested=parsed.usage_requested,
            registry=streams,
        )
        await relay.first_event(min(timeouts.first_byte, timeouts.total))
        attempt.first_byte()
        return relay

    attempt.first_byte()
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            content = await response.read()
    except (*TRANSPORT_ERRORS, TimeoutError) as exc:
        timed_out = isinstance(exc, TimeoutError)
        attempt.abandon("timeout" if timed_out else "protocol")
        kind = "timeout" if timed_out else "protocol"
        raise UpstreamFailure(kind, f"{model}: response body failed ({type(exc).__name__})") from exc
    except BaseException:
        attempt.settle(None, "cancelled", "neutral", consumed=False)
        raise
    finally:
        response.release()
    if response.status >= 400:
        attempt.settle(None, "client_error", consumed=False)
    else:
        attempt.settle(usage_from_body(content), "ok")
    return Response(content=content, status_code=response.status, headers=headers)


class _Stopped(Exception):
    """`Relay.stop` cut a read short."""


class Relay(Response):
    """A backend's SSE answer relayed to the client whole event by whole event (see the module doc).

    A plain ASGI response rather than Starlette's StreamingResponse: it needs to own the reads
    from the backend (their deadline, and a cancel scope `stop` can cancel) and the writes to the
    client (a stall limit), and to end every way with a whole error event.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        attempt: Attempt,
        headers: dict[str, str],
        *,
        model: str,
        timeouts: Timeouts,
        deadline: float,
        prompt_tokens: int,
        usage_requested: bool,
        registry: MutableSet[Relay] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        headers.setdefault("cache-control", "no-cache")
        headers["x-accel-buffering"] = "no"
        self.init_headers(headers)
        self.model = model
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.content.iter_any()
        self._attempt = attempt
        self._timeouts = timeouts
        self._deadline = deadline
        self._prompt_tokens = prompt_tokens
        self._usage_requested = usage_requested
        self._events = SseEvents()
        self.watcher = SseUsage()
        self._ready: list[bytes] = []  # whole events read before the response started
        self._ended = False  # the backend's stream ended (normally or not)
        self._read_scope: anyio.CancelScope | None = None
        self._scope: anyio.CancelScope | None = None  # the whole relay (client gone or stalled)
        self._sending_since: float | None = None  # when the write in progress began
        self._stall_timer: asyncio.TimerHandle | None = None
        self.stop_reason: str | None = None
        self.outcome = "ok"
        self._complete = False  # the last byte of the response was sent
        self._registry = registry
        if registry is not None:
            registry.add(self)

    # --- reading from the backend ---------------------------------------------------------------

    async def _next_chunk(self, limit: float) -> bytes | None:
        """The backend's next chunk, None when its stream ended. Raises TimeoutError past `limit`
        seconds and _Stopped when `stop` cut the wait short."""
        if self.stop_reason is not None:
            raise _Stopped
        scope = anyio.CancelScope(deadline=anyio.current_time() + max(0.0, limit))
        self._read_scope = scope
        try:
            with scope:
                try:
                    return await anext(self._chunks)
                except StopAsyncIteration:
                    return None
        finally:
            self._read_scope = None
        if self.stop_reason is not None:
            raise _Stopped
        raise TimeoutError

    async def first_event(self, limit: float) -> None:
        """Read until the first whole event; UpstreamFailure (attempt abandoned) when none comes in
        `limit` seconds or the stream fails first. Nothing has reached the client yet."""
        started = time.monotonic()
        try:
            while not self._ready:
                chunk = await self._next_chunk(limit - (time.monotonic() - started))
                if chunk is None:
                    raise UpstreamFailure(
                        "protocol", f"{self.model}: the stream ended before its first event"
                    )
                self._ready.extend(self._events.feed(chunk))
        except (TimeoutError, _Stopped):
            self._abandon("timeout")
            raise UpstreamFailure(
                "timeout", f"{self.model}: no first event within the {limit:g} s first-byte limit"
            ) from None
        except TRANSPORT_ERRORS as exc:
            self._abandon("protocol")
            raise UpstreamFailure(
                "protocol", f"{self.model}: stream failed before its first event ({exc!r})"
            ) from exc
        except UpstreamFailure:
            self._abandon("protocol")
            raise
        except BaseException:
            self._attempt.settle(None, "cancelled", "neutral", consumed=False)
            self._unregister()
            self._response.close()
            raise

    def _abandon(self, kind: str) -> None:
        self._attempt.abandon(kind)
        self._unregister()
        self._response.close()

    def _unregister(self) -> None:
        if self._registry is not None:
            self._registry.discard(self)

    def stop(self, reason: str) -> None:
        """End the stream early (the router is shutting down): the relay sends an error event and
        finishes the response; a read in progress is cut short."""
        self.stop_reason = reason
        if self._read_scope is not None:
            self._read_scope.cancel()

    # --- writing to the client ------------------------------------------------------------------

    async def _send(self, send: Any, message: dict[str, Any]) -> None:
        self._sending_since = time.monotonic()
        await send(message)
        self._sending_since = None

    def _watch_stall(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        """A timer callback, every `period` seconds: a write to the client pending for
        `client_stall` seconds ends the relay (one timer per stream, none per write)."""
        since = self._sending_since
        if since is not None and time.monotonic() - since >= self._timeouts.client_stall:
            self.outcome = "client_stalled"
            if self._scope is not None:
                self._scope.cancel()
            return
        self._stall_timer = loop.call_later(period, self._watch_stall, loop, period)

    async def _send_events(self, send: Any, events: list[bytes]) -> None:
        out = [e for e in events if not self.watcher.event(e) or self._usage_requested]
        if out:
            await self._send(send, {"type": "http.response.body", "body": b"".join(out), "more_body": True})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        period = min(1.0, self._timeouts.client_stall / 4)
        try:
            async with anyio.create_task_group() as group:
                self._scope = group.cancel_scope

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self._complete:  # servers report a disconnect after a complete response too
                        self.outcome = "cancelled"
                        group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                self._stall_timer = loop.call_later(period, self._watch_stall, loop, period)
                await self._pump(send)
                group.cancel_scope.cancel()
        finally:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            self._settle()  # a relay cut short (client gone or stalled); else already settled

    async def _pump(self, send: Any) -> None:
        """Relay until the backend's stream ends, fails, passes the attempt's deadline, or `stop`
        cuts it short; then the error event that says which (if any) and the end of the response.
        One cancel scope covers the whole relay (the deadline, `stop`), none per chunk."""
        await self._send(send, {"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        ready, self._ready = self._ready, []
        await self._send_events(send, ready)
        error: bytes | None = None
        deadline = anyio.current_time() + max(0.0, self._deadline - time.monotonic())
        with anyio.CancelScope(deadline=deadline) as relay:
            self._read_scope = relay
            if self.stop_reason is not None:
                relay.cancel()
            try:
                async for chunk in self._chunks:
                    await self._send_events(send, self._events.feed(chunk))
                self._ended = True
                if self.watcher.errored:
                    self.outcome = "midstream_error"  # the backend sent its own error event
                elif not self.watcher.done:
                    self.outcome = "midstream_error"
                    error = errors.sse_error_event(
                        f"Upstream {self.model} ended the stream early.", "server_error", "upstream_error"
                    )
            except TRANSPORT_ERRORS as exc:
                self.outcome = "midstream_error"
                error = errors.sse_error_event(
                    f"Upstream {self.model} failed mid-stream ({type(exc).__name__}).",
                    "server_error",
                    "upstream_error",
                )
        self._read_scope = None
        if self.stop_reason is not None:
            self.outcome = self.stop_reason
            error = errors.sse_error_event(
                "The router is shutting down; the stream ended before the answer was complete. Retry.",
                "server_error",
                "router_shutdown",
            )
        elif relay.cancelled_caught:
            self.outcome = "timeout"
            error = errors.sse_error_event(
                f"Upstream {self.model} exceeded the {self._timeouts.total:g} s limit; stream ended.",
                "server_error",
                "upstream_timeout",
            )
        # The backend's part is over: charge it before the client sees the end, so that what the
        # client does next (another request, a look at the budgets) meets a settled ledger.
        self._settle()
        if error is not None:
            await self._send(send, {"type": "http.response.body", "body": error, "more_body": True})
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        self._complete = True

    def _settle(self) -> None:
        """Settle the attempt with the usage seen and close the backend's stream (once)."""
        self._unregister()
        if self._attempt.ended:
            return
        health = "failure" if self.outcome == "midstream_error" else "success"
        self._attempt.settle(self.watcher.usage(self._prompt_tokens), self.outcome, health)
        if self._ended:
            self._response.release()  # read to its end: the connection goes back to the pool
        else:
            self._response.close()
