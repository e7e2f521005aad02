"""The autoscaler against a real Prometheus scraping `tollway simulate` servers.

Prometheus (Debian's `prometheus`, installed by .ci/setup) runs on 127.0.0.1 with 1 s scrapes.
It scrapes three simulators that honour content negotiation like real vLLM, so OpenMetrics turns
`vllm:` into `vllm_`:
- `raw`: no relabelling, so the series are stored as `vllm_*`;
- `relabelled`: the chart's `metric_relabel_configs` rule, so they are stored as `vllm:*`;
- `elsewhere`: the same model name in another namespace (a target label), which pool-scoped
  queries must not count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from harness import (
    AutoscalerLoop,
    ClosedLoopLoad,
    Job,
    LocalPrometheus,
    MemoryScaler,
    host_port,
)

from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import SimulatorServer
from tollway_operator import autoscaling as a
from tollway_operator.api import ModelPoolSpec
from tollway_operator.autoscaler import PoolAutoscaler
from tollway_operator.prometheus import NoData, PrometheusClient, PrometheusQueryError

pytestmark = pytest.mark.timeout(120)

MODEL = "m"
POOL = "pool"
NAMESPACE = "team-a"
# Two sequences at a time, ~1 s per 20-token request: 12 clients over two servers keep ~8 waiting.
PROFILE = dict(model=MODEL, max_num_seqs=2, decode_tokens_per_second=20.0, metrics_format="negotiate")


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimulatorServer]]:
    servers = {
        name: SimulatorServer(SimulatorProfile(**PROFILE, seed=i))  # type: ignore[arg-type]
        for i, name in enumerate(("raw", "relabelled", "elsewhere"))
    }
    try:
        for s in servers.values():
            s.start()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def prom(sims: dict[str, SimulatorServer]) -> Iterator[LocalPrometheus]:
    jobs = [
        Job("raw", targets=[host_port(sims["raw"].url)]),
        Job("relabelled", relabel=True, targets=[host_port(sims["relabelled"].url)]),
        Job(
            "elsewhere",
            relabel=True,
            targets=[host_port(sims["elsewhere"].url)],
            labels={"namespace": "other"},
        ),
    ]
    with LocalPrometheus(jobs) as p:
        p.wait_for(
            'count({__name__=~"vllm[:_]num_requests_waiting"})', lambda r: r and r[0]["value"][1] == "3"
        )
        yield p


def pool_spec(prometheus_url: str, **autoscaling: object) -> ModelPoolSpec:
    return ModelPoolSpec.model_validate(
        {
            "models": [{"name": MODEL, "model": "org/m", "replicas": {"min": 1, "max": 3}}],
            "autoscaling": {
                "prometheusUrl": prometheus_url,
                "target": 2,
                "intervalSeconds": 1,
                "scaleUpStabilizationSeconds": 0,
                "scaleDownStabilizationSeconds": 2,
                **autoscaling,
            },
        }
    )


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_both_spellings_are_stored_and_queries_match_them(prom: LocalPrometheus) -> None:
    names = {r["metric"]["__name__"] for r in prom.query('{__name__=~"vllm[:_]num_requests_waiting"}')}
    assert names == {"vllm_num_requests_waiting", "vllm:num_requests_waiting"}
    # The chart's rule restores the colon name: only the unrelabelled job keeps `vllm_`.
    assert {r["metric"]["job"] for r in prom.query("vllm_num_requests_waiting")} == {"raw"}
    assert {r["metric"]["job"] for r in prom.query("vllm:num_requests_waiting")} == {
        "relabelled",
        "elsewhere",
    }
    async with PrometheusClient(prom.url) as client:
        # Every spelling counts: three servers report a gauge each.
        q = a.waiting_query(MODEL).replace("sum(", "count(", 1)
        assert await client.value(q) == 3
        # The pool's scope drops the other namespace's series and keeps the unlabelled ones.
        scoped = a.waiting_query(MODEL, a.Scope(NAMESPACE, POOL)).replace("sum(", "count(", 1)
        assert await client.value(scoped) == 2
        with pytest.raises(NoData):
            await client.value(a.waiting_query("no-such-model"))
        with pytest.raises(PrometheusQueryError, match="bad_data"):
            await client.value("sum(")


async def test_scope_and_custom_query_against_running_requests(
    prom: LocalPrometheus, sims: dict[str, SimulatorServer]
) -> None:
    """A long request on the other namespace's server counts only in the unscoped query."""
    async with httpx.AsyncClient(timeout=30.0) as http, PrometheusClient(prom.url) as client:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 80}  # ~4 s at 20 tokens/s
        task = asyncio.create_task(http.post(f"{sims['elsewhere'].url}/v1/completions", json=body))
        deadline = time.monotonic() + 10
        while await client.value(a.activity_query(MODEL)) < 1:
            assert time.monotonic() < deadline, "the running request never showed up in Prometheus"
            await asyncio.sleep(0.2)
        assert await client.value(a.activity_query(MODEL, a.Scope(NAMESPACE, POOL))) == 0
        custom = pool_spec(
            prom.url,
            metric="promql",
            query='sum({__name__=~"vllm[:_]num_requests_running",namespace="$namespace"})',
        )
        q = a.load_query(custom.autoscaling, MODEL, "other", POOL)  # type: ignore[arg-type]
        assert await client.value(q) == 1
        assert (await task).status_code == 200


