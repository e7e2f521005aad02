"""The autoscaler: one task per ModelPool with `autoscaling` in operator mode.

Every `intervalSeconds` it reads each deployed model's workload (`<pool>-<model>`, a Deployment,
or a StatefulSet for per-replica cache claims), asks Prometheus for the model's load (and, where zero is involved, its activity and the router's
demand), runs the pure decision in `autoscaling.py`, patches `spec.replicas` when it changes, and
writes `status.autoscaling` (its own subtree; the pool's Degraded condition is derived from
`healthy` by the operator's status builder). Events go out on scale decisions and when the
autoscaler's health changes, never every interval.

When Prometheus is down, a query fails or returns nothing, the replicas stay as they are,
`status.autoscaling.healthy` turns false with the reason, and the next good evaluation recovers.

I/O sits behind two small protocols (`ReplicaScaler`, `StatusWriter`) so the whole loop runs in
tests against a real Prometheus with an in-memory Deployment, and in the operator against the
Kubernetes API through the operator's async client (`kube.Kube`, kubernetes.aio).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import kopf

from tollway_operator import autoscaling as decision
from tollway_operator import kube as k
from tollway_operator.api import (
    GROUP,
    VERSION,
    AutoscalingSpec,
    AutoscalingStatus,
    ModelPoolSpec,
    ModelSpec,
    ScaleDecisionStatus,
    SpecError,
    parse_model_pool,
)
from tollway_operator.prometheus import (
    NoData,
    PrometheusClient,
    PrometheusError,
    PrometheusQueryError,
    PrometheusUnavailable,
)
from tollway_operator.status import now_rfc3339

log = logging.getLogger("tollway.autoscaler")

PLURAL = "modelpools"
#: Worst first: the pool's reason is the worst problem any model had.
_PROBLEM_ORDER = ("InvalidSpec", PrometheusUnavailable.reason, PrometheusQueryError.reason, NoData.reason)


# ---------------------------------------------------------------------------------------------
# I/O protocols
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentReplicas:
    replicas: int
    ready: int


class ReplicaScaler(Protocol):
    async def read(self, namespace: str, name: str) -> DeploymentReplicas | None:
        """Current spec.replicas and status.readyReplicas; None when the Deployment is absent."""
        ...

    async def scale(self, namespace: str, name: str, replicas: int) -> None: ...


class StatusWriter(Protocol):
    async def write(self, namespace: str, pool: str, autoscaling: dict[str, Any]) -> None:
        """Merge `autoscaling` into the pool's status.autoscaling."""
        ...


EventPoster = Callable[[str, str, str], None]
"""(type Normal/Warning, reason, message) -> posts an Event on the pool."""


# ---------------------------------------------------------------------------------------------
# One evaluation of one pool
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleChange:
    model: str
    deployment: str
    from_replicas: int
    to_replicas: int
    reason: str
    message: str


@dataclass(frozen=True)
class Evaluation:
    status: AutoscalingStatus
    changes: list[ScaleChange]


@dataclass(frozen=True)
class _Problem:
    reason: str
    message: str


