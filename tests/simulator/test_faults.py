"""Fault injection: errors, hangs, dropped connections, slowdown, unhealthy, via flags and /admin/faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from router_service.simulator import FaultSettings, SimulatorServer
from router_service.simulator.faults import FaultInjector

MESSAGES = [{"role": "user", "content": "hello"}]


def client(sim: SimulatorServer, timeout: float = 10) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=timeout)


def test_error_rate_one_answers_500_in_openai_shape(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(faults=FaultSettings(error_rate=1.0))
    with pytest.raises(openai.InternalServerError) as info:
        client(sim).chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=3)
    body = info.value.response.json()
    assert body["error"]["code"] == 500 and body["error"]["type"] == "InternalServerError"
    assert "Injected fault" in body["error"]["message"]
    # /health, /metrics and /v1/models are unaffected.
    assert httpx.get(f"{sim.url}/health").status_code == 200
    assert httpx.get(f"{sim.base_url}/models").status_code == 200


def test_error_rate_is_a_seeded_fraction() -> None:
    injector = FaultInjector(FaultSettings(error_rate=0.3), seed=4)
    draws = [injector.should_fail() for _ in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    again = FaultInjector(FaultSettings(error_rate=0.3), seed=4)
    assert [again.should_fail() for _ in range(2000)] == draws


def test_admin_endpoint_sets_status_and_clears(simulator: SimulatorServer) -> None:
    try:
        r = httpx.post(f"{simulator.url}/admin/faults", json={"error_rate": 1.0, "error_status": 503})
        assert r.status_code == 200 and r.json()["error_rate"] == 1.0 and r.json()["hang"] is False
        failing = httpx.post(
            f"{simulator.base_url}/completions", json={"model": "sim-small", "prompt": "x", "max_tokens": 2}
        )
        assert failing.status_code == 503 and failing.json()["error"]["type"] == "ServiceUnavailableError"
        assert httpx.get(f"{simulator.url}/admin/faults").json()["error_status"] == 503
    finally:
        assert httpx.delete(f"{simulator.url}/admin/faults").json() == FaultSettings().model_dump()
    ok = httpx.post(
        f"{simulator.base_url}/completions", json={"model": "sim-small", "prompt": "x", "max_tokens": 2}
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"error_rate": 2}, "error_rate"),
        ({"hangs": True}, "hangs"),
        ({"die_after_tokens": -1}, "die_after_tokens"),
    ],
)
def test_admin_endpoint_rejects_bad_settings(
    simulator: SimulatorServer, payload: dict, fragment: str
) -> None:
    r = httpx.post(f"{simulator.url}/admin/faults", json=payload)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]
    assert httpx.get(f"{simulator.url}/admin/faults").json() == FaultSettings().model_dump()


def test_hang_blocks_until_released(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator()
    sim.set_faults(hang=True)
    with pytest.raises(openai.APITimeoutError):
        client(sim, timeout=0.3).chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=3)
    assert sim.state()["num_requests_waiting"] == 0  # the hung request never reached the engine
    sim.set_faults(hang=False)
    r = client(sim).chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_release_lets_hung_request_finish(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(faults=FaultSettings(hang=True))
    results: list[int] = []

    def call() -> None:
        r = client(sim).completions.create(model="sim-small", prompt="wait", max_tokens=4)
        results.append(r.usage.completion_tokens if r.usage else -1)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.2)
    assert results == []
    sim.clear_faults()
    worker.join(timeout=10)
    assert results == [4]


def test_die_after_tokens_breaks_stream_without_done(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(faults=FaultSettings(die_after_tokens=5))
    received = []
    stream = client(sim).chat.completions.create(
        model="sim-small", messages=MESSAGES, max_tokens=50, stream=True
    )
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 5
    with (
        httpx.stream(
            "POST",
            f"{sim.base_url}/completions",
            json={"model": "sim-small", "prompt": "x", "max_tokens": 50, "stream": True},
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        response.read()
    assert sim.state()["num_requests_running"] == 0  # the dropped request was aborted


def test_die_after_tokens_cuts_non_streamed_answer(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(faults=FaultSettings(die_after_tokens=3))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(
            f"{sim.base_url}/completions", json={"model": "sim-small", "prompt": "x", "max_tokens": 50}
        )
    assert sim.state()["num_requests_running"] == 0


def test_slowdown_makes_requests_slower(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(speedup=10.0)
    c = client(sim)

    def timed() -> float:
        start = time.perf_counter()
        c.completions.create(model="sim-small", prompt="x", max_tokens=30)
        return time.perf_counter() - start

    normal = min(timed() for _ in range(2))
    sim.set_faults(slowdown=4.0)
    slow = timed()
    assert slow > 2.5 * normal  # 30 tokens at 60 tok/s: 0.05 s wall, then 0.2 s


def test_unhealthy_health_is_503(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(faults=FaultSettings(unhealthy=True))
    assert httpx.get(f"{sim.url}/health").status_code == 503
    sim.set_faults(unhealthy=False)
    assert httpx.get(f"{sim.url}/health").status_code == 200
