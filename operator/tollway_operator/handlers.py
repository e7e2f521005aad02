"""kopf handlers: thin glue between kopf's events and the reconcilers.

One reconcile per custom resource (`reconcile.py`), run under a per-object lock, from any of these
triggers:
- kopf's create / update / resume handlers (a bad spec raises `kopf.PermanentError`, so kopf
  does not retry until the spec changes; a policy waiting for its pool raises
  `kopf.TemporaryError`, retried every `TOLLWAY_OPERATOR_RETRY_SECONDS`);
- the resync loop and the children's events (`resync.py`);
- a ModelPool change or deletion re-reconciles the RoutingPolicies that reference it (kopf index
  `policies_by_pool`).

No finalizers of ours: children carry ownerReferences, so the API server's garbage collector deletes them
with their owner. Status is written with merge patches to the status subresource; the operator
never writes `status.autoscaling` (the autoscaler's subtree).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from tollway_operator import desired as d
from tollway_operator import kube as k
from tollway_operator import metrics
from tollway_operator.api import GROUP, VERSION
from tollway_operator.reconcile import reconcile_policy, reconcile_pool, refresh_policies
from tollway_operator.resync import forget, owner_of_child, remember_indexes, schedule
from tollway_operator.state import MANAGED_CHILD, POLICIES, POOLS, RETRY_SECONDS, STATE, Outcome

log = logging.getLogger("tollway.operator")

CHILD_WATCHES = (
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("v1", "services"),
    ("v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("batch", "v1", "jobs"),
)
"""The children whose events re-reconcile their owner (cache claims are left to the resync)."""
MANAGED_CHILD_SELECTOR = ",".join(f"{key}={value}" for key, value in MANAGED_CHILD.items())


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
    # Stream only our children: the API server filters these watches by label (the handlers'
    # `labels=` filters alone would make kopf receive every such object in the cluster).
    for resource in CHILD_WATCHES:
        settings.watching.label_selectors[resource] = MANAGED_CHILD_SELECTOR
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    STATE.begin_run()  # the resync task is started by the first resource handler (resync.remember_indexes)
    STATE.kube = k.Kube(await k.connect())
    if settings.peering.mandatory and not settings.peering.standalone:
        namespaces = [n for n in os.environ.get("TOLLWAY_OPERATOR_NAMESPACES", "").split(",") if n]
        await ensure_peering(STATE.kube, settings.peering.name, settings.peering.clusterwide, namespaces)
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
    loop = asyncio.get_running_loop()
    tasks = [task for task in STATE.tasks if task.get_loop() is loop]
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


@kopf.index(GROUP, VERSION, POOLS)
def pools_by_namespace(namespace: str, name: str, **_: Any) -> dict[str, str]:
    return {namespace: name}


@kopf.index(GROUP, VERSION, POLICIES)
def policies_by_pool(
    namespace: str, name: str, spec: Mapping[str, Any], **_: Any
) -> dict[tuple[str, str], str]:
    pool = (spec.get("poolRef") or {}).get("name") or ""
    return {(namespace, pool): name}


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


@kopf.on.event(*CHILD_WATCHES[0], labels=MANAGED_CHILD)
@kopf.on.event(*CHILD_WATCHES[1], labels=MANAGED_CHILD)
@kopf.on.event(*CHILD_WATCHES[2], labels=MANAGED_CHILD)
@kopf.on.event(*CHILD_WATCHES[3], labels=MANAGED_CHILD)
@kopf.on.event(*CHILD_WATCHES[4], labels=MANAGED_CHILD)
@kopf.on.event(*CHILD_WATCHES[5], labels=MANAGED_CHILD)
async def child_event(event: Mapping[str, Any], labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    owner = owner_of_child(labels)
    if owner is not None and event.get("type") in ("ADDED", "MODIFIED", "DELETED", None):
        schedule(owner[0], namespace, owner[1])