@dataclass
class PoolAutoscaler:
    """State and logic of one pool's autoscaler, independent of kopf.

    `clock` is monotonic seconds (windows, idle time); it is injectable for tests.
    """

    pool: str
    namespace: str
    scaler: ReplicaScaler
    clock: Callable[[], float] = time.monotonic
    query_timeout: float = 5.0
    state: decision.PoolState = field(default_factory=decision.PoolState)
    _clients: dict[str, PrometheusClient] = field(default_factory=dict)

    def prometheus(self, url: str) -> PrometheusClient:
        if url not in self._clients:
            self._clients[url] = PrometheusClient(url, timeout=self.query_timeout)
        return self._clients[url]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def evaluate(self, spec: ModelPoolSpec) -> Evaluation:
        """Evaluate every deployed model once, patch what changes, return the status to write."""
        autoscaling = spec.autoscaling
        if autoscaling is None:
            raise ValueError("evaluate() needs spec.autoscaling")
        stamp = now_rfc3339()
        models = decision.scaled_models(spec)
        self.state.forget_except({m.name for m in models})
        problem = decision.spec_problem(autoscaling)
        if problem:
            return Evaluation(
                AutoscalingStatus(
                    healthy=False, reason="InvalidSpec", message=problem, last_evaluation_time=stamp
                ),
                [],
            )
        client = self.prometheus(decision.prometheus_url(autoscaling) or "")
        results = await asyncio.gather(*(self._evaluate_model(client, autoscaling, m, stamp) for m in models))
        entries: dict[str, ScaleDecisionStatus] = {}
        changes: list[ScaleChange] = []
        problems: dict[str, list[tuple[str, str]]] = {}
        summaries: list[str] = []
        for model, (entry, change, prob, summary) in zip(models, results, strict=True):
            if entry is not None:
                entries[model.name] = entry
            if change is not None:
                changes.append(change)
            if prob is not None:
                problems.setdefault(prob.reason, []).append((model.name, prob.message))
            summaries.append(f"{model.name}: {summary}")
        if problems:
            reason = min(problems, key=lambda r: _PROBLEM_ORDER.index(r) if r in _PROBLEM_ORDER else 99)
            message = _problem_message(reason, problems[reason])
            status = AutoscalingStatus(
                healthy=False, reason=reason, message=message, last_evaluation_time=stamp, models=entries
            )
        else:
            status = AutoscalingStatus(
                healthy=True,
                reason="MetricsAvailable",
                message="; ".join(summaries),
                last_evaluation_time=stamp,
                models=entries,
            )
        return Evaluation(status, changes)

    async def _evaluate_model(
        self, client: PrometheusClient, autoscaling: AutoscalingSpec, model: ModelSpec, stamp: str
    ) -> tuple[ScaleDecisionStatus | None, ScaleChange | None, _Problem | None, str]:
        name = decision.deployment_name(self.pool, model.name)
        current = await self.scaler.read(self.namespace, name)
        if current is None:
            return None, None, None, f"workload {name} not found; waiting for the operator to create it"
        policy = decision.ScalingPolicy.from_spec(autoscaling, model.replicas)
        now = self.clock()
        state = self.state.model(model.name, now)
        try:
            obs = await self._observe(client, autoscaling, model.name, current, policy)
        except PrometheusError as e:
            entry = ScaleDecisionStatus(
                time=stamp, from_replicas=current.replicas, to_replicas=current.replicas, reason=e.reason
            )
            return entry, None, _Problem(e.reason, str(e)), f"holding {current.replicas} ({e.reason})"
        if obs is None:  # no samples because no replica is ready yet: nothing to judge
            entry = ScaleDecisionStatus(
                time=stamp,
                from_replicas=current.replicas,
                to_replicas=current.replicas,
                reason="NoReadyReplicas",
            )
            return entry, None, None, f"holding {current.replicas} (no ready replicas report metrics yet)"
        result = decision.decide(policy, obs, state, now)
        entry = ScaleDecisionStatus(
            time=stamp,
            from_replicas=current.replicas,
            to_replicas=result.replicas,
            value=obs.load,
            reason=result.reason,
        )
        change = None
        if result.replicas != current.replicas:
            await self.scaler.scale(self.namespace, name, result.replicas)
            change = ScaleChange(
                model.name, name, current.replicas, result.replicas, result.reason, result.message
            )
        return entry, change, None, f"{result.reason}: {result.message}"

    async def _observe(
        self,
        client: PrometheusClient,
        autoscaling: AutoscalingSpec,
        model: str,
        current: DeploymentReplicas,
        policy: decision.ScalingPolicy,
    ) -> decision.Observation | None:
        """Query Prometheus; None when the load has no data only because no replica is ready."""
        at_zero = current.replicas == 0
        scope = decision.Scope(self.namespace, self.pool)
        load_q = decision.load_query(autoscaling, model, self.namespace, self.pool)
        queue_metric = autoscaling.metric == "num_requests_waiting"
        queries: dict[str, Awaitable[float]] = {"load": client.value(load_q)}
        if queue_metric:
            queries["running"] = client.value(decision.running_query(model, scope))
        elif policy.zero_allowed and not at_zero:
            queries["activity"] = client.value(decision.activity_query(model, scope))
        if at_zero or policy.zero_allowed:
            queries["demand"] = client.value(decision.demand_query(model, scope))
        raw = await asyncio.gather(*queries.values(), return_exceptions=True)
        values: dict[str, float | None] = {}
        for key, value in zip(queries, raw, strict=True):
            if isinstance(value, NoData):
                values[key] = None
            elif isinstance(value, BaseException):
                raise value
            else:
                values[key] = value
        load = values["load"]
        if load is None and not at_zero:
            if current.ready == 0:
                return None
            raise NoData(
                f"no data for the load of model {model} (query {load_q}) while {current.ready} replicas are ready"
            )
        running = values.get("running")
        activity = values.get("activity")
        if queue_metric and load is not None and running is not None:
            activity = load + running
        return decision.Observation(
            current=current.replicas,
            load=load if load is not None else 0.0,
            activity=activity,
            demand=values.get("demand") or 0.0,
            ready=current.ready,
            running=running,
        )


def _problem_message(reason: str, items: list[tuple[str, str]]) -> str:
    """One line per distinct problem, naming the models it hit."""
    by_message: dict[str, list[str]] = {}
    for model, message in items:
        by_message.setdefault(message, []).append(model)
    parts = [f"{message} (models: {', '.join(models)})" for message, models in by_message.items()]
    text = "; ".join(parts)
    return f"{reason}: holding replicas; {text}"


