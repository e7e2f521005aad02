"""Autoscaling decisions for a ModelPool's models: pure functions, no I/O.

The operator's autoscaler (`autoscaler.py`) feeds these functions with what it read from
Prometheus and the Deployments; KEDA mode turns the same policy into `ScaledObject`s.

Semantics (Kubernetes HPA, with two additions for queue-style metrics):

* **Load** is a model's *total* across its replicas (waiting requests, KV cache use summed over
  pods, router demand, or a custom PromQL value) and `target` is the value one replica should
  carry, as an HPA `AverageValue` target: the raw recommendation is ``ceil(total / target)``,
  unless ``|total / (current * target) - 1| <= tolerance``, which keeps `current`.
* **Stabilization** as in the HPA: scaling up goes to the *lowest* recommendation seen in the
  up-window (0 s = at once), scaling down to the *highest* seen in the down-window.
* **Calm scale-down** (additions): no scale-down until a full down-window has passed since the
  last change (or since the autoscaler started watching the model), so a decision never acts on
  metrics from before the previous step; and one step removes at most a quarter of the replicas
  (at least one). A waiting queue reads 0 both at "just enough" and "far too many" replicas, so
  without the step limit a pool under steady load would drop to `min`, queue up, and bounce.
  For the waiting-queue metric a scale-down also has to pass a forecast: the running requests of
  the replicas removed join the queue, and a count that would then ask for more at any sample of
  the down-window is not taken (`queue_safe_replicas`).
* **Zero**: a model reaches 0 replicas only through the idle rule (``replicas.min == 0``,
  ``scaleToZero``, nothing running, waiting or demanded for ``idleSecondsBeforeZero``), and leaves
  0 as soon as the router reports demand (or the metric shows load), bypassing the windows.
* **Bounds**: the result is clamped to ``[min, max]`` (``min`` counts as 1 unless zero is allowed).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal

from tollway_operator.api import AutoscalingSpec, ModelPoolSpec, ModelSpec, ReplicaRange

PROMETHEUS_URL_ENV = "TOLLWAY_PROMETHEUS_URL"

# ---------------------------------------------------------------------------------------------
# PromQL
# ---------------------------------------------------------------------------------------------

#: Label that vLLM (and `tollway simulate`) put the served model name in.
VLLM_MODEL_LABEL = "model_name"
#: Label the router's per-model metrics use.
ROUTER_MODEL_LABEL = "model"
#: Router gauge: requests in the last 60 s that wanted a model while it had no replicas.
ROUTER_PENDING_DEMAND = "tollway_model_pending_demand"
#: Router counter (exposed with `_total`): the same demand, cumulative.
ROUTER_DEMAND_TOTAL = "tollway_model_demand_total"
#: Router gauge: requests the router has in flight to a model.
ROUTER_IN_FLIGHT = "tollway_in_flight"
#: KEDA trigger threshold that makes a trigger ask for at most one replica: ceil(x / huge) = 1.
ACTIVATION_ONLY_THRESHOLD = 1_000_000
#: A scale-down step removes at most this fraction of the replicas (and at least one).
SCALE_DOWN_MAX_FRACTION = 0.25

Metric = Literal["num_requests_waiting", "kv_cache_usage", "router_demand", "promql"]


def label_value(value: str) -> str:
    """A PromQL string literal (double-quoted, escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _regex_literal(value: str) -> str:
    """`value` as an RE2 literal (names here are DNS labels/subdomains; `.` is the only special)."""
    return "".join(c if c.isalnum() or c in "-_" else "\\" + c for c in value)


@dataclass(frozen=True)
class Scope:
    """Where a model's series live. The chart's scrape config attaches `namespace` and `pool`
    (from the pod label tollway.io/pool); a matcher `label=~"value|"` also accepts series without
    the label, so the queries work with scrape configs that do not add them."""

    namespace: str | None = None
    pool: str | None = None

    def matchers(self) -> str:
        out = ""
        for label, value in (("namespace", self.namespace), ("pool", self.pool)):
            if value:
                out += f",{label}=~{label_value(_regex_literal(value) + '|')}"
        return out


def vllm_selector(metric: str, model: str, scope: Scope = Scope()) -> str:
    """Select a vLLM metric under both spellings.

    prometheus-client >= 0.23 writes `vllm:x` as `vllm_x` in OpenMetrics sample lines, and
    Prometheus negotiates OpenMetrics, so without the chart's relabel rule the series are stored
    as `vllm_x`. A `__name__` regex matches either (PromQL regexes are anchored), so the sum is
    right whichever spelling (or mix, during a rollout of the relabel rule) is stored.
    ``metric`` may itself be a regex alternative such as ``num_requests_(running|waiting)``.
    """
    return f'{{__name__=~"vllm[:_]{metric}",{VLLM_MODEL_LABEL}={label_value(model)}{scope.matchers()}}}'


def _router_selector(model: str, scope: Scope) -> str:
    return f"{{{ROUTER_MODEL_LABEL}={label_value(model)}{scope.matchers()}}}"


def waiting_query(model: str, scope: Scope = Scope()) -> str:
    return f"sum({vllm_selector('num_requests_waiting', model, scope)})"


def kv_cache_query(model: str, scope: Scope = Scope()) -> str:
    return f"sum({vllm_selector('kv_cache_usage_perc', model, scope)})"


def demand_query(model: str, scope: Scope = Scope()) -> str:
    """Router demand for a model at zero replicas (summed over router replicas)."""
    sel = _router_selector(model, scope)
    return f"sum({ROUTER_PENDING_DEMAND}{sel}) or sum(increase({ROUTER_DEMAND_TOTAL}{sel}[1m]))"


def router_load_query(model: str, scope: Scope = Scope()) -> str:
    """Requests the routers hold for a model: in flight, plus demand while it has no replicas."""
    sel = _router_selector(model, scope)
    return f"sum({ROUTER_IN_FLIGHT}{sel}) + (sum({ROUTER_PENDING_DEMAND}{sel}) or vector(0))"


def running_query(model: str, scope: Scope = Scope()) -> str:
    """Requests in execution on the model's replicas."""
    return f"sum({vllm_selector('num_requests_running', model, scope)})"


def activity_query(model: str, scope: Scope = Scope()) -> str:
    """Requests running or waiting on the model's replicas (0 means idle)."""
    return f"sum({vllm_selector('num_requests_(running|waiting)', model, scope)})"


def substitute(query: str, model: str, namespace: str, pool: str = "") -> str:
    """Fill `$model`, `$namespace` and `$pool` (or `${...}`) in a custom query; other `$` stay."""
    return Template(query).safe_substitute(model=model, namespace=namespace, pool=pool)


def load_query(autoscaling: AutoscalingSpec, model: str, namespace: str, pool: str | None = None) -> str:
    """The PromQL whose value is the model's total load (compared with `target` per replica)."""
    scope = Scope(namespace, pool)
    if autoscaling.metric == "num_requests_waiting":
        return waiting_query(model, scope)
    if autoscaling.metric == "kv_cache_usage":
        return kv_cache_query(model, scope)
    if autoscaling.metric == "router_demand":
        return router_load_query(model, scope)
    if autoscaling.query is None:  # the API rejects this; keep the message if it slips through
        raise ValueError("spec.autoscaling.query: metric 'promql' needs query (a PromQL expression)")
    return substitute(autoscaling.query, model, namespace, pool or "")


def spec_problem(autoscaling: AutoscalingSpec) -> str | None:
    """A setting the API accepts but that cannot work here; None when fine."""
    if prometheus_url(autoscaling) is None:
        return (
            "spec.autoscaling.prometheusUrl is unset and the operator has no default "
            f"({PROMETHEUS_URL_ENV}, the chart's prometheusUrl value): set one of them"
        )
    return None


def prometheus_url(autoscaling: AutoscalingSpec) -> str | None:
    """The spec's Prometheus URL, else the operator-wide default from the environment."""
    return autoscaling.prometheus_url or os.environ.get(PROMETHEUS_URL_ENV) or None


# ---------------------------------------------------------------------------------------------
# Policy and inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingPolicy:
    """How one model scales; see the module docstring for the semantics."""

    target: float
    tolerance: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 1
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    scale_to_zero: bool = False
    idle_s: float = 600.0
    down_max_fraction: float = SCALE_DOWN_MAX_FRACTION

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if self.max_replicas < 1:
            raise ValueError(f"max must be >= 1, got {self.max_replicas}")
        if self.up_window_s < 0 or self.down_window_s < 0 or self.idle_s < 0:
            raise ValueError("windows and idle time must be >= 0")
        if not 0 < self.down_max_fraction <= 1:
            raise ValueError(f"down_max_fraction must be in (0, 1], got {self.down_max_fraction}")

    @property
    def zero_allowed(self) -> bool:
        return self.scale_to_zero and self.min_replicas == 0

    @property
    def floor(self) -> int:
        """Fewest replicas outside the idle rule."""
        return max(self.min_replicas, 1)

    @classmethod
    def from_spec(cls, autoscaling: AutoscalingSpec, replicas: ReplicaRange) -> ScalingPolicy:
        return cls(
            target=autoscaling.effective_target,
            tolerance=autoscaling.tolerance,
            min_replicas=replicas.min,
            max_replicas=replicas.max,
            up_window_s=autoscaling.scale_up_stabilization_seconds,
            down_window_s=autoscaling.scale_down_stabilization_seconds,
            scale_to_zero=autoscaling.scale_to_zero,
            idle_s=autoscaling.idle_seconds_before_zero,
        )


@dataclass(frozen=True)
class Observation:
    """What the autoscaler read for one model at one evaluation.

    `load` is the total across replicas (None: no data). `activity` is running + waiting
    requests (None: unknown). `demand` is the router's demand while the model is at zero.
    `running` (queue metrics only) is the requests in execution: when a replica goes, its share
    of them joins the queue, which the scale-down forecast accounts for.
    """

    current: int
    load: float | None
    activity: float | None = None
    demand: float = 0.0
    ready: int | None = None
    running: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    message: str
    recommendation: int | None = None

    def changed(self, current: int) -> bool:
        return self.replicas != current


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


def _ceil(x: float) -> int:
    # Guard against 6.000000001 / 2 -> 4 from float noise.
    return math.ceil(x - 1e-9)


def desired_replicas(current: int, load: float, target: float, tolerance: float) -> int:
    """HPA `AverageValue`: ``ceil(load / target)``, or `current` inside the tolerance band.

    `load` is the total across replicas. With no replicas there is no band: any load asks for
    ``ceil(load / target)`` (at least 1 when load > 0).
    """
    if load < 0 or math.isnan(load):
        raise ValueError(f"load must be a number >= 0, got {load}")
    if current <= 0:
        return max(1, _ceil(load / target)) if load > 0 else 0
    ratio = load / (current * target)
    if abs(ratio - 1.0) <= tolerance:
        return current
    return _ceil(load / target)


def queue_safe_replicas(
    current: int, to: int, waiting: float, running: float, target: float, tolerance: float
) -> int:
    """Fewest replicas in ``[to, current]`` that a queue would not push straight back up.

    Removing ``current - n`` replicas moves their share of the running requests into the queue:
    forecast waiting = ``waiting + (current - n) * running / current``. A count is safe when the
    forecast per replica stays inside the band (``<= target * (1 + tolerance)``). `current`
    always is when the raw recommendation was below it. Without this, a waiting queue (which
    reads 0 at "just enough" and at "far too many") makes a pool under steady load bounce between
    two counts, one a window apart.
    """
    per_replica = running / current if current > 0 else 0.0
    for n in range(max(to, 1), current):
        if waiting + (current - n) * per_replica <= n * target * (1 + tolerance):
            return n
    return current


def clamp(replicas: int, low: int, high: int) -> int:
    return max(low, min(high, replicas))


def scale_down_step_limit(current: int, fraction: float = SCALE_DOWN_MAX_FRACTION) -> int:
    """Fewest replicas one scale-down step may leave: remove at most `fraction`, at least one."""
    return current - max(1, math.floor(current * fraction))


class Stabilizer:
    """Recommendation history of one model (HPA stabilization windows)."""

    def __init__(self, started_at: float) -> None:
        self._history: deque[tuple[float, int]] = deque()
        self._queues: deque[tuple[float, int, float, float]] = deque()
        self.last_change = started_at

    def record_change(self, now: float) -> None:
        self.last_change = now

    def queue_safe(self, now: float, current: int, to: int, window_s: float, policy: ScalingPolicy) -> int:
        """`queue_safe_replicas` over every queue sample of the down-window: the forecast must
        hold at the busiest moment, not only at the instant a scrape happened to catch."""
        safe = to
        for t, replicas, waiting, running in self._queues:
            if t >= now - window_s and replicas == current:
                safe = max(
                    safe, queue_safe_replicas(current, to, waiting, running, policy.target, policy.tolerance)
                )
        return safe

    def record_queue(self, now: float, current: int, waiting: float, running: float, window_s: float) -> None:
        self._queues.append((now, current, waiting, running))
        while self._queues and self._queues[0][0] < now - window_s:
            self._queues.popleft()

    def stabilize(self, now: float, current: int, recommendation: int, policy: ScalingPolicy) -> int:
        """Record `recommendation` and return the stabilized replica count (before bounds)."""
        self._history.append((now, recommendation))
        horizon = now - max(policy.up_window_s, policy.down_window_s)
        while self._history and self._history[0][0] < horizon:
            self._history.popleft()
        up = min(r for t, r in self._history if t >= now - policy.up_window_s)
        down = max(r for t, r in self._history if t >= now - policy.down_window_s)
        result = current
        if up > current:
            result = up
        elif down < current:
            if now - self.last_change < policy.down_window_s:
                return current  # the window has not passed since the last step
            result = max(down, scale_down_step_limit(current, policy.down_max_fraction))
        return result


@dataclass
class ModelState:
    """Memory the autoscaler keeps per model between evaluations."""

    stabilizer: Stabilizer
    last_active: float

    @classmethod
    def start(cls, now: float) -> ModelState:
        return cls(stabilizer=Stabilizer(now), last_active=now)


@dataclass
class PoolState:
    models: dict[str, ModelState] = field(default_factory=dict)

    def model(self, name: str, now: float) -> ModelState:
        if name not in self.models:
            self.models[name] = ModelState.start(now)
        return self.models[name]

    def forget_except(self, names: set[str]) -> None:
        for name in list(self.models):
            if name not in names:
                del self.models[name]


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------


def decide(policy: ScalingPolicy, obs: Observation, state: ModelState, now: float) -> Decision:
    """Next replica count for one model. Updates `state` (history, idle clock, last change).

    Unknown activity (None) on a model with replicas counts as activity: a model is never taken
    to zero on missing data.
    """
    unknown = obs.activity is None and obs.current > 0
    if unknown or (obs.activity or 0) > 0 or obs.demand > 0 or (obs.load or 0) > 0:
        state.last_active = now
    decision = _decide(policy, obs, state, now, idle_for=now - state.last_active)
    if decision.replicas != obs.current:
        state.stabilizer.record_change(now)
        if obs.current == 0:
            state.last_active = now  # a woken model gets the full idle time
    return decision


def _decide(
    policy: ScalingPolicy, obs: Observation, state: ModelState, now: float, idle_for: float
) -> Decision:
    current = obs.current
    load = obs.load if obs.load is not None else 0.0

    # Leaving zero: any demand or load, at once (no window: requests are being turned away).
    if current == 0:
        if obs.demand > 0 or load > 0:
            rec = desired_replicas(0, load, policy.target, policy.tolerance)
            to = clamp(rec, max(1, policy.min_replicas), policy.max_replicas)
            msg = f"router demand {obs.demand:g}, load {load:g} at 0 replicas -> {to}"
            return Decision(to, "ScaledFromZero", msg, rec)
        if policy.zero_allowed:
            return Decision(0, "Idle", "no load and no router demand at 0 replicas", 0)
        return Decision(policy.floor, "BelowMinimum", f"0 replicas is below the minimum {policy.floor}", None)

    # Reaching zero: only through the idle rule.
    if policy.zero_allowed and idle_for >= policy.idle_s:
        msg = f"nothing running, waiting or demanded for {idle_for:.0f}s (>= {policy.idle_s:g}s)"
        return Decision(0, "ScaledToZero", msg, 0)

    rec = desired_replicas(current, load, policy.target, policy.tolerance)
    to = clamp(state.stabilizer.stabilize(now, current, rec, policy), policy.floor, policy.max_replicas)
    forecast = ""
    if obs.running is not None:
        state.stabilizer.record_queue(now, current, load, obs.running, policy.down_window_s)
    if to < current and current <= policy.max_replicas and obs.running is not None:
        safe = state.stabilizer.queue_safe(now, current, to, policy.down_window_s, policy)
        if safe > to:
            forecast = f", queue forecast with {obs.running:g} running keeps {safe}"
            to = safe
    low = 0 if policy.zero_allowed else policy.floor
    message = (
        f"load {load:g} ({load / current:.3g}/replica over {current}, target {policy.target:g}) "
        f"-> recommend {rec}, bounds [{low}, {policy.max_replicas}]{forecast} -> {to}"
    )
    if to > current:
        reason = "ScaledUp"
    elif to < current:
        reason = "ScaledDown"
    elif rec == current:
        reason = "Steady"
    elif rec > current and current >= policy.max_replicas:
        reason = "AtMaximum"
    elif rec < current and current <= policy.floor:
        reason = "AtMinimum"
    elif forecast:
        reason = "QueueForecast"
    else:
        reason = "Stabilizing"
    return Decision(to, reason, message, rec)


def hold(current: int, reason: str, message: str) -> Decision:
    """Keep the replicas as they are (no data, Prometheus trouble, no ready replicas)."""
    return Decision(current, reason, message, None)


# ---------------------------------------------------------------------------------------------
# KEDA
# ---------------------------------------------------------------------------------------------

KEDA_API_VERSION = "keda.sh/v1alpha1"


def deployment_name(pool_name: str, model: str) -> str:
    return f"{pool_name}-{model}"


def scaled_models(spec: ModelPoolSpec) -> list[ModelSpec]:
    """Models the autoscaler manages: deployed ones (not external endpoints)."""
    return [m for m in spec.models if m.model and not m.endpoint]


def desired_scaled_objects(
    pool_name: str, namespace: str, spec: ModelPoolSpec, kinds: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """KEDA `ScaledObject`s for a pool in `mode: keda` ([] otherwise): the same Prometheus signal,
    bounds and windows as the operator's own loop. `kinds`: model -> the kind of its workload
    (`desired.workload_kinds`; default Deployment).

    Triggers: the load query (threshold = target per replica, HPA `AverageValue`), and when the
    model may scale to zero an activity trigger (running + waiting + router demand) whose huge
    threshold makes it ask for one replica while anything is happening: KEDA keeps the model up
    while active, takes it to zero after `cooldownPeriod` (= idleSecondsBeforeZero) of
    inactivity, and wakes it on router demand.
    """
    autoscaling = spec.autoscaling
    if autoscaling is None or not autoscaling.enabled or autoscaling.mode != "keda":
        return []
    objects = []
    for model in scaled_models(spec):
        policy = ScalingPolicy.from_spec(autoscaling, model.replicas)
        name = deployment_name(pool_name, model.name)
        triggers: list[dict[str, Any]] = [
            {
                "type": "prometheus",
                "name": "load",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": prometheus_url(autoscaling),
                    "query": load_query(autoscaling, model.name, namespace, pool_name),
                    "threshold": f"{autoscaling.effective_target:g}",
                    "activationThreshold": "0",
                    "ignoreNullValues": "true",
                },
            }
        ]
        if policy.zero_allowed:
            scope = Scope(namespace, pool_name)
            activity = f"({activity_query(model.name, scope)} or vector(0)) + ({demand_query(model.name, scope)} or vector(0))"
            triggers.append(
                {
                    "type": "prometheus",
                    "name": "activity",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus_url(autoscaling),
                        "query": activity,
                        "threshold": str(ACTIVATION_ONLY_THRESHOLD),
                        "activationThreshold": "0",
                        "ignoreNullValues": "true",
                    },
                }
            )
        down_period = max(1, min(1800, autoscaling.scale_down_stabilization_seconds or 15))
        objects.append(
            {
                "apiVersion": KEDA_API_VERSION,
                "kind": "ScaledObject",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        "app.kubernetes.io/managed-by": "tollway",
                        "tollway.io/pool": pool_name,
                        "tollway.io/model": model.name,
                    },
                },
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": (kinds or {}).get(model.name, "Deployment"),
                        "name": name,
                    },
                    "pollingInterval": autoscaling.interval_seconds,
                    "cooldownPeriod": autoscaling.idle_seconds_before_zero,
                    "minReplicaCount": 0 if policy.zero_allowed else policy.floor,
                    "maxReplicaCount": policy.max_replicas,
                    "advanced": {
                        "horizontalPodAutoscalerConfig": {
                            "behavior": {
                                "scaleUp": {
                                    "stabilizationWindowSeconds": autoscaling.scale_up_stabilization_seconds,
                                },
                                "scaleDown": {
                                    "stabilizationWindowSeconds": autoscaling.scale_down_stabilization_seconds,
                                    "selectPolicy": "Max",
                                    "policies": [
                                        {"type": "Pods", "value": 1, "periodSeconds": down_period},
                                        {
                                            "type": "Percent",
                                            "value": round(SCALE_DOWN_MAX_FRACTION * 100),
                                            "periodSeconds": down_period,
                                        },
                                    ],
                                },
                            }
                        }
                    },
                    "triggers": triggers,
                },
            }
        )
    return objects
