"""Desired state of a ModelPool: pure functions from its spec to Kubernetes manifests.

ModelPool `P` in namespace `N`, for each model `M` with `model:` set (deployed by tollway):
- its workload `P-M` running the pod of `modelpod.py` (vLLM, or a simulator with `simulate`):
  a StatefulSet when the cache is a per-replica claim (`cache.kind: pvc`, `accessMode:
  ReadWriteOnce`, no `existingClaim`), else a Deployment;
- Service `P-M` (ClusterIP, port 8000);
- PersistentVolumeClaim `P-M-cache` for a shared cache (`accessMode: ReadWriteMany`);
and for the pool, with `networkPolicy`, the NetworkPolicy `P-models`. Models with `endpoint:` are
routed to, never deployed.

The model cache, and why a StatefulSet. A `ReadWriteOnce` volume attaches to one node: two
replicas of a model on two nodes sharing one such claim fail with Multi-Attach. So each replica
gets its own claim, `model-cache-P-M-<i>`, from the StatefulSet's volumeClaimTemplates. On
scale-down the StatefulSet removes the highest-numbered pods and keeps their claims
(`whenScaled: Retain`): scaling up again, even from zero, finds the weights already there. When
the model leaves the pool, or the pool is deleted, `cache.retention` decides (`whenDeleted`).
Pinning the replicas to one node (affinity) would cap a model at one node's GPUs; a shared
`ReadWriteMany` claim is offered where the cluster has such storage (one download for all). Every
other model stays a Deployment: it replaces a pod lost with its node after the eviction timeout,
where a StatefulSet waits until the node is known to be gone.

A claim's spec is immutable. The StatefulSet's claim template is kept as it was created (the API
refuses changes to it); a larger `cache.size` is applied to the existing claims by the reconciler
(expansion, where the StorageClass allows it) and reported in the pool's `CacheSizeApplied`
condition (`cache_resize_plan`), as is a smaller one, which cannot be applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.utils.quantity import parse_quantity

from tollway_operator.api import ModelPoolSpec, ModelSpec
from tollway_operator.desired.modelpod import cache_volume_source, model_pod_spec
from tollway_operator.desired.names import (
    COMPONENT_CALIBRATION,
    COMPONENT_MODEL,
    COMPONENT_ROUTER,
    LABEL_COMPONENT,
    LABEL_MODEL,
    LABEL_POOL,
    VLLM_PORT,
    Owner,
    check_pool_names,
    child_metadata,
    common_labels,
    model_child_name,
    model_labels,
    model_selector,
    model_service_url,
)
from tollway_operator.desired.sizing import cache_size, startup_budget_seconds

CACHE_VOLUME = "model-cache"
WorkloadKind = Literal["Deployment", "StatefulSet"]


def deployed_models(spec: ModelPoolSpec) -> list[ModelSpec]:
    """Models tollway runs (the others are external endpoints)."""
    return [m for m in spec.models if m.model and m.endpoint is None]


def autoscaling_mode(spec: ModelPoolSpec) -> str | None:
    """ "operator", "keda", or None when nothing scales the pool."""
    a = spec.autoscaling
    if a is None or not a.enabled:
        return None
    return a.mode


def replica_floor(model: ModelSpec, spec: ModelPoolSpec) -> int:
    """Fewest replicas a model may have. Zero only when the autoscaler may scale it to zero."""
    a = spec.autoscaling
    zero_allowed = a is not None and a.enabled and a.scale_to_zero and model.replicas.min == 0
    return 0 if zero_allowed else max(model.replicas.min, 1)


def model_replicas(model: ModelSpec, spec: ModelPoolSpec, live: int | None) -> int | None:
    """`spec.replicas` of a model's workload; None means "leave the live value alone".

    - No autoscaling: `max(replicas.min, 1)` — nothing would ever scale a min-0 model up, so an
      unscaled pool runs every model with at least one replica (min == max in a fixed pool).
    - Autoscaling in operator mode: the autoscaler owns `spec.replicas`; the live value is kept,
      clamped to [floor, replicas.max]; a new workload starts at the floor.
    - KEDA mode: KEDA (an HPA) owns it; a new workload starts at the floor, later left alone.
    """
    mode = autoscaling_mode(spec)
    floor = replica_floor(model, spec)
    if mode is None:
        return max(model.replicas.min, 1)
    if live is None:
        return floor
    if mode == "keda":
        return None
    return min(max(live, floor), model.replicas.max)


def workload_kind(model: ModelSpec, simulate: bool) -> WorkloadKind:
    """StatefulSet when each replica needs a claim of its own (simulators have no cache)."""
    return "StatefulSet" if model.cache.per_replica and not simulate else "Deployment"


def workload_kinds(spec: ModelPoolSpec, simulate_default: bool = False) -> dict[str, WorkloadKind]:
    """Model name -> the kind of its workload, for every deployed model."""
    simulate = spec.simulated(simulate_default)
    return {m.name: workload_kind(m, simulate) for m in deployed_models(spec)}


def cache_claim_name(pool: str, model: str) -> str:
    """The shared claim (`accessMode: ReadWriteMany`)."""
    return f"{model_child_name(pool, model)}-cache"


def replica_claim_name(pool: str, model: str, ordinal: int) -> str:
    """Replica `ordinal`'s own claim (the StatefulSet controller's naming)."""
    return f"{CACHE_VOLUME}-{model_child_name(pool, model)}-{ordinal}"


def _claim_spec(model: ModelSpec) -> dict[str, Any]:
    cache = model.cache
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache_size(model)}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return spec


def model_cache_claim(owner: Owner, model: ModelSpec, simulate: bool = False) -> dict[str, Any] | None:
    """The shared claim tollway creates for `cache.kind: pvc, accessMode: ReadWriteMany` without
    `existingClaim` (created once, never patched but for expansion). With `retention: Retain` it
    has no owner: it outlives the pool, and a pool of the same name uses it again."""
    cache = model.cache
    if simulate or cache.kind != "pvc" or cache.existing_claim or cache.per_replica:
        return None
    meta = child_metadata(
        cache_claim_name(owner.name, model.name), owner, model_labels(owner.name, model.name)
    )
    if cache.retention == "Retain":
        del meta["ownerReferences"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": _claim_spec(model)}


def _claim_template(pool: str, model: ModelSpec, live: Mapping[str, Any] | None) -> dict[str, Any]:
    """The StatefulSet's claim template; `live`: the template's spec as it was created, kept
    (the API refuses to change it)."""
    spec = _claim_spec(model)
    if live:
        spec = {
            k: json.loads(json.dumps(live[k]))
            for k in ("accessModes", "resources", "storageClassName")
            if k in live
        }
    return {"metadata": {"name": CACHE_VOLUME, "labels": model_labels(pool, model.name)}, "spec": spec}


def model_workload(
    owner: Owner,
    spec: ModelPoolSpec,
    model: ModelSpec,
    live_replicas: int | None = None,
    *,
    simulate: bool = False,
    live_claim_template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Deployment or StatefulSet of one model. `live_replicas`: its live `spec.replicas`
    (None: not created yet); `live_claim_template`: a live StatefulSet's claim template spec."""
    pool = owner.name
    labels = model_labels(pool, model.name)
    kind = workload_kind(model, simulate)
    cache = model.cache
    if simulate or kind == "StatefulSet":
        volume = None
    else:
        shared = cache.existing_claim or (cache_claim_name(pool, model.name) if cache.kind == "pvc" else None)
        volume = cache_volume_source(model, shared)
    seed = next(i for i, m in enumerate(spec.models) if m.name == model.name)
    template = {
        "metadata": {
            "labels": labels,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(VLLM_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": model_pod_spec(spec, model, simulate=simulate, cache_volume=volume, seed=seed),
    }
    workload: dict[str, Any] = {"selector": {"matchLabels": model_selector(pool, model.name)}}
    if kind == "Deployment":
        workload |= {
            # GPUs are scarce: never surge (a rollout needs no spare GPU), replace one pod at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": startup_budget_seconds(model) + 600,
            "template": template,
        }
    else:
        workload |= {
            "serviceName": model_child_name(pool, model.name),
            # Replicas start and stop together; a rollout still replaces one pod at a time.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": cache.retention, "whenScaled": "Retain"},
            "revisionHistoryLimit": 3,
            "template": template,
            "volumeClaimTemplates": [_claim_template(pool, model, live_claim_template)],
        }
    replicas = model_replicas(model, spec, live_replicas)
    if replicas is not None:
        workload = {"replicas": replicas, **workload}
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": child_metadata(model_child_name(pool, model.name), owner, labels),
        "spec": workload,
    }


def model_service(owner: Owner, model: ModelSpec) -> dict[str, Any]:
    pool = owner.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(model_child_name(pool, model.name), owner, model_labels(pool, model.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": model_selector(pool, model.name),
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def network_policy_name(pool: str) -> str:
    return f"{pool}-models"


def model_network_policy(owner: Owner, spec: ModelPoolSpec) -> dict[str, Any] | None:
    """Ingress to the pool's model pods (port 8000) only from the routers of the pool's
    RoutingPolicies, its calibration Jobs and, if named, Prometheus."""
    settings = spec.network_policy
    if settings is None or not settings.enabled:
        return None
    pool = owner.name
    peers: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {LABEL_COMPONENT: COMPONENT_ROUTER, LABEL_POOL: pool}}},
        {"podSelector": {"matchLabels": {LABEL_COMPONENT: COMPONENT_CALIBRATION, LABEL_POOL: pool}}},
    ]
    prometheus = settings.prometheus
    if prometheus is not None and (
        prometheus.namespace_selector is not None or prometheus.pod_selector is not None
    ):
        peer: dict[str, Any] = {}
        if prometheus.namespace_selector is not None:
            peer["namespaceSelector"] = json.loads(json.dumps(prometheus.namespace_selector))
        if prometheus.pod_selector is not None:
            peer["podSelector"] = json.loads(json.dumps(prometheus.pod_selector))
        peers.append(peer)
    labels = {**common_labels(), LABEL_COMPONENT: COMPONENT_MODEL, LABEL_POOL: pool}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(network_policy_name(pool), owner, labels),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_COMPONENT: COMPONENT_MODEL, LABEL_POOL: pool}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": VLLM_PORT}]}],
        },
    }


