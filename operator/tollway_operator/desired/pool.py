"""Desired state of a ModelPool: pure functions from its spec to Kubernetes manifests.

ModelPool `P` in namespace `N`, for each model `M` with `model:` set (deployed by tollway):
- Deployment `P-M`: vLLM's OpenAI server, port 8000, GPUs from `gpus`, /dev/shm, model cache;
- Service `P-M` (ClusterIP, port 8000);
- PersistentVolumeClaim `P-M-cache` when `cache.kind: pvc` without `existingClaim`.
Models with `endpoint:` are routed to, never deployed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tollway_operator.api import ModelPoolSpec, ModelSpec
from tollway_operator.desired.names import (
    COMPONENT_MODEL,
    LABEL_COMPONENT,
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

MODEL_CACHE_DIR = "/models"
STARTUP_PROBE_SECONDS = 30 * 60
"""How long vLLM may take to download and load weights before the kubelet restarts it."""
SHM_PER_GPU_GI = 4


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
    """`spec.replicas` of a model's Deployment; None means "leave the live value alone".

    - No autoscaling: `max(replicas.min, 1)` — nothing would ever scale a min-0 model up, so an
      unscaled pool runs every model with at least one replica (min == max in a fixed pool).
    - Autoscaling in operator mode: the autoscaler owns `spec.replicas`; the live value is kept,
      clamped to [floor, replicas.max]; a new Deployment starts at the floor.
    - KEDA mode: KEDA (an HPA) owns it; a new Deployment starts at the floor, later left alone.
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


def _vllm_args(model: ModelSpec) -> list[str]:
    args = [
        "--model", str(model.model),
        "--served-model-name", model.name,
        "--tensor-parallel-size", str(model.gpus),
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
        "--download-dir", f"{MODEL_CACHE_DIR}/weights",
    ]  # fmt: skip
    if model.max_model_len is not None:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{model.gpu_memory_utilization:g}"]
    return args + list(model.extra_args)


def _vllm_env(model: ModelSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{MODEL_CACHE_DIR}/huggingface"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if model.hf_token_secret is not None:
        ref = {"secretKeyRef": {"name": model.hf_token_secret.name, "key": model.hf_token_secret.key}}
        env += [{"name": "HF_TOKEN", "valueFrom": ref}, {"name": "HUGGING_FACE_HUB_TOKEN", "valueFrom": ref}]
    user = [e.to_wire() for e in model.env]
    user_names = {e["name"] for e in user}
    return [e for e in env if e["name"] not in user_names] + user


def _vllm_resources(model: ModelSpec) -> dict[str, Any]:
    resources = json.loads(json.dumps(model.resources or {}))
    limits = resources.setdefault("limits", {})
    limits["nvidia.com/gpu"] = str(model.gpus)
    requests = resources.get("requests")
    if requests and "nvidia.com/gpu" in requests:
        requests["nvidia.com/gpu"] = str(model.gpus)
    return resources


def cache_claim_name(pool: str, model: str) -> str:
    return f"{model_child_name(pool, model)}-cache"


def _cache_volume(pool: str, model: ModelSpec) -> dict[str, Any]:
    cache = model.cache
    if cache.kind == "emptyDir":
        return {"name": "model-cache", "emptyDir": {"sizeLimit": cache.size}}
    claim = cache.existing_claim or cache_claim_name(pool, model.name)
    return {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}}


def model_cache_claim(owner: Owner, model: ModelSpec) -> dict[str, Any] | None:
    """The PVC tollway creates for `cache.kind: pvc` without `existingClaim` (created once, never
    patched: a claim's spec is immutable)."""
    cache = model.cache
    if cache.kind != "pvc" or cache.existing_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(
            cache_claim_name(owner.name, model.name), owner, model_labels(owner.name, model.name)
        ),
        "spec": spec,
    }


def model_deployment(
    owner: Owner, spec: ModelPoolSpec, model: ModelSpec, live_replicas: int | None = None
) -> dict[str, Any]:
    pool = owner.name
    labels = model_labels(pool, model.name)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": "vllm",
        "image": model.image or spec.image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": _vllm_args(model),
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "env": _vllm_env(model),
        "resources": _vllm_resources(model),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "model-cache", "mountPath": MODEL_CACHE_DIR},
        ],
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": STARTUP_PROBE_SECONDS // 10},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5},
        # The vLLM image runs as root (it writes caches under its home); we still drop what it
        # does not need.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_PER_GPU_GI * model.gpus}Gi"},
            },
            _cache_volume(pool, model),
        ],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": False,
    }
    if model.node_selector:
        pod_spec["nodeSelector"] = dict(model.node_selector)
    if model.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in model.tolerations]
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": model_selector(pool, model.name)},
        # GPUs are scarce: never surge (a rollout needs no spare GPU), replace one pod at a time.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": STARTUP_PROBE_SECONDS + 600,
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(VLLM_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    replicas = model_replicas(model, spec, live_replicas)
    if replicas is not None:
        deployment_spec = {"replicas": replicas, **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(model_child_name(pool, model.name), owner, labels),
        "spec": deployment_spec,
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


def pool_children(
    owner: Owner,
    spec: ModelPoolSpec,
    live_replicas: Mapping[str, int] | None = None,
    scaled_objects: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Everything a ModelPool should own, in apply order.

    `live_replicas`: model name -> the live Deployment's spec.replicas (absent: not created yet).
    `scaled_objects`: KEDA ScaledObjects (from `autoscaling.desired_scaled_objects`) to own too.
    """
    check_pool_names(owner.name, spec)
    live_replicas = live_replicas or {}
    children: list[dict[str, Any]] = []
    for model in deployed_models(spec):
        claim = model_cache_claim(owner, model)
        if claim is not None:
            children.append(claim)
        children.append(model_deployment(owner, spec, model, live_replicas.get(model.name)))
        children.append(model_service(owner, model))
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