async def test_no_data_is_degraded_only_with_ready_replicas(prom: LocalPrometheus) -> None:
    spec = ModelPoolSpec.model_validate(
        {
            "models": [
                {"name": MODEL, "model": "org/m", "replicas": {"min": 1, "max": 3}},
                {"name": "ghost", "model": "org/ghost"},
                {"name": "api", "endpoint": {"url": "https://api.example.com"}},
            ],
            "autoscaling": {"prometheusUrl": prom.url, "intervalSeconds": 1},
        }
    )
    scaler = MemoryScaler({f"{POOL}-{MODEL}": 1, f"{POOL}-ghost": 1})
    autoscaler = PoolAutoscaler(POOL, NAMESPACE, scaler)
    try:
        result = await autoscaler.evaluate(spec)
        assert not result.status.healthy and result.status.reason == "NoData"
        assert "ghost" in result.status.message and "holding replicas" in result.status.message
        assert set(result.status.models) == {MODEL, "ghost"}  # the external model is not scaled
        assert result.status.models[MODEL].reason == "AtMinimum"  # nothing waiting, 1 replica
        # No ready replica (pods starting): no samples is expected, not a fault.
        scaler.unready.add(f"{POOL}-ghost")
        result = await autoscaler.evaluate(spec)
        assert result.status.healthy, result.status.message
        assert result.status.models["ghost"].reason == "NoReadyReplicas"
        assert scaler.patches == []
    finally:
        await autoscaler.aclose()


async def test_scale_up_under_load_down_after_and_hold_while_prometheus_is_down(
    prom: LocalPrometheus, sims: dict[str, SimulatorServer]
) -> None:
    deployment = f"{POOL}-{MODEL}"
    spec = pool_spec(prom.url)
    scaler = MemoryScaler({deployment: 1})
    loop = AutoscalerLoop.start(
        PoolAutoscaler(POOL, NAMESPACE, scaler, query_timeout=2.0), spec, max_evaluations=80
    )
    status, events = loop.status, loop.events
    load = ClosedLoopLoad(lambda: [sims["raw"].url, sims["relabelled"].url], MODEL, concurrency=12)
    load_task = asyncio.create_task(load.run(duration=20.0))
    try:
        # Up: ~8 waiting against a target of 2 per replica asks for 4; max is 3.
        await until(lambda: scaler.replicas[deployment] == 3, 12, "scale up to 3")
        ups = [p[2] for p in scaler.patches]
        assert ups == sorted(ups) and ups[-1] == 3, (
            "up only, to the bound (a partly filled queue may take 2 steps)"
        )
        up = [e for e in events if e[1] == "ScaledUp"]
        assert len(up) == len(ups) and "-> 3 replicas" in up[-1][2] and "recommend" in up[-1][2]
        assert status.last["healthy"] is True
        assert status.last["models"][MODEL]["toReplicas"] == 3

        # Down: load stops; one replica per 2 s window, 3 -> 2 -> 1, never below min.
        load.stop()
        await load_task
        await until(lambda: scaler.replicas[deployment] == 1, 15, "scale down to 1")
        downs = scaler.patches[len(ups) :]
        assert [p[2] for p in downs] == [2, 1], "one replica per step"
        assert [e[1] for e in events if e[1] == "ScaledDown"] == ["ScaledDown", "ScaledDown"]
        step_gap = downs[1][0] - downs[0][0]
        assert step_gap >= 2.0 - 0.1, "scale-down steps are a full down-window apart (less timer jitter)"

        # Prometheus stops: replicas hold, the status says why, one Warning event.
        writes_before, patches_before = len(status.writes), len(scaler.patches)
        prom.stop()
        await until(lambda: status.last.get("healthy") is False, 6, "unhealthy status")
        assert status.last["reason"] == "PrometheusUnavailable"
        assert prom.url in status.last["message"] and "holding replicas" in status.last["message"]
        await until(lambda: len(status.writes) >= writes_before + 4, 8, "more evaluations")
        assert scaler.replicas[deployment] == 1 and len(scaler.patches) == patches_before
        assert [e[1] for e in events].count("PrometheusUnavailable") == 1, events

        # Prometheus back: recovers by itself, with one Normal event.
        prom.start()
        await until(lambda: status.last.get("healthy") is True, 10, "recovery")
        assert next(e for e in events if e[1] == "AutoscalingRecovered")[0] == "Normal"
        assert scaler.replicas[deployment] == 1
    finally:
        load.stop()
        loop.stop.set()
        await asyncio.wait_for(asyncio.gather(load_task, loop.task, return_exceptions=True), 30)
        await loop.autoscaler.aclose()