def status_patch(status: AutoscalingStatus, previous: dict[str, Any] | None) -> dict[str, Any]:
    """status.autoscaling as a merge patch: models gone from the spec are removed (null)."""
    body = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    old_models = (previous or {}).get("models") or {}
    for name in old_models:
        if name not in status.models:
            body["models"][name] = None
    return body


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class HealthTracker:
    """Turns status transitions into Events: one per change, not one per interval."""

    healthy: bool | None = None
    reason: str | None = None

    def events(self, status: AutoscalingStatus) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        if not status.healthy and (self.healthy is not False or self.reason != status.reason):
            out.append(("Warning", status.reason, status.message))
        elif status.healthy and self.healthy is False:
            out.append(("Normal", "AutoscalingRecovered", f"metrics available again ({status.message})"))
        self.healthy, self.reason = status.healthy, status.reason
        return out


async def run_pool(
    autoscaler: PoolAutoscaler,
    read_spec: Callable[[], ModelPoolSpec | None],
    status_writer: StatusWriter,
    post_event: EventPoster,
    stopped: Callable[[], bool],
    wait: Callable[[float], Awaitable[Any]],
    previous_status: Callable[[], dict[str, Any] | None] = lambda: None,
    max_evaluations: int | None = None,
) -> int:
    """Evaluate, write status, post events, wait `intervalSeconds`; until `stopped()`.

    `read_spec` returns the live spec (None: autoscaling off, skip this round). Returns the number
    of evaluations (bounded by `max_evaluations` when given, for tests and benchmarks).
    """
    health = HealthTracker()
    count = 0
    while not stopped() and (max_evaluations is None or count < max_evaluations):
        started = time.monotonic()
        spec = read_spec()
        interval = 15.0
        if spec is not None and spec.autoscaling is not None:
            interval = float(spec.autoscaling.interval_seconds)
            try:
                evaluation = await autoscaler.evaluate(spec)
            except Exception as e:  # an adapter failure (Kubernetes API) must not kill the loop
                log.exception("autoscaler evaluation of %s/%s failed", autoscaler.namespace, autoscaler.pool)
                evaluation = Evaluation(
                    AutoscalingStatus(
                        healthy=False,
                        reason="EvaluationFailed",
                        message=f"{type(e).__name__}: {e}",
                        last_evaluation_time=now_rfc3339(),
                    ),
                    [],
                )
            count += 1
            for change in evaluation.changes:
                post_event(
                    "Normal",
                    change.reason,
                    f"model {change.model}: {change.from_replicas} -> {change.to_replicas} replicas ({change.message})",
                )
            for event in health.events(evaluation.status):
                post_event(*event)
            try:
                await status_writer.write(
                    autoscaler.namespace, autoscaler.pool, status_patch(evaluation.status, previous_status())
                )
            except Exception:
                log.exception(
                    "writing status.autoscaling of %s/%s failed", autoscaler.namespace, autoscaler.pool
                )
        await wait(max(0.0, interval - (time.monotonic() - started)))
    return count


# ---------------------------------------------------------------------------------------------
# Kubernetes adapters (the operator's own async client, `kube.Kube`)
# ---------------------------------------------------------------------------------------------


class KubeReplicaScaler:
    """Reads and merge-patches a model workload's spec.replicas through the Kubernetes API: its
    Deployment, or its StatefulSet (a model with per-replica cache claims)."""

    def __init__(self, kube: k.Kube) -> None:
        self._kube = kube
        self._kinds: dict[tuple[str, str], k.Kind] = {}

    async def read(self, namespace: str, name: str) -> DeploymentReplicas | None:
        known = self._kinds.get((namespace, name))
        kinds = [known] if known else []
        kinds += [kind for kind in k.WORKLOAD_KINDS.values() if kind != known]
        for kind in kinds:
            body = await self._kube.get(kind, namespace, name)
            if body is not None:
                self._kinds[namespace, name] = kind
                spec = body.get("spec") or {}
                status = body.get("status") or {}
                return DeploymentReplicas(int(spec.get("replicas", 1)), int(status.get("readyReplicas") or 0))
        return None

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        kind = self._kinds.get((namespace, name), k.DEPLOYMENT)
        await self._kube.patch(kind, namespace, name, {"spec": {"replicas": replicas}})


class KubeStatusWriter:
    """Merge-patches status.autoscaling through the ModelPool's status subresource."""

    def __init__(self, kube: k.Kube) -> None:
        self._kube = kube

    async def write(self, namespace: str, pool: str, autoscaling: dict[str, Any]) -> None:
        await self._kube.patch_status(k.MODELPOOL, namespace, pool, {"autoscaling": autoscaling})


