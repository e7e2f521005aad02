"""A misbehaving OpenAI-compatible backend for the reliability tests: a tiny ASGI app served by
uvicorn on 127.0.0.1 on a thread. Its `mode` says how it answers /v1/chat/completions:

- "cut-mid-event": one whole SSE event, then half of the next, then the connection drops;
- "leaky-headers": a normal JSON answer with cookies, CORS and internal headers;
- "slow-stream": an endless stream, one event every `interval` seconds;
- "firehose": an endless stream of large events, as fast as the client takes them;
- "hang": accepts the request and never answers;
- "ok": a well-behaved replica: a plain chat completion after `delay` seconds;
- "error": a 500 in OpenAI's error shape.

`/metrics` answers `metrics` (vLLM's exposition text) with status `metrics_status`, so a test
decides what load the replica reports, or that its scrape fails.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import uvicorn

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def event(content: str, **extra: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "model": "m", **extra}
    obj.setdefault("choices", [{"index": 0, "delta": {"content": content}, "finish_reason": None}])
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeUpstream:
    def __init__(self, mode: str, interval: float = 0.05) -> None:
        self.mode = mode
        self.interval = interval
        self.requests = 0
        self.in_flight = 0
        self.delay = 0.0
        self.metrics = ""
        self.metrics_status = 200
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, interface="asgi3", log_level="critical", lifespan="off", timeout_graceful_shutdown=1
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics":
            await send({"type": "http.response.start", "status": self.metrics_status, "headers": []})
            await send({"type": "http.response.body", "body": self.metrics.encode()})
            return
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        self.in_flight += 1
        try:
            await self._answer(send)
        finally:
            self.in_flight -= 1

    async def _answer(self, send: Any) -> None:
        sse = [(b"content-type", b"text/event-stream")]
        if self.mode == "ok":
            await asyncio.sleep(self.delay)
            body = json.dumps(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE,
                }
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
        elif self.mode == "error":
            body = json.dumps({"error": {"message": "engine failed", "type": "server_error"}}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif self.mode == "hang":
            await asyncio.sleep(3600)
        elif self.mode == "leaky-headers":
            body = json.dumps({"id": "c1", "object": "chat.completion", "choices": [], "usage": USAGE})
            headers = [
                (b"content-type", b"application/json"),
                (b"set-cookie", b"session=secret; Path=/"),
                (b"access-control-allow-origin", b"*"),
                (b"x-internal-node", b"gpu-17.internal"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})
        elif self.mode == "cut-mid-event":
            await send({"type": "http.response.start", "status": 200, "headers": sse})
            await send({"type": "http.response.body", "body": event("Hello"), "more_body": True})
            await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": event(" world")[:30], "more_body": True})
            await asyncio.sleep(0.05)
            raise RuntimeError("backend crashed mid-event")  # uvicorn drops the connection
        elif self.mode in ("slow-stream", "firehose"):
            await send({"type": "http.response.start", "status": 200, "headers": sse})
            chunk = event("x" * (16384 if self.mode == "firehose" else 1))
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(self.interval if self.mode == "slow-stream" else 0)

    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="fake-upstream"
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
