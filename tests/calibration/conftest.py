"""Fixtures for calibration: simulators, a scripted OpenAI-compatible server, a private cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router_service.simulator import SimulatorServer
from router_service.simulator.server import bind_socket, url_for


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Embedding caches (tollway eval) go to the test's own directory, never to ~/.cache."""
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def start_simulator(start_simulator: Callable[..., SimulatorServer]) -> Callable[..., SimulatorServer]:
    """The root fixture at speedup 200 unless given: calibration runs sweep many answers."""

    def start(model: str, **fields: object) -> SimulatorServer:
        fields.setdefault("speedup", 200.0)
        return start_simulator(model, **fields)

    return start


def chat_reply(content: str | None, usage: tuple[int, int] | None = (10, 2)) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "scripted",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


@dataclass
class ScriptedServer:
    """An OpenAI-compatible server answering from a script: each entry is (status, JSON body), used in
    order (the last one repeats). It records every request's headers and body."""

    script: list[tuple[int, dict[str, Any]]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            self.requests.append(await request.json())
            self.headers.append(dict(request.headers))
            status, body = self.script[min(len(self.requests), len(self.script)) - 1]
            return JSONResponse(body, status_code=status)

        return app

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@pytest.fixture
def scripted_server() -> Iterator[Callable[[list[tuple[int, dict[str, Any]]]], ScriptedServer]]:
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(script: list[tuple[int, dict[str, Any]]]) -> ScriptedServer:
        scripted = ScriptedServer(script)
        sock = bind_socket("127.0.0.1", 0)
        scripted.url = url_for("127.0.0.1", sock.getsockname()[1])
        server = uvicorn.Server(uvicorn.Config(scripted.app(), log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "scripted server did not start"
            time.sleep(0.01)
        running.append((server, thread))
        return scripted

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)
