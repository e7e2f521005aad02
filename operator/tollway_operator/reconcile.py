"""One reconcile of a ModelPool or a RoutingPolicy: read it, compute the desired children with the
pure functions in `desired/`, apply them, prune the rest, write `status`.

A pool's calibration Jobs (`desired/calibration.py`) are reconciled with it: the Jobs are listed
and pruned apart from the model children (their own label selector), their pods' termination
messages become `status.calibration`, and a policy's router learns each model's expected
calibration revision from that status.

Each reconcile runs under the object's lock, fetches the object fresh, retries on write conflicts
and reports API failures in the object's status. A ModelPool change re-reconciles the policies that
reference it, so a policy created before its pool recovers as soon as the pool appears.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from tollway_operator import desired as d
from tollway_operator import kube as k
from tollway_operator import metrics, state, status
from tollway_operator.api import ModelPoolSpec, SpecError, parse_model_pool, parse_routing_policy
from tollway_operator.children import (
    apply_children,
    list_children,
    post_event,
    prune_children,
    warn_on_change,
    write_status,
)
from tollway_operator.state import POLICY_CHILD_KINDS, POOL_CHILD_KINDS, STATE, Outcome, kube_client

try:  # owned by the autoscaling work; the operator runs without it
    from tollway_operator.autoscaling import desired_scaled_objects
except ImportError:  # pragma: no cover
    desired_scaled_objects = None

log = logging.getLogger("tollway.operator")


@functools.lru_cache(maxsize=1)
def builtin_profile_quality() -> dict[str, float]:
    """Mean quality per profile in the shipped routing history (for budget splits)."""
    import numpy as np

    from router_service.routing.history import load_builtin_history

    history = load_builtin_history()
    means = np.nanmean(history.scores, axis=0)
    return {m: float(q) for m, q in zip(history.models, means, strict=True) if not math.isnan(q)}


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
                body = await kube_client().get(kind, namespace, name)
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
                    warn_on_change(body, previous, "ReconcileFailed", outcome.message)
                    with contextlib.suppress(k.ApiError):
                        await write_status(kind, body, previous, new)
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
        warn_on_change(body, previous, "InvalidSpec", message)
        await write_status(k.MODELPOOL, body, previous, new)
        return Outcome("invalid", message)
    owner = d.Owner.from_body(body)
    simulate_default = state.simulate_default()
    kinds = d.workload_kinds(spec, simulate_default)
    live = await list_children(body, POOL_CHILD_KINDS, d.pool_children_selector(name))
    live_workloads = {
        m.name: obj
        for m in d.deployed_models(spec)
        if (obj := live.get((kinds[m.name], d.model_child_name(name, m.name)))) is not None
    }
    live_replicas = {m: int(obj.get("spec", {}).get("replicas", 1)) for m, obj in live_workloads.items()}
    claim_templates = {
        m: templates[0].get("spec") or {}
        for m, obj in live_workloads.items()
        if (templates := obj.get("spec", {}).get("volumeClaimTemplates"))
    }
    scaled: list[dict[str, Any]] = []
    if d.autoscaling_mode(spec) == "keda" and desired_scaled_objects is not None:
        scaled = desired_scaled_objects(name, namespace, spec, kinds)
    children = d.pool_children(
        owner,
        spec,
        live_replicas,
        scaled,
        simulate_default=simulate_default,
        live_claim_templates=claim_templates,
    )
    claims = await _cache_claims(namespace, name, spec, simulate_default)
    # A retained shared claim has no owner, so it is not a listed child: it exists all the same.
    unowned = {
        (k.PVC.kind, c["metadata"]["name"]): c
        for c in claims or []
        if (k.PVC.kind, c["metadata"]["name"]) not in live
    }
    applied = await apply_children(body, children, {**unowned, **live})
    retained = {key: obj for key, obj in live.items() if key[0] == k.PVC.kind and d.claim_retained(spec, obj)}
    await prune_children(body, live, {**retained, **applied})
    workloads = {n: obj for (kind, n), obj in applied.items() if kind in k.WORKLOAD_KINDS}
    problems = {}
    views = [status.DeploymentView.from_object(obj) for obj in workloads.values()]
    if any(v.rolling or not v.available for v in views):
        # Why a model's pods do not run (the scheduler's, the kubelet's reason): one LIST, only then.
        pods = await kube_client().list(k.POD, namespace, d.pool_children_selector(name))
        problems = status.pod_problems(pods)
    cache = await _reconcile_cache_sizes(namespace, spec, claims) if claims is not None else None
    new = status.pool_status(
        name,
        namespace,
        spec,
        workloads,
        previous.get("autoscaling"),
        previous,
        generation,
        now,
        problems,
        cache,
    )
    new["calibration"] = await _reconcile_calibration(body, spec, workloads, now)
    ready = status.find_condition(new["conditions"], status.READY) or {}
    if problems:  # a model that cannot start, e.g. too many GPUs: a Warning once, not every resync
        warn_on_change(body, previous, str(ready.get("reason")), str(ready.get("message")))
    # A rollout stuck behind ready replicas (Ready stays True, so the Warning above says nothing)
    # and a cache size that cannot be applied: a Warning when it starts or its message changes.
    if ready.get("status") == "True":
        _warn_on_condition(body, previous, new, status.DEGRADED, lambda c: c.get("reason") == "RolloutStuck")
    _warn_on_condition(body, previous, new, status.CACHE_SIZE, lambda c: c.get("status") == "False")
    await write_status(k.MODELPOOL, body, previous, new)
    return Outcome()


def _warn_on_condition(
    body: dict[str, Any],
    previous: dict[str, Any],
    new: dict[str, Any],
    type_: str,
    bad: Callable[[Mapping[str, Any]], bool],
) -> None:
    """A Warning Event when condition `type_` is `bad` and its reason or message changed."""
    cond = status.find_condition(new["conditions"], type_) or {}
    before = status.find_condition(previous.get("conditions"), type_) or {}
    changed = (cond.get("reason"), cond.get("message")) != (before.get("reason"), before.get("message"))
    if bad(cond) and changed:
        post_event(body, "Warning", str(cond.get("reason")), str(cond.get("message")))


async def _cache_claims(
    namespace: str, pool: str, spec: ModelPoolSpec, simulate_default: bool
) -> list[dict[str, Any]] | None:
    """The pool's cache claims (shared and per-replica, by label: one LIST), or None when the pool
    has no claims of its own (no LIST)."""
    if spec.simulated(simulate_default) or not any(
        m.cache.kind == "pvc" and not m.cache.existing_claim for m in d.deployed_models(spec)
    ):
        return None
    return await kube_client().list(k.PVC, namespace, d.pool_children_selector(pool))


async def _reconcile_cache_sizes(
    namespace: str, spec: ModelPoolSpec, claims: list[dict[str, Any]]
) -> status.Cond:
    """Apply a larger `cache.size` to the live cache claims (an expansion, which the API server
    allows when the claim's StorageClass does) and say in `CacheSizeApplied` what could not be
    applied."""
    kube = kube_client()
    plan = d.cache_resize_plan(spec, claims)
    refused: dict[str, str] = {}
    for resize in plan:
        if resize.action != "expand":
            continue
        try:
            await kube.patch(
                k.PVC,
                namespace,
                resize.claim,
                {"spec": {"resources": {"requests": {"storage": resize.wanted}}}},
            )
            log.info("PersistentVolumeClaim %s/%s expanded to %s", namespace, resize.claim, resize.wanted)
        except k.ApiError as e:
            refused[resize.claim] = f"{e.reason}: {e.message}"
    resizing = [claim for claim in d.claims_resizing(claims) if claim not in refused]
    return status.cache_size_condition(plan, refused, resizing)


async def _calibration_set(namespace: str, spec: ModelPoolSpec) -> tuple[str | None, str | None]:
    """(content digest, why it is missing) of a ConfigMap calibration set; (None, None) otherwise."""
    ref = spec.calibration.dataset.config_map
    if ref is None or not spec.calibration.enabled:
        return None, None
    cm = await kube_client().get(k.CONFIGMAP, namespace, ref.name)
    if cm is None:
        return None, f"calibration set ConfigMap {ref.name!r} (spec.calibration.dataset.configMap) not found"
    text = (cm.get("data") or {}).get(ref.key) or (cm.get("binaryData") or {}).get(ref.key)
    if text is None:
        return None, f"calibration set ConfigMap {ref.name!r} has no key {ref.key!r}"
    return hashlib.sha256(str(text).encode()).hexdigest()[:16], None


async def _router_targets(namespace: str, pool: str) -> list[d.RouterTarget]:
    """The routers of the (valid) RoutingPolicies over a pool, where calibrations are pushed."""
    targets = []
    for obj in await kube_client().list(k.ROUTINGPOLICY, namespace):
        meta = obj.get("metadata", {})
        if (obj.get("spec", {}).get("poolRef") or {}).get("name") != pool or meta.get("deletionTimestamp"):
            continue
        try:
            policy = parse_routing_policy(obj.get("spec") or {})
        except SpecError:
            continue
        targets.append(d.RouterTarget.for_policy(meta["name"], namespace, policy.router.auth_secret))
    return targets


async def _reconcile_calibration(
    body: dict[str, Any], spec: ModelPoolSpec, deployments: dict[str, dict[str, Any]], now: str
) -> dict[str, Any]:
    """Create the calibration Jobs that are due, prune stale ones, and return `status.calibration`."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous = (body.get("status") or {}).get("calibration") or {}
    live = await list_children(body, (k.JOB,), d.calibration_selector(name))
    live_names = {n for (_kind, n) in live}
    ready = {
        m.name: status.DeploymentView.from_object(obj).ready
        for m in d.deployed_models(spec)
        if (obj := deployments.get(d.model_child_name(name, m.name))) is not None
    }
    done = {
        m.get("name"): m.get("revision") for m in previous.get("models") or [] if m.get("state") == "Done"
    }
    digest, missing = await _calibration_set(namespace, spec)
    owner = d.Owner.from_body(body)

    def plan_with(targets: list[d.RouterTarget]) -> d.CalibrationPlan:
        return d.calibration_plan(
            owner,
            spec,
            ready_replicas=ready,
            done=done,
            live_jobs=live_names,
            targets=targets,
            dataset_digest=digest,
            set_missing=missing,
        )

    plan = plan_with([])
    if any(job["metadata"]["name"] not in live_names for job in plan.jobs):
        plan = plan_with(await _router_targets(namespace, name))  # only new Jobs carry the targets
    applied = await apply_children(body, plan.jobs, live)
    await prune_children(body, live, applied)
    jobs = {n: obj for (_kind, n), obj in applied.items()}
    pods = await kube_client().list(k.POD, namespace, d.calibration_selector(name)) if jobs else []
    new = status.calibration_status(plan, jobs, pods, previous, now, policies_over(namespace, name))
    for type_, reason, message in status.calibration_events(previous, new):
        post_event(body, type_, reason, message)
    return new


def policies_over(namespace: str, pool: str) -> list[str] | None:
    """The RoutingPolicies over a pool, from kopf's index (None before a handler handed it over)."""
    index = STATE.policies_index
    return None if index is None else sorted(set(index.get((namespace, pool), [])))


async def refresh_policies(namespace: str, pool: str) -> None:
    """Re-reconcile the policies that reference a pool (after the pool changed)."""
    if STATE.stopping:
        return
    names = policies_over(namespace, pool)
    if names is None:  # before any handler handed us the index: ask the API
        names = sorted(
            p["metadata"]["name"]
            for p in await kube_client().list(k.ROUTINGPOLICY, namespace)
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
        warn_on_change(body, previous, reason, message)
        await write_status(k.ROUTINGPOLICY, body, previous, new)
        return Outcome("waiting", message)

    async def invalid(message: str) -> Outcome:
        new = status.invalid_status(previous, message, generation, now)
        warn_on_change(body, previous, "InvalidSpec", message)
        await write_status(k.ROUTINGPOLICY, body, previous, new)
        return Outcome("invalid", message)

    try:
        spec = parse_routing_policy(body.get("spec") or {})
        d.check_policy_names(name)
    except SpecError as e:
        return await invalid(str(e))
    kube = kube_client()
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
    deployments = [
        obj
        for kind in k.WORKLOAD_KINDS.values()
        for obj in await kube.list(kind, namespace, d.pool_children_selector(pool_name))
    ]
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
    calibration_revisions = {
        str(m["name"]): str(m["revision"])
        for m in ((pool.get("status") or {}).get("calibration") or {}).get("models") or []
        if m.get("name") and m.get("revision")
    }
    quality = None
    if spec.budgets is not None and spec.budgets.total_tokens is not None and spec.history.builtin:
        quality = builtin_profile_quality()
    owner = d.Owner.from_body(body)
    live = await list_children(body, POLICY_CHILD_KINDS, d.policy_children_selector(name))
    router_live = live.get(("Deployment", d.router_child_name(name)))
    live_replicas = int(router_live.get("spec", {}).get("replicas", 1)) if router_live is not None else None
    try:
        plan = d.policy_children(
            owner,
            spec,
            pool_name,
            pool_spec,
            ready,
            quality,
            live_router_replicas=live_replicas,
            default_state_url=os.environ.get(d.DEFAULT_STATE_URL_ENV) or None,
            calibration_revisions=calibration_revisions,
        )
    except d.PolicyReferenceError as e:
        return await wait(e.reason, e.message)
    except (ValidationError, ValueError) as e:
        return await invalid(f"the router config built from this policy is invalid: {e}")
    applied = await apply_children(body, plan.children, live)
    await prune_children(body, live, applied)
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
    await write_status(k.ROUTINGPOLICY, body, previous, new)
    return Outcome()
