"""Load signals and the saturation decision, as pure functions."""

from __future__ import annotations

import math

import pytest

from router_service.config import BackendConfig, DegradationSettings, EndpointPickerSettings
from router_service.proxy.load import (
    DemandWindow,
    LoadTracker,
    LoadVerdict,
    ScrapedLoad,
    assess,
    parse_vllm_metrics,
)
from router_service.proxy.picker import UNAVAILABLE, choose_replica

TEXT_FORMAT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="small"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="small"} 3.0
vllm:num_requests_waiting{engine="1",model_name="small"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="small"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="small"} 0.7
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="small"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="small"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="small"} 4.0
vllm:e2e_request_latency_seconds_sum{model_name="small"} 2.5
"""

OPENMETRICS = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm_num_requests_waiting{model_name="small"} 4.0
# TYPE vllm:num_requests_running gauge
vllm_num_requests_running{model_name="small"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm_gpu_cache_usage_perc{model_name="small"} 0.25
# EOF
"""


def settings(**kw: object) -> DegradationSettings:
    return DegradationSettings.model_validate(kw)


def test_parse_text_format_sums_queues_and_averages_kv() -> None:
    load = parse_vllm_metrics(TEXT_FORMAT, at=12.0)
    assert load == ScrapedLoad(waiting=5.0, running=7.0, kv_usage=pytest.approx(0.6), at=12.0)


def test_parse_openmetrics_names_and_legacy_kv_gauge() -> None:
    load = parse_vllm_metrics(OPENMETRICS, at=0.0)
    assert (load.waiting, load.running, load.kv_usage) == (4.0, 1.0, 0.25)


def test_parse_ignores_other_metrics_and_empty_text() -> None:
    load = parse_vllm_metrics(
        "# HELP python_gc_objects_collected_total x\npython_gc_objects_collected_total 3\n", 0
    )
    assert (load.waiting, load.running, load.kv_usage) == (0.0, 0.0, None)
    assert parse_vllm_metrics("", 0).kv_usage is None


def test_parse_rejects_malformed_relevant_lines() -> None:
    with pytest.raises(ValueError):
        parse_vllm_metrics("vllm:num_requests_waiting{model_name=small 3\n", 0)


def test_zero_replicas_is_unavailable() -> None:
    v = assess(replicas=0, in_flight=0, scraped=None, settings=settings(), priority="critical", now=0)
    assert not v.available and v.saturated and v.reason == "unavailable" and math.isinf(v.pressure)


def test_in_flight_limit_scales_with_replicas_and_priority() -> None:
    s = settings(maxInFlightPerReplica=4)
    # standard: limit 4 x 2 replicas = 8 -> the 8th in flight means full.
    assert not assess(replicas=2, in_flight=7, scraped=None, settings=s, priority="standard", now=0).saturated
    full = assess(replicas=2, in_flight=8, scraped=None, settings=s, priority="standard", now=0)
    assert full.saturated and full.reason == "in_flight" and full.pressure == 1.0
    # sheddable (headroom 0.6): limit 4.8 -> 5 in flight is already full; critical (1.5): 12.
    assert assess(replicas=2, in_flight=5, scraped=None, settings=s, priority="sheddable", now=0).saturated
    assert not assess(
        replicas=2, in_flight=11, scraped=None, settings=s, priority="critical", now=0
    ).saturated


def test_waiting_and_kv_thresholds_and_headroom() -> None:
    s = settings(maxWaitingPerReplica=5, maxKvCacheUsage=0.9)
    busy = ScrapedLoad(waiting=6, running=10, kv_usage=0.5, at=100.0)
    v = assess(replicas=1, in_flight=0, scraped=busy, settings=s, priority="standard", now=100.5)
    assert v.saturated and v.reason == "waiting"
    assert not assess(
        replicas=2, in_flight=0, scraped=busy, settings=s, priority="standard", now=100.5
    ).saturated
    assert not assess(
        replicas=1, in_flight=0, scraped=busy, settings=s, priority="critical", now=100.5
    ).saturated
    full_kv = ScrapedLoad(waiting=0, running=10, kv_usage=0.95, at=100.0)
    v = assess(replicas=1, in_flight=0, scraped=full_kv, settings=s, priority="standard", now=100.5)
    assert v.saturated and v.reason == "kv_cache"
    # critical work tolerates a full KV cache (the limit is capped at 100%, never exceeded).
    assert not assess(
        replicas=1, in_flight=0, scraped=full_kv, settings=s, priority="critical", now=100.5
    ).saturated
    sheddable = assess(
        replicas=1,
        in_flight=0,
        scraped=ScrapedLoad(0, 0, 0.6, 100.0),
        settings=s,
        priority="sheddable",
        now=100,
    )
    assert sheddable.saturated  # 0.6 > 0.9 x 0.6


def test_stale_scrapes_are_ignored_not_errors() -> None:
    s = settings(staleAfterSeconds=2)
    busy = ScrapedLoad(waiting=100, running=0, kv_usage=1.0, at=10.0)
    assert assess(replicas=1, in_flight=0, scraped=busy, settings=s, priority="standard", now=11.9).saturated
    stale = assess(replicas=1, in_flight=0, scraped=busy, settings=s, priority="standard", now=12.1)
    assert not stale.saturated and stale.pressure == 0.0


