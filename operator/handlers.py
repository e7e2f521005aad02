"""kopf handlers: thin glue between kopf's events and the pure desired-state/status functions.

One reconcile per custom resource, run under a per-object lock, from any of these triggers:
- kopf's create / update / resume handlers (a bad spec raises `kopf.PermanentError`, so kopf
  does not retry until the spec changes; a policy waiting for its pool raises
  `kopf.TemporaryError`, retried every `TOLLWAY_OPERATOR_RETRY_SECONDS`);
- a resync loop every `TOLLWAY_OPERATOR_RESYNC_SECONDS` over every pool and policy kopf has
  indexed (drift repair, missed events, waiting policies) — one loop rather than kopf timers,
  because kopf puts a finalizer on every object with a timer;
- events of the children themselves (a child deleted or edited by hand, a Deployment's ready
  replicas changing): the owner is reconciled after a short debounce;
- a ModelPool change or deletion re-reconciles the RoutingPolicies that reference it (kopf index
  `policies_by_pool`), so a policy created before its pool recovers as soon as the pool appears.

No finalizers of ours: children carry ownerReferences, so the API server's garbage collector deletes them
with their owner. Status is written with merge patches to the status subresource; the operator
never writes `status.autoscaling` (the autoscaler's subtree).

Environment (set by `tollway operator`, see run.py):
TOLLWAY_OPERATOR_RESYNC_SECONDS (60), TOLLWAY_OPERATOR_RETRY_SECONDS (15),
TOLLWAY_OPERATOR_DEBOUNCE_SECONDS (0.2), TOLLWAY_OPERATOR_METRICS_PORT (unset: no metrics server),
TOLLWAY_OPERATOR_METRICS_HOST (0.0.0.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from tollway_operator import desired as d
from tollway_operator import kube as k
from tollway_operator import metrics, status
from tollway_operator.api import (
    GROUP,
    VERSION,
    ModelPoolSpec,
    SpecError,
    parse_model_pool,
    parse_routing_policy,
)

try:  # owned by the autoscaling work; the operator runs without it
    from tollway_operator.autoscaling import desired_scaled_objects
except ImportError:  # pragma: no cover
    desired_scaled_objects = None

log = logging.getLogger("tollway.operator")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


RESYNC_SECONDS = _env_float("TOLLWAY_OPERATOR_RESYNC_SECONDS", 60.0)
RETRY_SECONDS = _env_float("TOLLWAY_OPERATOR_RETRY_SECONDS", 15.0)
DEBOUNCE_SECONDS = _env_float("TOLLWAY_OPERATOR_DEBOUNCE_SECONDS", 0.2)
POOLS = "modelpools"
POLICIES = "routingpolicies"
MANAGED_CHILD = {d.LABEL_MANAGED_BY: d.MANAGED_BY}
POOL_CHILD_KINDS = (k.DEPLOYMENT, k.SERVICE, k.PVC, k.SCALED_OBJECT)
POLICY_CHILD_KINDS = (k.CONFIGMAP, k.DEPLOYMENT, k.SERVICE, k.PDB)


@dataclass
class Outcome:
    """How a reconcile ended: ok, invalid (permanent until the spec changes), waiting (for
    something else to change), error (API trouble: retry)."""

    state: str = "ok"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class OperatorState:
    kube: k.Kube | None = None
    locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    pending: dict[tuple[str, str, str], asyncio.Task[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    policies_index: Any = None
    pools_index: Any = None
    resync_task: asyncio.Task[None] | None = None
    last_reconciled: dict[tuple[str, str, str], float] = field(default_factory=dict)
    keda_absent_until: float = 0.0
    stopping: bool = False

    def lock(self, key: tuple[str, str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


STATE = OperatorState()


def _kube() -> k.Kube:
    if STATE.kube is None:
        raise RuntimeError("the operator's API client is not connected (startup handler did not run)")
    return STATE.kube


# ---------------------------------------------------------------------------------------------
# Operator lifecycle
# ---------------------------------------------------------------------------------------------


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """kopf's client-library login, honouring $KUBECONFIG as it is now (the client library reads it
    once at import, which may predate it in tests and wrappers)."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        import kubernetes.config.kube_config as kube_config

        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in our own annotations and out of `status` (the CRD's status schema
    # is ours; a real API server would prune unknown fields there).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Events: ours are explicit (kopf.event); kopf's own log lines and the autoscaler's
    # kopf.info() calls are posted from INFO (kopf's default), so scale decisions show up too.
    settings.posting.level = logging.INFO
    # One-time API discovery instead of watching CRDs and Namespaces: the chart's least-privilege
    # RBAC grants neither (namespaces are named explicitly or all are watched; the CRDs come first).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    STATE.stopping = False
    STATE.kube = k.Kube(await k.connect())
    if settings.peering.mandatory and not settings.peering.standalone:
        namespaces = [n for n in os.environ.get("TOLLWAY_OPERATOR_NAMESPACES", "").split(",") if n]
        await ensure_peering(STATE.kube, settings.peering.name, settings.peering.clusterwide, namespaces)
    STATE.resync_task = asyncio.get_running_loop().create_task(resync_loop())
    STATE.tasks.add(STATE.resync_task)
    STATE.resync_task.add_done_callback(STATE.tasks.discard)
    port = os.environ.get("TOLLWAY_OPERATOR_METRICS_PORT", "")
    if port:
        metrics.serve(int(port), os.environ.get("TOLLWAY_OPERATOR_METRICS_HOST", "0.0.0.0"))


async def ensure_peering(kube: k.Kube, name: str, clusterwide: bool, namespaces: list[str]) -> list[str]:
    """Create the kopf peering object(s) the replicas elect a leader in, when missing (a Helm
    release cannot hold kopf's new CRDs and their objects at once). Returns what was created.
    Namespace globs cannot be resolved here and are skipped."""
    created = []
    if clusterwide:
        targets = [(k.CLUSTER_KOPF_PEERING, None)]
    else:
        targets = [(k.KOPF_PEERING, ns) for ns in namespaces if not any(c in ns for c in "*?![]")]
    for kind, namespace in targets:
        meta: dict[str, Any] = {"name": name, "labels": d.common_labels()}
        if namespace:
            meta["namespace"] = namespace
        try:
            await kube.create({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta})
            created.append(f"{kind.kind} {namespace + '/' if namespace else ''}{name}")
        except k.ApiError as e:
            if e.status == 409:
                continue
            log.error(
                "cannot create the peering object %s %s (%s: %s); install kopf's peering CRDs "
                "(kopf.dev) or run with --standalone",
                kind.kind, name, e.reason, e.message,
            )  # fmt: skip
    for what in created:
        log.info("created the peering object %s", what)
    return created


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    STATE.stopping = True
    tasks = list(STATE.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    STATE.pending.clear()
    # Wait (bounded) for reconciles in flight, e.g. in timers, before closing their client.
    for lock in list(STATE.locks.values()):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await lock.acquire()
                lock.release()
    if STATE.kube is not None:
        await STATE.kube.close()
        STATE.kube = None
    metrics.shutdown()


@kopf.on.probe(id="managed")
def managed_objects(**_: Any) -> dict[str, int]:
    """Reported on the liveness endpoint (`--liveness`)."""
    return {"locks": len(STATE.locks), "pending": len(STATE.pending)}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _post(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    with contextlib.suppress(LookupError):  # outside kopf's context (unit use): no event queue
        kopf.event(dict(body), type=type_, reason=reason, message=message[:1000])


def _warn_on_change(
    body: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    reason: str,
    message: str,
) -> None:
    """A Warning Event when the Ready condition's reason or message changes (not every resync)."""
    old = status.find_condition((previous or {}).get("conditions"), status.READY) or {}
    if old.get("reason") != reason or old.get("message") != message:
        _post(body, "Warning", reason, message)


async def _write_status(
    kind: k.Kind, body: Mapping[str, Any], previous: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> None:
    if previous and k.contains(previous, new):
        return
    meta = body["metadata"]
    await _kube().patch_status(kind, meta["namespace"], meta["name"], new)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


Children = dict[tuple[str, str], dict[str, Any]]
"""Live children by (kind, name)."""


async def _list_children(body: Mapping[str, Any], kinds: tuple[k.Kind, ...], selector: str) -> Children:
    """One LIST per kind: the live children of an owner (by label and owner uid)."""
    kube = _kube()
    meta = body["metadata"]
    out: Children = {}
    for kind in kinds:
        if kind == k.SCALED_OBJECT and time.monotonic() < STATE.keda_absent_until:
            continue
        try:
            items = await kube.list(kind, meta["namespace"], selector)
        except k.ApiError as e:
            if e.status == 404 and kind == k.SCALED_OBJECT:
                STATE.keda_absent_until = time.monotonic() + 300
                continue
            raise
        for obj in items:
            if _owned_by(obj, meta.get("uid", "")):
                out[kind.kind, obj["metadata"]["name"]] = obj
    return out


async def _apply_all(body: Mapping[str, Any], children: list[dict[str, Any]], live: Children) -> Children:
    """Apply children in order against their live state; returns the resulting objects."""
    kube = _kube()
    out: Children = {}
    for child in children:
        key = (child["kind"], child["metadata"]["name"])
        try:
            result, obj = await kube.apply(child, live.get(key))
        except k.ApiError as e:
            if k.kind_of(child) == k.SCALED_OBJECT and e.status == 404:
                raise k.ApiError(
                    404,
                    "KedaNotInstalled",
                    "autoscaling.mode is keda but the KEDA ScaledObject API is not installed",
                ) from None
            raise
        out[key] = obj
        if result != "unchanged":
            log.info(
                "%s %s/%s %s", child["kind"], body["metadata"]["namespace"], child["metadata"]["name"], result
            )
            metrics.CHILD_CHANGES.labels(child["kind"], result).inc()
            verb = "Created" if result == "created" else "Updated"
            _post(body, "Normal", verb, f"{verb} {child['kind']} {child['metadata']['name']}")
    return out


async def _prune(body: Mapping[str, Any], live: Children, keep: Children) -> None:
    """Delete live children that the desired state no longer has."""
    kube = _kube()
    namespace = body["metadata"]["namespace"]
    for (kind_name, name), obj in live.items():
        if (kind_name, name) in keep:
            continue
        if await kube.delete(k.kind_of(obj), namespace, name):
            metrics.CHILD_CHANGES.labels(kind_name, "deleted").inc()
            _post(body, "Normal", "Deleted", f"Deleted {kind_name} {name} (no longer in the spec)")


@functools.lru_cache(maxsize=1)
def builtin_profile_quality() -> dict[str, float]:
    """Mean quality per profile in the shipped routing history (for budget splits)."""
    import numpy as np

    from router_service.history import load_builtin_history

    history = load_builtin_history()
    means = np.nanmean(history.scores, axis=0)
    return {m: float(q) for m, q in zip(history.models, means, strict=True) if not math.isnan(q)}


# ---------------------------------------------------------------------------------------------
# ModelPool
# ---------------------------------------------------------------------------------------------


CONFLICT_ATTEMPTS = 3


async def _run_reconcile(
    kind: k.Kind, state_key: str, namespace: str, name: str, trigger: str, body_fn: Any
) -> Outcome:
    """Reconcile one custom resource under its lock: fetch it fresh, run `body_fn(body)`, retry on
    write conflicts (someone changed a child meanwhile), and report API failures in its status."""
    started = time.monotonic()
    outcome = Outcome()
    if STATE.stopping:
        return outcome
    async with STATE.lock((state_key, namespace, name)):
        try:
            for attempt in range(1, CONFLICT_ATTEMPTS + 1):
                if STATE.stopping:
                    return outcome
                body = await _kube().get(kind, namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return outcome
                STATE.last_reconciled[state_key, namespace, name] = time.monotonic()
                try:
                    outcome = await body_fn(body)
                    break
                except k.ApiError as e:
                    if e.status == 409 and attempt < CONFLICT_ATTEMPTS:
                        log.info(
                            "%s %s/%s: conflict (%s); reconciling again",
                            kind.kind,
                            namespace,
                            name,
                            e.message,
                        )
                        continue
                    outcome = Outcome("error", f"{e.reason}: {e.message}")
                    previous = body.get("status") or {}
                    generation = body["metadata"].get("generation")
                    new = status.failed_status(
                        previous, "ReconcileFailed", outcome.message, generation, status.now_rfc3339()
                    )
                    _warn_on_change(body, previous, {}, "ReconcileFailed", outcome.message)
                    with contextlib.suppress(k.ApiError):
                        await _write_status(kind, body, previous, new)
        except k.ApiError as e:  # fetching the object itself failed
            outcome = Outcome("error", f"{e.reason}: {e.message}")
        finally:
            metrics.DURATION.labels(kind.kind).observe(time.monotonic() - started)
            metrics.RECONCILES.labels(kind.kind, trigger, outcome.state).inc()
    if not outcome.ok:
        metrics.ERRORS.labels(kind.kind, "InvalidSpec" if outcome.state == "invalid" else outcome.state).inc()
    return outcome


async def reconcile_pool(namespace: str, name: str, trigger: str, refresh: bool = True) -> Outcome:
    outcome = await _run_reconcile(k.MODELPOOL, "pool", namespace, name, trigger, _reconcile_pool)
    if refresh:
        await refresh_policies(namespace, name)
    return outcome


async def _reconcile_pool(body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    previous = body.get("status") or {}
    now = status.now_rfc3339()
    try:
        spec = parse_model_pool(body.get("spec") or {})
        d.check_pool_names(name, spec)
    except SpecError as e:
        message = str(e)
        new = status.invalid_status(previous, message, generation, now)
        _warn_on_change(body, previous, new, "InvalidSpec", message)
        await _write_status(k.MODELPOOL, body, previous, new)
        return Outcome("invalid", message)
    owner = d.Owner.from_body(body)
    live = await _list_children(body, POOL_CHILD_KINDS, d.pool_children_selector(name))
    live_replicas = {
        m.name: int(live["Deployment", d.model_child_name(name, m.name)].get("spec", {}).get("replicas", 1))
        for m in d.deployed_models(spec)
        if ("Deployment", d.model_child_name(name, m.name)) in live
    }
    scaled: list[dict[str, Any]] = []
    if d.autoscaling_mode(spec) == "keda" and desired_scaled_objects is not None:
        scaled = desired_scaled_objects(name, namespace, spec)
    children = d.pool_children(owner, spec, live_replicas, scaled)
    applied = await _apply_all(body, children, live)
    await _prune(body, live, applied)
    deployments = {n: obj for (kind, n), obj in applied.items() if kind == "Deployment"}
    new = status.pool_status(
        name, namespace, spec, deployments, previous.get("autoscaling"), previous, generation, now
    )
    await _write_status(k.MODELPOOL, body, previous, new)
    return Outcome()


def _raise_for(outcome: Outcome) -> None:
    if outcome.state == "invalid":
        raise kopf.PermanentError(outcome.message)
    if outcome.state in ("waiting", "error"):
        raise kopf.TemporaryError(outcome.message, delay=RETRY_SECONDS)


@kopf.on.resume(GROUP, VERSION, POOLS)
@kopf.on.create(GROUP, VERSION, POOLS)
@kopf.on.update(GROUP, VERSION, POOLS)
async def pool_changed(
    namespace: str,
    name: str,
    reason: str,
    policies_by_pool: kopf.Index,
    pools_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    remember_indexes(policies_by_pool, pools_by_namespace)
    _raise_for(await reconcile_pool(namespace, name, str(reason)))


@kopf.on.event(GROUP, VERSION, POOLS)
async def pool_event(
    event: Mapping[str, Any],
    namespace: str,
    name: str,
    policies_by_pool: kopf.Index,
    pools_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    """A deleted pool: its children go by garbage collection; its policies must say so."""
    remember_indexes(policies_by_pool, pools_by_namespace)
    if event.get("type") == "DELETED":
        metrics.RECONCILES.labels("ModelPool", "deleted", "ok").inc()
        forget("pool", namespace, name)
        await refresh_policies(namespace, name)


# ---------------------------------------------------------------------------------------------
# RoutingPolicy
# ---------------------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, POOLS)
def pools_by_namespace(namespace: str, name: str, **_: Any) -> dict[str, str]:
    return {namespace: name}


@kopf.index(GROUP, VERSION, POLICIES)
def policies_by_pool(
    namespace: str, name: str, spec: Mapping[str, Any], **_: Any
) -> dict[tuple[str, str], str]:
    pool = (spec.get("poolRef") or {}).get("name") or ""
    return {(namespace, pool): name}


async def refresh_policies(namespace: str, pool: str) -> None:
    """Re-reconcile the policies that reference a pool (after the pool changed)."""
    if STATE.stopping:
        return
    index = STATE.policies_index
    if index is not None:
        names = sorted(set(index.get((namespace, pool), [])))
    else:  # before any handler handed us the index: ask the API
        names = sorted(
            p["metadata"]["name"]
            for p in await _kube().list(k.ROUTINGPOLICY, namespace)
            if (p.get("spec", {}).get("poolRef") or {}).get("name") == pool
        )
    for name in names:
        await reconcile_policy(namespace, name, "pool")


async def reconcile_policy(namespace: str, name: str, trigger: str) -> Outcome:
    return await _run_reconcile(k.ROUTINGPOLICY, "policy", namespace, name, trigger, _reconcile_policy)


async def _reconcile_policy(body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    previous = body.get("status") or {}
    now = status.now_rfc3339()

    async def wait(reason: str, message: str) -> Outcome:
        new = status.waiting_policy_status(previous, reason, message, generation, now)
        _warn_on_change(body, previous, new, reason, message)
        await _write_status(k.ROUTINGPOLICY, body, previous, new)
        return Outcome("waiting", message)

    async def invalid(message: str) -> Outcome:
        new = status.invalid_status(previous, message, generation, now)
        _warn_on_change(body, previous, new, "InvalidSpec", message)
        await _write_status(k.ROUTINGPOLICY, body, previous, new)
        return Outcome("invalid", message)

    try:
        spec = parse_routing_policy(body.get("spec") or {})
        d.check_policy_names(name)
    except SpecError as e:
        return await invalid(str(e))
    kube = _kube()
    pool_name = spec.pool_ref.name
    pool = await kube.get(k.MODELPOOL, namespace, pool_name)
    if pool is None:
        return await wait(
            "PoolNotFound",
            f"ModelPool {pool_name!r} (spec.poolRef.name) does not exist in namespace {namespace!r}",
        )
    try:
        pool_spec: ModelPoolSpec = parse_model_pool(pool.get("spec") or {})
    except SpecError as e:
        return await wait("PoolInvalid", f"ModelPool {pool_name!r} is invalid: {e}")
    deployments = await kube.list(k.DEPLOYMENT, namespace, d.pool_children_selector(pool_name))
    ready_by_name = {
        o["metadata"]["name"]: int((o.get("status") or {}).get("readyReplicas", 0) or 0) for o in deployments
    }
    zero_by_name = {
        o["metadata"]["name"] for o in deployments if int(o.get("spec", {}).get("replicas", 1)) == 0
    }
    ready = {
        m.name: ready_by_name.get(d.model_child_name(pool_name, m.name), 0)
        for m in d.deployed_models(pool_spec)
    }
    scaled_to_zero = {
        m.name for m in d.deployed_models(pool_spec) if d.model_child_name(pool_name, m.name) in zero_by_name
    }
    quality = None
    if spec.budgets is not None and spec.budgets.total_tokens is not None and spec.history.builtin:
        quality = builtin_profile_quality()
    owner = d.Owner.from_body(body)
    try:
        plan = d.policy_children(owner, spec, pool_name, pool_spec, ready, quality)
    except d.PolicyReferenceError as e:
        return await wait(e.reason, e.message)
    except (ValidationError, ValueError) as e:
        return await invalid(f"the router config built from this policy is invalid: {e}")
    live = await _list_children(body, POLICY_CHILD_KINDS, d.policy_children_selector(name))
    applied = await _apply_all(body, plan.children, live)
    await _prune(body, live, applied)
    router = applied.get(("Deployment", d.router_child_name(name)))
    backends_ready = {b.name: b.replicas for b in plan.config.backends}
    new = status.policy_status(
        name,
        namespace,
        router,
        backends_ready,
        plan.budgets.tokens,
        previous,
        generation,
        now,
        plan.budgets.notes,
        scaled_to_zero,
    )
    await _write_status(k.ROUTINGPOLICY, body, previous, new)
    return Outcome()


@kopf.on.event(GROUP, VERSION, POLICIES)
async def policy_event(event: Mapping[str, Any], namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        metrics.RECONCILES.labels("RoutingPolicy", "deleted", "ok").inc()
        forget("policy", namespace, name)


@kopf.on.resume(GROUP, VERSION, POLICIES)
@kopf.on.create(GROUP, VERSION, POLICIES)
@kopf.on.update(GROUP, VERSION, POLICIES)
async def policy_changed(
    namespace: str,
    name: str,
    reason: str,
    policies_by_pool: kopf.Index,
    pools_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    remember_indexes(policies_by_pool, pools_by_namespace)
    _raise_for(await reconcile_policy(namespace, name, str(reason)))


# ---------------------------------------------------------------------------------------------
# Periodic resync (drift repair, waiting policies)
# ---------------------------------------------------------------------------------------------


def forget(kind: str, namespace: str, name: str) -> None:
    """Drop the bookkeeping of a deleted object."""
    key = (kind, namespace, name)
    STATE.last_reconciled.pop(key, None)
    lock = STATE.locks.get(key)
    if lock is not None and not lock.locked():
        STATE.locks.pop(key, None)


def remember_indexes(policies: Any, pools: Any) -> None:
    """kopf hands indexes to resource handlers only; keep them for the resync loop."""
    STATE.policies_index = policies
    STATE.pools_index = pools


async def resync_once() -> None:
    """Reconcile every known pool and policy once (from kopf's indexes)."""
    pools = sorted((ns, n) for ns, names in (STATE.pools_index or {}).items() for n in set(names))
    policies = sorted({(ns, n) for (ns, _pool), names in (STATE.policies_index or {}).items() for n in names})
    fresh_after = time.monotonic() - RESYNC_SECONDS / 2  # skip what a recent event already reconciled
    for namespace, name in pools:
        if STATE.last_reconciled.get(("pool", namespace, name), 0.0) < fresh_after:
            await reconcile_pool(namespace, name, "resync", refresh=False)
    for namespace, name in policies:
        if STATE.last_reconciled.get(("policy", namespace, name), 0.0) < fresh_after:
            await reconcile_policy(namespace, name, "resync")


async def resync_loop() -> None:
    """One loop instead of per-object kopf timers: kopf puts a finalizer on every object with a
    timer, which would block deleting pools while the operator is down."""
    while not STATE.stopping:
        await asyncio.sleep(RESYNC_SECONDS)
        try:
            await resync_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic resync failed; retrying in %.0f s", RESYNC_SECONDS)


# ---------------------------------------------------------------------------------------------
# Children: drift repair on their events
# ---------------------------------------------------------------------------------------------


def owner_of_child(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """("pool", name) or ("policy", name) for a child's labels, None if not ours."""
    if labels.get(d.LABEL_MANAGED_BY) != d.MANAGED_BY:
        return None
    if labels.get(d.LABEL_COMPONENT) == d.COMPONENT_ROUTER and labels.get(d.LABEL_POLICY):
        return "policy", labels[d.LABEL_POLICY]
    if labels.get(d.LABEL_COMPONENT) == d.COMPONENT_MODEL and labels.get(d.LABEL_POOL):
        return "pool", labels[d.LABEL_POOL]
    return None


def schedule(kind: str, namespace: str, name: str) -> None:
    """Reconcile an owner soon; events arriving meanwhile are coalesced into one reconcile."""
    key = (kind, namespace, name)
    task = STATE.pending.get(key)
    if (task is not None and not task.done()) or STATE.stopping:
        return
    task = asyncio.get_running_loop().create_task(_debounced(key))
    STATE.pending[key] = task
    STATE.tasks.add(task)
    task.add_done_callback(STATE.tasks.discard)


async def _debounced(key: tuple[str, str, str]) -> None:
    await asyncio.sleep(DEBOUNCE_SECONDS)
    STATE.pending.pop(key, None)
    kind, namespace, name = key
    log.info("reconciling %s %s/%s after a child event", kind, namespace, name)
    try:
        if kind == "pool":
            await reconcile_pool(namespace, name, "child")
        else:
            await reconcile_policy(namespace, name, "child")
    except Exception:  # a background task must not die silently
        log.exception("reconcile of %s %s/%s after a child event failed", kind, namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_CHILD)
@kopf.on.event("v1", "services", labels=MANAGED_CHILD)
@kopf.on.event("v1", "configmaps", labels=MANAGED_CHILD)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED_CHILD)
async def child_event(event: Mapping[str, Any], labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    owner = owner_of_child(labels)
    if owner is not None and event.get("type") in ("ADDED", "MODIFIED", "DELETED", None):
        schedule(owner[0], namespace, owner[1])
