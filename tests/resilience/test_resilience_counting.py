"""The fault benchmark counts how a stream ended the way a client sees it."""

from __future__ import annotations

import asyncio
import json
from types import ModuleType

import httpx


def _outcome(bench: ModuleType, body: bytes):
    common = bench.send_chat.__globals__  # benchmarks/common.py as faults.py imported it

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await common["send_chat"](
                client, "http://r", model="auto", prompt="x", max_tokens=4, stream=True
            )

    return asyncio.run(run())


def test_a_stream_ended_by_an_error_event_is_a_clear_error_not_a_cut(bench: ModuleType) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    first = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    error = (
        b'data: {"error": {"message": "Upstream strong failed mid-stream.", "code": "upstream_error"}}\n\n'
    )
    assert bench.classify(_outcome(bench, first + error)) == "clear-error"  # no [DONE] after it
    assert bench.classify(_outcome(bench, first)) == "truncated"  # neither [DONE] nor an error
    assert bench.classify(_outcome(bench, first + b"data: [DONE]\n\n")) == "ok"