def test_zero_waiting_threshold_means_any_queue_saturates() -> None:
    s = settings(maxWaitingPerReplica=0)
    q = ScrapedLoad(waiting=1, running=1, kv_usage=None, at=0)
    assert assess(replicas=3, in_flight=0, scraped=q, settings=s, priority="critical", now=0).saturated
    empty = ScrapedLoad(waiting=0, running=1, kv_usage=None, at=0)
    assert not assess(
        replicas=3, in_flight=0, scraped=empty, settings=s, priority="critical", now=0
    ).saturated


def test_demand_window_counts_recent_demand_only() -> None:
    w = DemandWindow(window_seconds=60)
    w.add(100.0)
    w.add(100.5, 2)
    w.add(130.0)
    assert w.total(131.0) == 4
    assert w.total(161.0) == 1
    assert w.total(500.0) == 0
    for t in range(1000):  # memory stays bounded by the window
        w.add(1000.0 + t)
    assert len(w._buckets) <= 62


def verdict(t: LoadTracker, model: str) -> LoadVerdict:
    """The model's verdict as the request path sees it (its best replica's, circuits closed)."""
    load = t.model(model)
    if load is None:
        return UNAVAILABLE
    return choose_replica(
        load.ready,
        settings=t.settings,
        picker=EndpointPickerSettings(),
        priority="standard",
        now=t.now(),
        max_num_seqs=load.max_num_seqs,
        allows=lambda _: True,
    )


def test_tracker_counts_reconfigures_and_keeps_counts() -> None:
    now = [0.0]
    backends = [
        BackendConfig(name="a", url="http://a:1", profile="p"),
        BackendConfig(name="b", url="http://b:1", profile="p"),
    ]
    t = LoadTracker(backends, settings(maxInFlightPerReplica=1), clock=lambda: now[0])
    t.acquire("a", "http://a:1")
    assert verdict(t, "a").saturated and not verdict(t, "b").saturated
    t.record_scrape("b", "http://b:1", "vllm:num_requests_waiting 9\n")
    assert verdict(t, "b").reason == "waiting"
    # A reload that scales `a` to 2 replicas keeps its in-flight count and drops `b`.
    t.configure(
        [BackendConfig(name="a", url="http://a:1", profile="p", replicas=2)],
        settings(maxInFlightPerReplica=1),
    )
    assert t.in_flight("a") == 1 and not verdict(t, "a").saturated
    assert verdict(t, "b").reason == "unavailable"
    t.release("a", "http://a:1")
    t.release("a", "http://a:1")
    assert t.in_flight("a") == 0
    t.record_demand("a")
    assert t.pending_demand("a") == 1
    now[0] = 61.0
    assert t.pending_demand("a") == 0


def test_a_failed_scrape_makes_a_replicas_load_unknown_at_once_not_idle() -> None:
    now = [0.0]
    t = LoadTracker(
        [BackendConfig(name="a", url="http://a:1", profile="p")], settings(), clock=lambda: now[0]
    )
    t.record_scrape("a", "http://a:1", "vllm:num_requests_waiting 9\nvllm:kv_cache_usage_perc 0.5\n")
    replica = t.model("a").ready[0]
    assert replica.fresh(now[0], 10.0) is not None
    t.record_scrape_failure("a", "http://a:1", "ConnectError")
    assert replica.fresh(now[0], 10.0) is None  # unknown, although the last good read is 0 s old
    snap = t.snapshot()["a"]
    assert snap["endpoints"]["http://a:1"]["metrics"] == "unknown" and snap["waiting"] is None
    assert snap["endpoints"]["http://a:1"]["last_error"] == "ConnectError"
    t.record_scrape("a", "http://a:1", "vllm:num_requests_waiting 1\n")
    now[0] = 10.5  # older than staleAfterSeconds: unknown again
    assert replica.fresh(now[0], 10.0) is None
    t.record_scrape("a", "http://a:1", "vllm:num_requests_waiting{ 3\n")
    assert replica.scrape_failed and "parse" in (replica.last_error or "")


def test_a_model_generating_nothing_with_requests_in_flight_is_reported_stalled_once() -> None:
    now = [0.0]
    t = LoadTracker(
        [BackendConfig(name="a", url="http://a:1", profile="p")], settings(), clock=lambda: now[0]
    )
    ep = "http://a:1"
    t.record_scrape("a", ep, "vllm:generation_tokens_total 10\n")
    t.acquire("a", ep)
    now[0] = 1.0
    t.record_scrape("a", ep, "vllm:generation_tokens_total 12\n")  # progress
    now[0] = 2.5
    t.record_scrape("a", ep, "vllm:generation_tokens_total 12\n")
    assert t.stalled(2.0) == []  # 1.5 s without progress
    now[0] = 3.5
    t.record_scrape("a", ep, "vllm:generation_tokens_total 12\n")
    assert t.stalled(2.0) == [("a", ep)] and t.stalled(2.0) == []  # once per stall
    t.release("a", ep)
    now[0] = 10.0
    t.record_scrape("a", ep, "vllm:generation_tokens_total 12\n")
    assert t.stalled(2.0) == []  # idle is not stalled


def test_max_num_seqs_turns_the_routers_own_requests_into_a_queue_between_scrapes() -> None:
    s = settings(maxWaitingPerReplica=2)
    kw = {
        "replicas": 1,
        "scraped": None,
        "settings": s,
        "priority": "standard",
        "now": 0.0,
        "max_num_seqs": 4,
    }
    assert not assess(in_flight=3, **kw).queues  # the 4th still gets a slot
    v = assess(in_flight=4, **kw)
    assert v.queues and not v.saturated  # the 5th would wait: allowed, 2 may wait
    assert assess(in_flight=6, **kw).saturated and assess(in_flight=6, **kw).reason == "waiting"