def pool_children(
    owner: Owner,
    spec: ModelPoolSpec,
    live_replicas: Mapping[str, int] | None = None,
    scaled_objects: list[dict[str, Any]] | None = None,
    *,
    simulate_default: bool = False,
    live_claim_templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Everything a ModelPool should own, in apply order.

    `live_replicas`: model name -> its live workload's spec.replicas (absent: not created yet).
    `scaled_objects`: KEDA ScaledObjects (from `autoscaling.desired_scaled_objects`) to own too.
    `simulate_default`: the operator's default for `simulate.enabled`.
    `live_claim_templates`: model name -> its live StatefulSet's claim template spec.
    """
    check_pool_names(owner.name, spec)
    live_replicas = live_replicas or {}
    live_claim_templates = live_claim_templates or {}
    simulate = spec.simulated(simulate_default)
    children: list[dict[str, Any]] = []
    for model in deployed_models(spec):
        claim = model_cache_claim(owner, model, simulate)
        if claim is not None:
            children.append(claim)
        children.append(
            model_workload(
                owner,
                spec,
                model,
                live_replicas.get(model.name),
                simulate=simulate,
                live_claim_template=live_claim_templates.get(model.name),
            )
        )
        children.append(model_service(owner, model))
    policy = model_network_policy(owner, spec)
    if policy is not None:
        children.append(policy)
    for obj in scaled_objects or []:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = owner.namespace
        meta["labels"] = {
            **meta.get("labels", {}),
            **common_labels(),
            LABEL_COMPONENT: COMPONENT_MODEL,
            LABEL_POOL: owner.name,
        }
        meta["ownerReferences"] = [owner.reference()]
        children.append(obj)
    return children


def model_endpoint(pool: str, namespace: str, model: ModelSpec) -> str:
    """Where a model is served: its external URL, or its Service inside the cluster."""
    if model.endpoint is not None:
        return model.endpoint.url
    return model_service_url(pool, model.name, namespace)


# ---------------------------------------------------------------------------------------------
# Cache size changes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimResize:
    """What to do with one live cache claim whose requested size differs from `cache.size`."""

    model: str
    claim: str
    current: str
    wanted: str
    action: Literal["expand", "cannot-shrink"]


def _requested(claim: Mapping[str, Any]) -> str | None:
    return (((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")


def cache_resize_plan(spec: ModelPoolSpec, claims: list[Mapping[str, Any]]) -> list[ClaimResize]:
    """The live cache claims of a pool (shared ones and per-replica ones, by their model label)
    whose requested size is not `cache.size`: larger ones are to be expanded, smaller ones cannot
    shrink. A user's `existingClaim` is never touched."""
    out = []
    for model in deployed_models(spec):
        cache = model.cache
        if cache.kind != "pvc" or cache.existing_claim:
            continue
        wanted = cache_size(model)
        mine = [
            c
            for c in claims
            if (c.get("metadata", {}).get("labels") or {}).get(LABEL_MODEL) == model.name
            and not c.get("metadata", {}).get("deletionTimestamp")
        ]
        for claim in sorted(mine, key=lambda c: c["metadata"]["name"]):
            current = _requested(claim)
            if current is None:
                continue
            have, want = parse_quantity(current), parse_quantity(wanted)
            if want == have:
                continue
            action: Literal["expand", "cannot-shrink"] = "expand" if want > have else "cannot-shrink"
            out.append(ClaimResize(model.name, claim["metadata"]["name"], current, wanted, action))
    return out


def claims_resizing(claims: list[Mapping[str, Any]]) -> list[str]:
    """Claims whose storage is smaller than they request: an expansion under way."""
    out = []
    for claim in claims:
        capacity = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
        requested = _requested(claim)
        if capacity and requested and parse_quantity(capacity) < parse_quantity(requested):
            out.append(claim["metadata"]["name"])
    return sorted(out)


def claim_retained(spec: ModelPoolSpec, claim: Mapping[str, Any]) -> bool:
    """Whether a cache claim the pool owns must not be pruned though the desired state lacks it:
    its model is still in the pool with `retention: Retain` (e.g. a shared claim left behind when
    the model's cache became per-replica, or one created before `retention` existed). Only a
    model that is gone, or says Delete, loses its claims."""
    model = spec.model((claim.get("metadata", {}).get("labels") or {}).get(LABEL_MODEL, ""))
    return model is not None and model.cache.retention == "Retain"
