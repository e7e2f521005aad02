"""The pure scaling decision: tolerance, windows, bounds, zero, queries, KEDA objects."""

from __future__ import annotations

import itertools
import re

import pytest

from tollway_operator import autoscaling as a
from tollway_operator.api import ModelPoolSpec

# --------------------------------------------------------------------------------------------
# desired_replicas: HPA AverageValue with a tolerance band
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "load", "expected"),
    [
        (2, 4.0, 2),  # exactly on target
        (2, 4.3, 2),  # ratio 1.075: inside the 10% band
        (2, 3.7, 2),  # ratio 0.925: inside
        (2, 4.5, 3),  # ratio 1.125: ceil(4.5 / 2) = 3
        (2, 3.5, 2),  # ratio 0.875: ceil(1.75) = 2
        (4, 2.0, 1),  # far below: ceil(2 / 2) = 1
        (4, 0.0, 0),  # nothing waiting: the raw recommendation is 0 (bounds lift it)
        (1, 22.0, 11),
        (3, 6.0, 3),
    ],
)
def test_desired_replicas_tolerance_band(current: int, load: float, expected: int) -> None:
    assert a.desired_replicas(current, load, target=2.0, tolerance=0.1) == expected


def test_desired_replicas_zero_tolerance_and_float_noise() -> None:
    assert a.desired_replicas(3, 6.000000000001, 2.0, 0.0) == 3  # no 4 from float noise
    assert a.desired_replicas(3, 6.2, 2.0, 0.0) == 4


def test_desired_replicas_from_zero() -> None:
    assert a.desired_replicas(0, 0.0, 2.0, 0.1) == 0
    assert a.desired_replicas(0, 0.5, 2.0, 0.1) == 1
    assert a.desired_replicas(0, 9.0, 2.0, 0.1) == 5


