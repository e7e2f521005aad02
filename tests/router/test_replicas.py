"""The router sees replicas: end to end through a running router, with replicas whose load and
readiness a test sets (fake vLLM servers, and EndpointSlices in the Kubernetes emulator).

- a replica that becomes ready (its EndpointSlice says so) gets traffic within one scrape interval;
- a terminating replica gets no new request, while the one it is answering finishes;
- a replica whose /metrics read fails is not preferred over a healthy one;
- a model with one hot and one idle replica is not degraded to another model;
- the replica that answered is in `x-tollway-endpoint`, and per-replica load in the metrics.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from kube_emulator import EmulatorThread
from router_helpers import FixedEngine, router_config, wait_until

from router_service.config import CircuitBreakerSettings, RouterConfig
from router_service.proxy.discovery import KubeAccess
from router_service.proxy.server import BackgroundRouter

NS = "default"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
SCRAPE = 0.5  # scrapeIntervalSeconds in these tests
MSG = [{"role": "user", "content": "hello"}]
IDLE = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.01\n"
HOT = "vllm:num_requests_waiting 40\nvllm:num_requests_running 8\nvllm:kv_cache_usage_perc 0.97\n"


@pytest.fixture
def replicas() -> Iterator[list[FakeUpstream]]:
    servers = [FakeUpstream("ok").start() for _ in range(3)]
    for s in servers:
        s.metrics = IDLE
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def small() -> Iterator[FakeUpstream]:
    server = FakeUpstream("ok").start()
    server.metrics = IDLE
    yield server
    server.stop()


def config(backends: dict[str, dict[str, Any]], **degradation: Any) -> RouterConfig:
    cfg = router_config({name: "http://unused" for name in backends}).to_wire()
    for b in cfg["backends"]:
        b.pop("url")
        b.pop("replicas")
        b.update(backends[b["name"]])
    cfg["degradation"] = {"scrapeIntervalSeconds": SCRAPE, **degradation}
    return RouterConfig.model_validate(cfg)


def chat(router: BackgroundRouter, model: str = "auto") -> httpx.Response:
    response = httpx.post(
        router.base_url + "/chat/completions", json={"model": model, "messages": MSG}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response


def endpoints(router: BackgroundRouter, model: str) -> dict[str, dict[str, Any]]:
    return router.runtime.load.snapshot()[model]["endpoints"]


def ready(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"chat-large-{port}",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "chat-large"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["127.0.0.1"], "conditions": {"ready": True, "serving": True, "terminating": False}}
        ],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def test_replicas_from_endpointslices_join_at_once_and_draining_ones_get_nothing_new(
    replicas: list[FakeUpstream], start_router: Any
) -> None:
    a, b, _ = replicas
    with EmulatorThread(crds=False) as kube:
        httpx.post(kube.url + SLICES, json=ready(a.port)).raise_for_status()
        large = {
            "url": "http://chat-large.default.svc:8000",
            "endpointSlices": {"service": "chat-large", "namespace": NS},
        }
        router = start_router(
            config({"large": large}), engine=FixedEngine(["large"]), kube=KubeAccess(kube.url, token="t")
        )
        wait_until(lambda: list(endpoints(router, "large")) == [a.url], timeout=10)
        assert {chat(router).headers["x-tollway-endpoint"] for _ in range(5)} == {a.url}

        # B becomes ready: it takes requests within one scrape interval.
        httpx.post(kube.url + SLICES, json=ready(b.port)).raise_for_status()
        became_ready = time.monotonic()
        while chat(router).headers["x-tollway-endpoint"] != b.url:
            assert time.monotonic() - became_ready < SCRAPE, (
                "the new replica got no request within one scrape interval"
            )
        served = Counter(chat(router).headers["x-tollway-endpoint"] for _ in range(20))
        assert served[a.url] == served[b.url] == 10  # equal replicas take turns
        assert router.runtime.load.snapshot()["large"]["endpoints_from"] == "endpointslices"

        # B starts terminating while it answers a slow request: that one finishes, no new one comes.
        a.delay = b.delay = 1.0
        answers: list[httpx.Response] = []
        slow = [threading.Thread(target=lambda: answers.append(chat(router))) for _ in range(2)]
        for thread in slow:
            thread.start()
        wait_until(lambda: a.in_flight == 1 and b.in_flight == 1, timeout=5)  # one each: most room
        a.delay = 0.0
        draining = ready(b.port)["endpoints"]
        draining[0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
        httpx.patch(
            f"{kube.url}{SLICES}/chat-large-{b.port}",
            json={"endpoints": draining},
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()
        wait_until(lambda: not endpoints(router, "large")[b.url]["ready"], timeout=5)
        before = b.requests
        served = Counter(chat(router).headers["x-tollway-endpoint"] for _ in range(20))
        assert served == {a.url: 20} and b.requests == before
        for thread in slow:
            thread.join(timeout=5)
        assert sorted(r.headers["x-tollway-endpoint"] for r in answers) == sorted([a.url, b.url])
        wait_until(lambda: b.url not in endpoints(router, "large"), timeout=5)  # forgotten once idle
        router.stop()  # before the API server goes


def test_a_replica_whose_scrape_fails_is_not_preferred_over_a_healthy_one(
    replicas: list[FakeUpstream], start_router: Any
) -> None:
    healthy, failing, _ = replicas
    healthy.metrics = (
        "vllm:num_requests_waiting 1\nvllm:num_requests_running 3\nvllm:kv_cache_usage_perc 0.6\n"
    )
    failing.metrics_status = 500  # its load is unknown: never taken for idle
    router = start_router(
        config({"large": {"urls": [failing.url, healthy.url], "maxNumSeqs": 8}}),
        engine=FixedEngine(["large"]),
    )
    wait_until(lambda: endpoints(router, "large")[failing.url]["scrape_errors"] > 0, timeout=5)
    wait_until(lambda: endpoints(router, "large")[healthy.url]["metrics"] == "fresh", timeout=5)
    served = Counter(chat(router).headers["x-tollway-endpoint"] for _ in range(20))
    assert served == {healthy.url: 20}
    metrics = httpx.get(router.url + "/metrics").text
    assert f'tollway_endpoint_metrics_fresh{{endpoint="{failing.url}",model="large"}} 0.0' in metrics
    assert f'tollway_endpoint_picks_total{{endpoint="{healthy.url}",model="large"}} 20.0' in metrics
    # When its reads succeed again it is a candidate like any other.
    failing.metrics_status, failing.metrics = 200, IDLE
    wait_until(lambda: endpoints(router, "large")[failing.url]["metrics"] == "fresh", timeout=5)
    assert chat(router).headers["x-tollway-endpoint"] == failing.url


def test_a_model_with_one_hot_and_one_idle_replica_is_not_degraded(
    replicas: list[FakeUpstream], small: FakeUpstream, start_router: Any
) -> None:
    hot, idle, _ = replicas
    hot.metrics = HOT
    backends = {"large": {"urls": [hot.url, idle.url], "maxNumSeqs": 8}, "small": {"url": small.url}}
    router = start_router(config(backends), engine=FixedEngine(["large", "small"]))
    wait_until(lambda: endpoints(router, "large")[hot.url]["waiting"] == 40, timeout=5)
    for _ in range(10):
        response = chat(router)
        assert response.headers["x-tollway-model"] == "large"
        assert response.headers["x-tollway-route"] == "routed"
        assert response.headers["x-tollway-endpoint"] == idle.url
    assert hot.requests == 0 and small.requests == 0
    # Only when no replica of large has room does the request go to the next model.
    idle.metrics = HOT
    wait_until(lambda: endpoints(router, "large")[idle.url]["waiting"] == 40, timeout=5)
    response = chat(router)
    assert (
        response.headers["x-tollway-model"] == "small" and response.headers["x-tollway-route"] == "degraded"
    )
    assert response.headers["x-tollway-degraded-from"] == "large=saturated"


def test_a_failing_replica_is_retried_on_another_replica_of_the_same_model(
    replicas: list[FakeUpstream], small: FakeUpstream, start_router: Any
) -> None:
    good, failing, _ = replicas
    failing.mode = "error"  # answers 500; its metrics look as idle as the good one's
    backends = {"large": {"urls": [failing.url, good.url]}, "small": {"url": small.url}}
    router = start_router(config(backends), engine=FixedEngine(["large", "small"]))
    wait_until(lambda: all(e["metrics"] == "fresh" for e in endpoints(router, "large").values()), timeout=5)
    routes: Counter[str] = Counter()
    for _ in range(6):
        response = chat(router)
        assert (
            response.headers["x-tollway-model"] == "large"
            and response.headers["x-tollway-endpoint"] == good.url
        )
        routes[response.headers["x-tollway-route"]] += 1
    assert failing.requests >= 1 and routes["fallback"] == failing.requests  # each failure retried on `good`
    assert small.requests == 0
    circuits = httpx.get(router.url + "/v1/tollway/status").json()["circuits"]
    assert circuits[failing.url]["model"] == "large" and circuits[good.url]["state"] == "closed"
    # The failing replica's breaker counted every failure (and opened once they reached its threshold).
    threshold = CircuitBreakerSettings().failure_threshold
    if failing.requests >= threshold:
        assert circuits[failing.url]["trips"] >= 1, circuits[failing.url]
    else:
        assert circuits[failing.url]["consecutive_failures"] == failing.requests, circuits[failing.url]
