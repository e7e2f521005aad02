"""The model pods' preStop hook: it waits for the server's in-flight requests before the kubelet's
SIGTERM (which makes vLLM cancel them), and no longer than the router would wait for them.

The hook's command is run as the pod would run it, against a `tollway simulate` server, which
reports vLLM's `vllm:num_requests_running` / `vllm:num_requests_waiting`."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from router_service.simulator import SimulatorProfile, SimulatorServer
from tollway_operator.desired.modelpod import drain_command
from tollway_operator.desired.names import VLLM_PORT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def slow_server() -> Iterator[SimulatorServer]:
    profile = SimulatorProfile(model="m", decode_tokens_per_second=20.0, ttft_ms=0)
    with SimulatorServer(profile) as server:
        yield server


def drain(port: int, limit: float = 30) -> float:
    """Run the hook (settle 0 s); the seconds it took."""
    started = time.monotonic()
    subprocess.run(drain_command(settle=0, limit=limit, port=port), check=True, timeout=limit + 10)
    return time.monotonic() - started


def test_the_default_hook_settles_then_waits_for_the_router_timeout_on_port_8000() -> None:
    command = drain_command()
    assert command[-3:] == ["10", "120", str(VLLM_PORT)]


def test_waits_until_in_flight_requests_finish(slow_server: SimulatorServer) -> None:
    finished: list[float] = []

    def request() -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 40,
            "ignore_eos": True,
        }
        httpx.post(f"{slow_server.url}/v1/chat/completions", json=body, timeout=30).raise_for_status()
        finished.append(time.monotonic())

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(0.3)  # the request is decoding: 40 tokens at 20 tokens/s
    drain(slow_server.port)
    drained_at = time.monotonic()
    worker.join(timeout=30)
    assert finished and finished[0] <= drained_at, "the hook returned while a request was still running"


def test_an_idle_server_is_left_at_once(slow_server: SimulatorServer) -> None:
    assert drain(slow_server.port) < 3


def test_gives_up_after_the_limit(slow_server: SimulatorServer) -> None:
    def request() -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
            "ignore_eos": True,
        }
        httpx.post(f"{slow_server.url}/v1/chat/completions", json=body, timeout=60)

    threading.Thread(target=request, daemon=True).start()
    time.sleep(0.3)
    took = drain(slow_server.port, limit=1.5)
    assert 1.2 < took < 6


def test_a_server_that_is_gone_is_not_waited_for() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert drain(port) < 3