# ---------------------------------------------------------------------------------------------
# kopf wiring
# ---------------------------------------------------------------------------------------------


def _operator_mode(spec: Any) -> bool:
    autoscaling = (spec or {}).get("autoscaling") or {}
    return (
        bool(autoscaling)
        and autoscaling.get("enabled", True)
        and autoscaling.get("mode", "operator") == "operator"
    )


def _live_spec(spec: Any) -> ModelPoolSpec | None:
    try:
        parsed = parse_model_pool(dict(spec))
    except SpecError as e:
        log.warning("autoscaler skips an invalid ModelPool spec: %s", e)
        return None
    a = parsed.autoscaling
    if a is None or not a.enabled or a.mode != "operator":
        return None
    return parsed


@dataclass
class _RunningPool:
    """One pool's autoscaler task and the pool as last seen in the watch stream."""

    body: dict[str, Any]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class PoolAutoscalers:
    """One autoscaler task per ModelPool in operator mode, started, fed and stopped from the pools'
    watch events.

    Not a `kopf.daemon`: kopf puts a finalizer on every object a daemon runs for, and a pool with
    a finalizer cannot be deleted (nor its namespace) once the operator is gone, e.g. after
    `helm uninstall`. Nothing here needs to run at deletion: the Deployments go with their pool.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], _RunningPool] = {}
        self._kube: k.Kube | None = None
        self._connecting = asyncio.Lock()

    async def kube(self) -> k.Kube:
        """The API client every pool's task shares, connected on first use."""
        async with self._connecting:
            if self._kube is None:
                self._kube = k.Kube(await k.connect())
            return self._kube

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        """Take one watch event of a pool: start, update or stop its autoscaler."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        wanted = (
            event_type != "DELETED" and not meta.get("deletionTimestamp") and _operator_mode(body.get("spec"))
        )
        running = self._pools.get(key)
        if not wanted:
            if running is not None:
                self._stop(key)
            return
        if running is not None and running.task is not None and not running.task.done():
            running.body = body  # the task reads the spec and status from here
            return
        running = _RunningPool(body)
        running.task = asyncio.get_running_loop().create_task(self._run(key, running))
        self._pools[key] = running

    def _stop(self, key: tuple[str, str]) -> None:
        running = self._pools.pop(key, None)
        if running is not None:
            running.stop.set()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every task (bounded), then close the client."""
        tasks = [p.task for p in self._pools.values() if p.task is not None]
        for key in list(self._pools):
            self._stop(key)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._kube is not None:
            kube, self._kube = self._kube, None
            await kube.close()

    async def _run(self, key: tuple[str, str], running: _RunningPool) -> None:
        namespace, name = key
        kube = await self.kube()
        autoscaler = PoolAutoscaler(pool=name, namespace=namespace, scaler=KubeReplicaScaler(kube))

        def post(kind: str, reason: str, message: str) -> None:
            with contextlib.suppress(LookupError):  # no kopf event queue (outside the operator)
                (kopf.warn if kind == "Warning" else kopf.info)(
                    running.body, reason=reason, message=message[:1000]
                )

        async def wait(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running.stop.wait(), seconds)

        try:
            await run_pool(
                autoscaler,
                read_spec=lambda: _live_spec(running.body.get("spec") or {}),
                status_writer=KubeStatusWriter(kube),
                post_event=post,
                stopped=running.stop.is_set,
                wait=wait,
                previous_status=lambda: dict((running.body.get("status") or {}).get("autoscaling") or {}),
            )
        except Exception:  # run_pool keeps going on errors; anything else ends this pool's loop
            log.exception("the autoscaler of %s/%s stopped", namespace, name)
        finally:
            with contextlib.suppress(Exception):
                await autoscaler.aclose()
            if self._pools.get(key) is running:
                self._pools.pop(key, None)


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PoolAutoscalers] = weakref.WeakKeyDictionary()
"""One registry per operator, i.e. per event loop (tests run several operators in one process)."""


def autoscalers() -> PoolAutoscalers:
    loop = asyncio.get_running_loop()
    if loop not in _BY_LOOP:
        _BY_LOOP[loop] = PoolAutoscalers()
    return _BY_LOOP[loop]


@kopf.on.event(GROUP, VERSION, PLURAL)
async def autoscaler_pool_event(event: Mapping[str, Any], **_: Any) -> None:
    """Every watch event of a pool (the initial listing included) feeds its autoscaler."""
    body = event.get("object")
    if isinstance(body, Mapping):
        autoscalers().observe(event.get("type"), dict(body))


@kopf.on.cleanup()
async def stop_autoscalers(**_: Any) -> None:
    registry = _BY_LOOP.pop(asyncio.get_running_loop(), None)
    if registry is not None:
        await registry.close()
