"""Failures a reliability probe found in the router (issue 17), each reproduced end to end: streams
cut mid-event, shutdown with streams open, hung and failing backends, bursts, slow and stalled
clients, leaky headers, and capabilities no model serves. Backends are the simulators or
`fake_upstream.FakeUpstream`; clients are the official `openai` package or raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from router_helpers import FixedEngine, router_config, wait_until

from router_service.proxy.server import BackgroundRouter, configure_logging
from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import SimulatorServer

MSG = [{"role": "user", "content": "Write a Python function that reverses a list."}]


def client(router: BackgroundRouter, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url, api_key="unused", max_retries=0, **kw)


@pytest.fixture
def fake() -> Iterator[list[FakeUpstream]]:
    started: list[FakeUpstream] = []
    yield started
    for upstream in started:
        upstream.stop()


def fake_router(start_router, fake, mode: str, *, pinned: str = "small", **overrides) -> BackgroundRouter:
    """A router whose `pinned` backend is a FakeUpstream in `mode` (the others: closed ports)."""
    upstream = FakeUpstream(mode).start()
    fake.append(upstream)
    urls = {"small": "http://127.0.0.1:9", "medium": "http://127.0.0.1:9", "large": "http://127.0.0.1:9"}
    urls[pinned] = upstream.url
    return start_router(router_config(urls, **overrides), engine=FixedEngine([pinned, "medium", "large"]))


# --- stream endings a client library understands ----------------------------------------------------


def test_a_stream_cut_mid_event_raises_api_error_in_the_openai_client(start_router, fake) -> None:
    router = fake_router(start_router, fake, "cut-mid-event")
    stream = client(router).chat.completions.create(model="small", messages=MSG, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:  # not json.JSONDecodeError: no half event reaches it
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert received == ["Hello"] and "failed mid-stream" in info.value.message
    wait_until(lambda: router.runtime.load.in_flight("small") == 0)


def test_shutdown_sends_every_open_stream_an_error_event_and_readyz_answers_503(clean_sims) -> None:
    sims = clean_sims
    cfg = router_config({n: s.url for n, s in sims.items()}, server={"drainSeconds": 1.5})
    router = BackgroundRouter(cfg, engine=FixedEngine(["small", "medium", "large"])).start()
    sims["small"].set_faults(slowdown=400)  # streams that outlive the drain
    outcomes: list[str] = []

    def read_stream() -> None:
        stream = client(router).chat.completions.create(model="auto", messages=MSG, stream=True)
        try:
            for _ in stream:
                pass
            outcomes.append("completed")
        except openai.APIError as exc:
            outcomes.append(f"api_error:{exc.code}")
        except Exception as exc:  # a cut without an error event, a JSON error ...
            outcomes.append(f"other:{type(exc).__name__}")

    readers = [threading.Thread(target=read_stream) for _ in range(4)]
    for t in readers:
        t.start()
    wait_until(lambda: len(router.runtime.streams) == 4, timeout=10)
    stopper = threading.Thread(target=router.stop)
    stopper.start()
    wait_until(lambda: router.runtime.draining)
    # While draining the router still listens: /readyz says 503, it does not refuse the connection.
    ready = httpx.get(router.url + "/readyz", timeout=2)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    stopper.join(timeout=15)
    for t in readers:
        t.join(timeout=5)
    assert outcomes == ["api_error:router_shutdown"] * 4
    assert router.runtime.load.in_flight("small") == 0
    assert router.runtime.ledger.snapshot()["models"].get("small", {}).get("in_flight", 0) == 0


# --- hung, failing and dead backends --------------------------------------------------------------


def test_hung_top_model_trips_its_breaker_and_requests_go_elsewhere_fast(
    urls, start_router, clean_sims
) -> None:
    cfg = router_config(
        urls,
        server={"firstByteTimeoutSeconds": 0.5},
        degradation={
            "circuitBreaker": {"failureThreshold": 2, "openSeconds": 1.0},
            "scrapeIntervalSeconds": 0.1,
        },
    )
    router = start_router(cfg, engine=FixedEngine(["large", "medium", "small"]))
    clean_sims["large"].set_faults(hang=True)
    c = client(router)
    # Streams miss their first byte (0.5 s) and fall back; two such failures (or the scrapes showing
    # large generating nothing with requests in flight) open the circuit.
    for _ in range(2):
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=MSG, max_tokens=5, stream=True
        )
        assert raw.headers["x-tollway-model"] == "medium"
        list(raw.parse())
    status = httpx.get(router.url + "/v1/tollway/status").json()
    assert next(v for v in status["circuits"].values() if v["model"] == "large")["state"] == "open"
    time.sleep(1.1)  # half-open: the next request is a probe, and plain requests are next
    timings = []
    for _ in range(6):
        t = time.monotonic()
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=5)
        timings.append((time.monotonic() - t, raw.headers["x-tollway-model"], raw.headers["x-tollway-route"]))
    # A plain answer has no first byte before it is whole, so the first request waits on large
    # until the scrapes show large generating nothing with it in flight for the first-byte limit
    # (0.5 s): its circuit opens, the waiting request goes to medium; the rest skip large at once.
    assert all(model == "medium" for _, model, _ in timings)
    assert timings[0][2] == "fallback" and 0.4 < timings[0][0] < 3
    assert all(s < 0.4 and route == "degraded" for s, _, route in timings[1:])
    status = httpx.get(router.url + "/v1/tollway/status").json()
    large = next(v for v in status["circuits"].values() if v["model"] == "large")
    assert large["state"] == "open" and large["trips"] == 2  # opened again after the failed probe
    metrics = httpx.get(router.url + "/metrics").text
    assert f'tollway_circuit_state{{endpoint="{urls["large"]}",model="large"}} 2.0' in metrics
    # Pinned to the broken model: 503 at once, not a 120 s wait.
    t = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="large", messages=MSG, max_tokens=5)
    assert info.value.status_code == 503 and time.monotonic() - t < 0.4
    # It recovers: after openSeconds one probe goes through, succeeds, and the circuit closes.
    clean_sims["large"].clear_faults()
    time.sleep(1.1)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=5)
    assert raw.headers["x-tollway-model"] == "large"
    wait_until(lambda: router.runtime.breakers.get(urls["large"]).current() == "closed")


def test_a_plain_request_waiting_on_an_endpoint_whose_circuit_opens_goes_elsewhere(
    urls, start_router, clean_sims
) -> None:
    cfg = router_config(
        urls,
        server={"firstByteTimeoutSeconds": 0.5, "upstreamTimeoutSeconds": 60},
        degradation={"circuitBreaker": {"failureThreshold": 2, "openSeconds": 30}},
    )
    router = start_router(cfg, engine=FixedEngine(["large", "medium", "small"]))
    clean_sims["large"].set_faults(hang=True)
    answers: list[tuple[float, str]] = []

    def plain() -> None:  # a plain answer has no first byte before it is whole: no 0.5 s limit
        t = time.monotonic()
        raw = client(router).chat.completions.with_raw_response.create(
            model="auto", messages=MSG, max_tokens=5
        )
        answers.append((time.monotonic() - t, raw.headers["x-tollway-model"]))

    waiting = threading.Thread(target=plain)
    waiting.start()
    wait_until(lambda: router.runtime.load.in_flight("large") == 1)
    for _ in range(2):  # two streams miss their first byte: the circuit opens
        list(client(router).chat.completions.create(model="auto", messages=MSG, max_tokens=5, stream=True))
    waiting.join(timeout=10)
    assert answers and answers[0][1] == "medium" and answers[0][0] < 5  # not the 60 s total


def test_a_client_that_gave_up_is_not_retried_elsewhere(urls, start_router, clean_sims) -> None:
    cfg = router_config(urls, server={"firstByteTimeoutSeconds": 3})
    router = start_router(cfg, engine=FixedEngine(["large", "medium", "small"]))
    clean_sims["large"].set_faults(hang=True)
    with pytest.raises(openai.APITimeoutError):
        client(router, timeout=0.5).chat.completions.create(model="auto", messages=MSG, max_tokens=5)
    # The router notices the client left: the attempt ends at once (slot and budget back) ...
    wait_until(lambda: router.runtime.load.in_flight("large") == 0, timeout=1.5)
    time.sleep(3)  # ... and when large's first-byte limit would have passed, nothing is retried.
    metrics = httpx.get(router.url + "/metrics").text
    assert "tollway_upstream_retries_total{" not in metrics
    assert 'outcome="client_gone"' in metrics
    assert router.runtime.load.in_flight("medium") == 0
    assert 'tollway_requests_total{model="medium"' not in metrics, metrics  # nothing was sent there


# --- load awareness under bursts ------------------------------------------------------------------


def test_a_burst_spreads_by_each_backends_real_concurrency(start_router) -> None:
    sims = {
        name: SimulatorServer(
            SimulatorProfile(model=name, speedup=5, seed=i, ttft_ms=5, max_num_seqs=seqs)
        ).start()
        for i, (name, seqs) in enumerate([("small", 48), ("medium", 24), ("large", 4)])
    }
    try:
        cfg = router_config(
            {n: s.url for n, s in sims.items()},
            degradation={"maxWaitingPerReplica": 3, "scrapeIntervalSeconds": 5, "staleAfterSeconds": 10},
        )
        data = cfg.model_dump(by_alias=True)
        for backend, seqs in zip(data["backends"], (48, 24, 4), strict=True):
            backend["maxNumSeqs"] = seqs
        router = start_router(
            type(cfg).model_validate(data), engine=FixedEngine(["large", "medium", "small"])
        )

        async def burst() -> list[str]:
            c = openai.AsyncOpenAI(base_url=router.base_url, api_key="unused", max_retries=0)

            async def one() -> str:
                raw = await c.chat.completions.with_raw_response.create(
                    model="auto", messages=MSG, max_tokens=20, stream=True
                )
                async for _ in raw.parse():
                    pass
                return raw.headers["x-tollway-model"]

            try:
                return await asyncio.gather(*(one() for _ in range(40)))
            finally:
                await c.close()

        served = Counter(asyncio.run(burst()))
    finally:
        for s in sims.values():
            s.stop()
    # large runs 4 at once and may queue 3 more; the rest go to medium (24 + 3), then small.
    assert sum(served.values()) == 40
    assert served["large"] <= 7 and served["medium"] <= 27 and served["small"] >= 6
    assert served["large"] >= 4, served  # the best model is filled to its real concurrency first


# --- slow and stalled clients ---------------------------------------------------------------------


def test_a_request_body_that_never_finishes_gets_408(urls, start_router) -> None:
    router = start_router(router_config(urls, server={"requestBodyTimeoutSeconds": 0.3}))
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{}"
        )
        t = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):  # the router closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.monotonic() - t < 2


def test_a_client_that_stops_reading_loses_its_slot_and_settles(start_router, fake) -> None:
    router = fake_router(
        start_router,
        fake,
        "firehose",
        server={"clientStallSeconds": 0.5, "upstreamTimeoutSeconds": 60},
        budgets={"tokens": {"small": 10**9}},
    )
    body = json.dumps({"model": "small", "messages": MSG, "stream": True, "max_tokens": 10}).encode()
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: router.runtime.load.in_flight("small") == 1)
        # The client never reads; the router's writes block, and after clientStallSeconds it drops
        # the client: slot freed, reservation settled, though the connection is still open here.
        wait_until(lambda: router.runtime.load.in_flight("small") == 0, timeout=10)
        assert router.runtime.ledger.snapshot()["models"]["small"]["in_flight"] == 0
        assert not router.runtime.streams
    metrics = httpx.get(router.url + "/metrics").text
    assert 'outcome="client_stalled"' in metrics


# --- what reaches the client ----------------------------------------------------------------------


def test_upstream_headers_are_filtered_to_what_an_openai_client_needs(start_router, fake) -> None:
    router = fake_router(start_router, fake, "leaky-headers")
    response = httpx.post(router.base_url + "/chat/completions", json={"model": "small", "messages": MSG})
    assert response.status_code == 200 and response.headers["x-tollway-model"] == "small"
    for leaked in ("set-cookie", "access-control-allow-origin", "x-internal-node"):
        assert leaked not in response.headers


def test_usage_is_asked_upstream_and_left_out_unless_the_client_asked(urls, start_router) -> None:
    router = start_router(
        router_config(urls, budgets={"tokens": {"small": 10**6}}), engine=FixedEngine(["small"])
    )
    c = client(router)
    asked = list(
        c.chat.completions.create(
            model="small", messages=MSG, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    reported = asked[-1].usage
    assert reported is not None and reported.completion_tokens == 7 and not asked[-1].choices

    def settled() -> bool:
        return router.runtime.ledger.snapshot()["models"]["small"]["in_flight"] == 0

    wait_until(settled)
    used = router.runtime.ledger.snapshot()["models"]["small"]["used"]
    assert used == reported.total_tokens
    plain = list(c.chat.completions.create(model="small", messages=MSG, max_tokens=7, stream=True))
    assert all(chunk.usage is None for chunk in plain) and all(chunk.choices for chunk in plain)
    wait_until(settled)
    # The router asked for usage anyway and charged the backend's own report (the same request
    # costs the same), not a count of deltas plus a prompt bound.
    assert router.runtime.ledger.snapshot()["models"]["small"]["used"] == used + reported.total_tokens


def test_a_capability_no_model_serves_is_a_clear_400(urls, start_router) -> None:
    router = start_router(router_config(urls))
    response = httpx.post(router.base_url + "/embeddings", json={"model": "auto", "input": "hello"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "capability_not_served" and "/v1/embeddings" in error["message"]


def test_metric_scrapes_and_upstream_calls_do_not_log_at_info() -> None:
    configure_logging("info")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    configure_logging("debug")
    assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
    configure_logging("warning")