def test_desired_replicas_rejects_bad_load() -> None:
    with pytest.raises(ValueError, match="load"):
        a.desired_replicas(1, -1.0, 2.0, 0.1)


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="min"):
        a.ScalingPolicy(target=1.0, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target"):
        a.ScalingPolicy(target=0.0)


# --------------------------------------------------------------------------------------------
# decide(): windows, bounds, step limit
# --------------------------------------------------------------------------------------------


def policy(**kw: object) -> a.ScalingPolicy:
    base = dict(
        target=2.0, tolerance=0.1, min_replicas=1, max_replicas=4, up_window_s=0.0, down_window_s=30.0
    )
    base.update(kw)
    return a.ScalingPolicy(**base)  # type: ignore[arg-type]


def run(p: a.ScalingPolicy, steps: list[tuple[float, float]], start: int, t0: float = 0.0) -> list[int]:
    """Feed (time, load) pairs; replicas follow the decisions. Returns replicas after each step."""
    state = a.ModelState.start(t0)
    current = start
    out = []
    for t, load in steps:
        d = a.decide(
            p, a.Observation(current=current, load=load, activity=load + current, ready=current), state, t
        )
        current = d.replicas
        out.append(current)
    return out


def test_scale_up_is_immediate_and_clamped_to_max() -> None:
    d = a.decide(
        policy(), a.Observation(current=1, load=22.0, activity=30, ready=1), a.ModelState.start(0), 1.0
    )
    assert (d.replicas, d.reason, d.recommendation) == (4, "ScaledUp", 11)
    assert "recommend 11" in d.message and "bounds [1, 4]" in d.message


def test_up_window_takes_the_lowest_recommendation() -> None:
    p = policy(up_window_s=10.0, max_replicas=10)
    # A one-sample spike does not scale up; a sustained rise goes to the window's minimum.
    assert run(p, [(1, 2.0), (2, 12.0), (3, 2.0)], start=1) == [1, 1, 1]
    assert run(p, [(1, 6.0), (5, 8.0), (12, 8.0)], start=1) == [3, 3, 4]


def test_down_window_takes_the_highest_recommendation_and_waits_a_full_window() -> None:
    p = policy(down_window_s=30.0)
    # Started at t=0 with 4 replicas and no load: nothing happens before t=30 (the window since
    # the autoscaler started), then one step of at most 25% (at least one replica).
    out = run(p, [(t, 0.0) for t in (10, 20, 29, 31)], start=4)
    assert out == [4, 4, 4, 3]
    # The next step needs another full window after that change.
    out = run(p, [(t, 0.0) for t in (10, 31, 40, 60, 61, 92)], start=4)
    assert out == [4, 3, 3, 3, 2, 1]


def test_down_window_keeps_the_peak_of_the_window() -> None:
    p = policy(down_window_s=30.0, max_replicas=10)
    # At 8 replicas: a burst at t=25 (rec 6) then quiet (rec 1). At t=40 the window [10, 40]
    # still holds the 6, and the step limit allows 8 -> 6.
    out = run(p, [(5, 2.0), (25, 12.0), (40, 2.0)], start=8)
    assert out == [8, 8, 6]


def test_step_limit() -> None:
    assert a.scale_down_step_limit(4) == 3
    assert a.scale_down_step_limit(2) == 1
    assert a.scale_down_step_limit(10) == 8
    assert a.scale_down_step_limit(100) == 75


def test_steady_load_does_not_flap() -> None:
    """Waiting noise around the target at 3 replicas never changes the count."""
    p = policy(down_window_s=5.0)
    loads = [6.0, 5.0, 6.0, 6.5, 5.6, 6.0, 5.0, 6.0] * 5
    out = run(p, [(t + 1.0, load) for t, load in enumerate(loads)], start=3)
    assert set(out) == {3}


def closed_loop(
    clients: int, slots: int, p: a.ScalingPolicy, *, with_running: bool, seconds: int = 80
) -> list[int]:
    """`clients` requests always in flight, `slots` run per replica, the rest wait."""
    state = a.ModelState.start(0.0)
    current, history = 1, []
    for t in range(1, seconds):
        running = min(clients, slots * current)
        obs = a.Observation(
            current=current,
            load=clients - running,
            activity=clients,
            ready=current,
            running=running if with_running else None,
        )
        current = a.decide(p, obs, state, float(t)).replicas
        history.append(current)
    return history


def changes(history: list[int]) -> int:
    return sum(1 for x, y in itertools.pairwise(history) if x != y)


def test_closed_loop_settles_instead_of_bouncing() -> None:
    """30 clients, 8 slots per replica: waiting = max(0, 30 - 8n). From 1 replica the autoscaler
    goes to max (4); the step limit takes it to 3, where waiting per replica equals the target."""
    history = closed_loop(30, 8, policy(down_window_s=5.0), with_running=False)
    assert history[0] == 4
    assert history[-20:] == [3] * 20
    assert changes(history) == 1  # (1 ->) 4 -> 3, never back up


def test_queue_forecast_prevents_flapping_between_two_counts() -> None:
    """20 clients, 4 slots: no count sits inside the band (3 -> 8 waiting, 2.7/replica; 4 -> 4
    waiting, 1/replica). Without the running requests the autoscaler bounces 3 <-> 4 one window
    apart; with them, it sees that dropping to 3 would queue 8 and stays at 4."""
    p = policy(down_window_s=5.0, max_replicas=6)
    bouncing = closed_loop(20, 4, p, with_running=False)
    assert changes(bouncing[20:]) >= 4 and set(bouncing[20:]) == {3, 4}
    steady = closed_loop(20, 4, p, with_running=True)
    assert steady[:1] == [6] and steady[-40:] == [4] * 40
    assert steady == sorted(steady, reverse=True)  # only down after the first step: no reversal


def test_queue_forecast_holds_at_the_busiest_sample_of_the_window() -> None:
    """A scrape that catches clients between requests (1 waiting, 15 running instead of 4 and 16)
    would allow 4 -> 3 on its own; the window's busier samples keep 4."""
    p = policy(down_window_s=5.0, max_replicas=6)
    state = a.ModelState.start(0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        a.decide(p, a.Observation(current=4, load=4.0, activity=20, ready=4, running=16.0), state, t)
    d = a.decide(p, a.Observation(current=4, load=1.0, activity=16, ready=4, running=15.0), state, 6.0)
    assert (d.replicas, d.reason) == (4, "QueueForecast")
    assert "queue forecast" in d.message
    # Alone (fresh state, window passed), the lucky sample would have allowed the step.
    fresh = a.ModelState.start(0.0)
    d = a.decide(p, a.Observation(current=4, load=1.0, activity=16, ready=4, running=15.0), fresh, 6.0)
    assert d.replicas == 3


def test_queue_safe_replicas() -> None:
    # 4 replicas, 4 waiting, 16 running: dropping to 3 queues 8 (2.67/replica > 2.2).
    assert a.queue_safe_replicas(4, 2, waiting=4, running=16, target=2, tolerance=0.1) == 4
    # 6 replicas, nothing waiting, 20 running: 5 queues 3.3 (0.67/replica) -> fine.
    assert a.queue_safe_replicas(6, 5, waiting=0, running=20, target=2, tolerance=0.1) == 5
    # Idle: anything goes.
    assert a.queue_safe_replicas(4, 1, waiting=0, running=0, target=2, tolerance=0.1) == 1


def test_bounds_apply_at_once() -> None:
    # Above max (the user lowered it): down to max without waiting for the window.
    d = a.decide(policy(max_replicas=2), a.Observation(5, 10.0, 10, ready=5), a.ModelState.start(0), 1.0)
    assert d.replicas == 2
    # Below min: up to min.
    d = a.decide(policy(min_replicas=3), a.Observation(1, 0.0, 1, ready=1), a.ModelState.start(0), 1.0)
    assert d.replicas == 3
    # min 0 without scaleToZero still keeps one replica.
    d = a.decide(
        policy(min_replicas=0, down_window_s=0), a.Observation(2, 0.0, 0, ready=2), a.ModelState.start(0), 1
    )
    assert d.replicas == 1


@pytest.mark.parametrize(
    ("current", "load", "kw", "reason"),
    [
        (2, 4.0, {}, "Steady"),
        (4, 40.0, {}, "AtMaximum"),
        (1, 0.0, {}, "AtMinimum"),
        (3, 0.0, {}, "Stabilizing"),
    ],
)
def test_hold_reasons(current: int, load: float, kw: dict, reason: str) -> None:
    d = a.decide(policy(**kw), a.Observation(current, load, 1, ready=current), a.ModelState.start(0), 1.0)
    assert (d.replicas, d.reason) == (current, reason)


# --------------------------------------------------------------------------------------------
# Zero
# --------------------------------------------------------------------------------------------


def zero_policy(**kw: object) -> a.ScalingPolicy:
    return policy(min_replicas=0, scale_to_zero=True, idle_s=60.0, **kw)


def test_scale_to_zero_after_idle_time() -> None:
    p = zero_policy()
    state = a.ModelState.start(0.0)
    obs = a.Observation(current=1, load=0.0, activity=0.0, demand=0.0, ready=1)
    assert a.decide(p, obs, state, 30.0).replicas == 1
    assert a.decide(p, obs, state, 59.0).replicas == 1
    d = a.decide(p, obs, state, 60.0)
    assert (d.replicas, d.reason) == (0, "ScaledToZero")


def test_activity_or_demand_resets_the_idle_clock() -> None:
    p = zero_policy()
    state = a.ModelState.start(0.0)
    idle = a.Observation(current=1, load=0.0, activity=0.0, ready=1)
    a.decide(p, a.Observation(current=1, load=0.0, activity=2.0, ready=1), state, 40.0)  # running requests
    assert a.decide(p, idle, state, 90.0).replicas == 1  # only 50 s idle
    a.decide(p, a.Observation(current=1, load=0.0, activity=0.0, demand=1.0, ready=1), state, 95.0)
    assert a.decide(p, idle, state, 150.0).replicas == 1
    assert a.decide(p, idle, state, 155.0).replicas == 0


def test_unknown_activity_never_scales_to_zero() -> None:
    p = zero_policy()
    state = a.ModelState.start(0.0)
    for t in (100.0, 200.0, 300.0):
        assert a.decide(p, a.Observation(current=1, load=0.0, activity=None, ready=1), state, t).replicas == 1


@pytest.mark.parametrize(
    "kw", [{"scale_to_zero": False, "min_replicas": 0}, {"scale_to_zero": True, "min_replicas": 1}]
)
def test_zero_needs_min_zero_and_scale_to_zero(kw: dict) -> None:
    p = policy(idle_s=1.0, down_window_s=0.0, **kw)
    state = a.ModelState.start(0.0)
    assert a.decide(p, a.Observation(1, 0.0, 0.0, ready=1), state, 100.0).replicas == 1


def test_scale_from_zero_on_router_demand() -> None:
    p = zero_policy(up_window_s=60.0)  # the up window does not delay waking up
    state = a.ModelState.start(0.0)
    assert a.decide(p, a.Observation(0, 0.0, None, demand=0.0), state, 1.0).replicas == 0
    d = a.decide(p, a.Observation(0, 0.0, None, demand=3.0), state, 2.0)
    assert (d.replicas, d.reason) == (1, "ScaledFromZero")
    # A woken model gets the full idle time before it may go back to zero.
    assert a.decide(p, a.Observation(1, 0.0, 0.0, ready=1), state, 61.0).replicas == 1
    assert a.decide(p, a.Observation(1, 0.0, 0.0, ready=1), state, 62.0).replicas == 0


def test_scale_from_zero_sized_by_load_and_bounds() -> None:
    p = zero_policy()
    assert a.decide(p, a.Observation(0, 9.0, None, demand=1.0), a.ModelState.start(0), 1).replicas == 4
    # Zero not allowed: a model found at 0 goes back to its floor.
    d = a.decide(policy(min_replicas=2), a.Observation(0, 0.0, None), a.ModelState.start(0), 1)
    assert (d.replicas, d.reason) == (2, "BelowMinimum")


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def _name_regex(query: str) -> re.Pattern[str]:
    m = re.search(r'__name__=~"([^"]+)"', query)
    assert m, query
    return re.compile(m.group(1))


@pytest.mark.parametrize(
    ("builder", "metric"),
    [(a.waiting_query, "num_requests_waiting"), (a.kv_cache_query, "kv_cache_usage_perc")],
)
def test_vllm_queries_match_both_spellings(builder, metric: str) -> None:  # type: ignore[no-untyped-def]
    q = builder("llama-8b")
    rx = _name_regex(q)
    assert rx.fullmatch(f"vllm:{metric}") and rx.fullmatch(f"vllm_{metric}")
    assert not rx.fullmatch(f"vllm:{metric}_other") and not rx.fullmatch(f"xvllm:{metric}")
    assert 'model_name="llama-8b"' in q and q.startswith("sum(")


def test_activity_query_counts_running_and_waiting() -> None:
    rx = _name_regex(a.activity_query("m"))
    for name in ("vllm:num_requests_running", "vllm_num_requests_waiting"):
        assert rx.fullmatch(name)
    assert not rx.fullmatch("vllm:num_requests_swapped")


def test_router_queries_use_the_router_metric_names() -> None:
    assert a.demand_query("m") == (
        'sum(tollway_model_pending_demand{model="m"}) or sum(increase(tollway_model_demand_total{model="m"}[1m]))'
    )
    assert "tollway_in_flight" in a.router_load_query("m")


def test_custom_query_substitution() -> None:
    spec = ModelPoolSpec.model_validate(
        {
            "models": [{"name": "m", "model": "x"}],
            "autoscaling": {
                "prometheusUrl": "http://p:9090",
                "metric": "promql",
                "query": 'sum(rate(x{model="$model",ns="${namespace}"}[1m])) + label_replace(y, "a", "$1", "b", "(.*)")',
            },
        }
    )
    q = a.load_query(spec.autoscaling, "m", "team-a")  # type: ignore[arg-type]
    assert q == 'sum(rate(x{model="m",ns="team-a"}[1m])) + label_replace(y, "a", "$1", "b", "(.*)")'


def test_scope_matchers_accept_series_without_the_labels() -> None:
    q = a.waiting_query("m", a.Scope("team-a", "my.pool"))
    assert 'namespace=~"team-a|"' in q and 'pool=~"my\\\\.pool|"' in q
    assert a.waiting_query("m", a.Scope()) == 'sum({__name__=~"vllm[:_]num_requests_waiting",model_name="m"})'


def test_label_values_are_escaped() -> None:
    assert a.label_value('a"b\\c') == '"a\\"b\\\\c"'


def test_kv_cache_target_defaults_below_one_and_rejects_above() -> None:
    spec = ModelPoolSpec.model_validate(
        {"models": [{"name": "m", "model": "x"}], "autoscaling": {"metric": "kv_cache_usage"}}
    )
    assert spec.autoscaling is not None and spec.autoscaling.effective_target == 0.8
    with pytest.raises(ValueError, match="target \\(2\\) must be <= 1 for metric kv_cache_usage"):
        ModelPoolSpec.model_validate(
            {
                "models": [{"name": "m", "model": "x"}],
                "autoscaling": {"metric": "kv_cache_usage", "target": 2},
            }
        )


def test_prometheus_url_falls_back_to_the_operator_default(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelPoolSpec.model_validate({"models": [{"name": "m", "model": "x"}], "autoscaling": {}})
    assert spec.autoscaling is not None
    monkeypatch.delenv(a.PROMETHEUS_URL_ENV, raising=False)
    assert "prometheusUrl is unset" in (a.spec_problem(spec.autoscaling) or "")
    monkeypatch.setenv(a.PROMETHEUS_URL_ENV, "http://prom:9090")
    assert a.spec_problem(spec.autoscaling) is None
    assert a.prometheus_url(spec.autoscaling) == "http://prom:9090"
    explicit = spec.autoscaling.model_copy(update={"prometheus_url": "http://own:9090"})
    assert a.prometheus_url(explicit) == "http://own:9090"


# --------------------------------------------------------------------------------------------
# KEDA
# --------------------------------------------------------------------------------------------


def keda_spec(**autoscaling: object) -> ModelPoolSpec:
    return ModelPoolSpec.model_validate(
        {
            "models": [
                {"name": "small", "model": "org/small", "replicas": {"min": 0, "max": 3}},
                {"name": "big", "model": "org/big", "replicas": {"min": 1, "max": 5}},
                {"name": "ext", "endpoint": {"url": "https://api.example.com"}},
            ],
            "autoscaling": {"prometheusUrl": "http://prom:9090", "mode": "keda", **autoscaling},
        }
    )


def test_keda_scaled_objects() -> None:
    objs = a.desired_scaled_objects(
        "pool", "ns", keda_spec(scaleToZero=True, idleSecondsBeforeZero=120, scaleDownStabilizationSeconds=60)
    )
    assert [o["metadata"]["name"] for o in objs] == ["pool-small", "pool-big"]  # not the external one
    small, big = objs
    assert small["apiVersion"] == "keda.sh/v1alpha1" and small["kind"] == "ScaledObject"
    assert small["metadata"]["namespace"] == "ns"
    assert small["metadata"]["labels"]["tollway.io/model"] == "small"
    s = small["spec"]
    assert s["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pool-small"}
    assert (s["minReplicaCount"], s["maxReplicaCount"], s["cooldownPeriod"], s["pollingInterval"]) == (
        0,
        3,
        120,
        15,
    )
    load = s["triggers"][0]
    assert load["type"] == "prometheus"
    assert load["metadata"]["serverAddress"] == "http://prom:9090"
    assert load["metadata"]["query"] == a.waiting_query("small", a.Scope("ns", "pool"))
    assert load["metadata"]["threshold"] == "2"
    assert [t["name"] for t in s["triggers"]] == ["load", "activity"]
    assert "tollway_model_pending_demand" in s["triggers"][1]["metadata"]["query"]
    behavior = s["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 60
    # min 1: no zero, no activity trigger.
    assert big["spec"]["minReplicaCount"] == 1
    assert [t["name"] for t in big["spec"]["triggers"]] == ["load"]


def test_keda_only_in_keda_mode() -> None:
    spec = keda_spec()
    spec.autoscaling.mode = "operator"  # type: ignore[union-attr]
    assert a.desired_scaled_objects("pool", "ns", spec) == []
    spec.autoscaling = None
    assert a.desired_scaled_objects("pool", "ns", spec) == []


def test_keda_objects_validate_against_expected_shapes() -> None:
    """Thresholds are strings (KEDA's metadata is map[string]string)."""
    for obj in a.desired_scaled_objects("pool", "ns", keda_spec(scaleToZero=True)):
        for trig in obj["spec"]["triggers"]:
            assert all(isinstance(v, str) for v in trig["metadata"].values())
