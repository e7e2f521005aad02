"""Desired state: pure functions from a spec (plus what is observed) to Kubernetes manifests.

Nothing here talks to the API server. The handlers parse a custom resource with `api.py`, read
the few live facts these functions need (live replicas of model Deployments, their ready
replicas), call the functions below and hand the manifests to `kube.apply`.

ModelPool `P` in namespace `N`, for each model `M` with `model:` set (deployed by tollway):
- Deployment `P-M`: vLLM's OpenAI server, port 8000, GPUs from `gpus`, /dev/shm, model cache;
- Service `P-M` (ClusterIP, port 8000);
- PersistentVolumeClaim `P-M-cache` when `cache.kind: pvc` without `existingClaim`.
Models with `endpoint:` are routed to, never deployed.

RoutingPolicy `R` over pool `P`:
- ConfigMap `R-router` holding `router.yaml` (a `RouterConfig`);
- Deployment `R-router` running `tollway router`, with a checksum of the config on its pod
  template (so a change rolls the pods) — except the volatile `backends[].replicas`, which the
  router picks up by hot reload of the mounted file;
- Service `R` (port 80 -> 8080): the cluster-internal OpenAI endpoint http://R.N.svc/v1;
- PodDisruptionBudget `R-router` (maxUnavailable 1) when replicas > 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router_service.budgets import split_weights
from router_service.config import (
    AuthConfig,
    BackendConfig,
    BudgetConfig,
    RouterConfig,
    dump_router_config,
)
from tollway_operator.api import (
    API_VERSION,
    BudgetsSpec,
    ModelPoolSpec,
    ModelSpec,
    RoutingPolicySpec,
    SpecError,
)

# ---------------------------------------------------------------------------------------------
# Names, labels, constants
# ---------------------------------------------------------------------------------------------

PART_OF = "tollway"
MANAGED_BY = "tollway-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_POOL = "tollway.io/pool"
LABEL_MODEL = "tollway.io/model"
LABEL_POLICY = "tollway.io/policy"
COMPONENT_MODEL = "model-server"
COMPONENT_ROUTER = "router"

CHECKSUM_ANNOTATION = "tollway.io/config-checksum"
VLLM_PORT = 8000
ROUTER_PORT = 8080
ROUTER_SERVICE_PORT = 80
CONFIG_DIR = "/etc/tollway"
CONFIG_KEY = "router.yaml"
AUTH_DIR = "/etc/tollway/auth"
AUTH_FILE = "tokens"
HISTORY_DIR = "/etc/tollway/history"
STATE_DIR = "/var/lib/tollway"
CACHE_DIR = "/var/cache/tollway"
MODEL_CACHE_DIR = "/models"
STARTUP_PROBE_SECONDS = 30 * 60
"""How long vLLM may take to download and load weights before the kubelet restarts it."""
SHM_PER_GPU_GI = 4
ROUTER_UID = 65532
MAX_SERVICE_NAME = 63
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns the children (what `kopf.adopt` would record)."""

    kind: str
    name: str
    namespace: str
    uid: str
    api_version: str = API_VERSION

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(
            kind=body.get("kind", ""),
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid", ""),
            api_version=body.get("apiVersion", API_VERSION),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def model_child_name(pool: str, model: str) -> str:
    return f"{pool}-{model}"


def router_child_name(policy: str) -> str:
    return f"{policy}-router"


def model_service_url(pool: str, model: str, namespace: str) -> str:
    return f"http://{model_child_name(pool, model)}.{namespace}.svc.cluster.local:{VLLM_PORT}"


def router_endpoint(policy: str, namespace: str) -> str:
    """The OpenAI base URL clients in the cluster use."""
    return f"http://{policy}.{namespace}.svc/v1"


def common_labels() -> dict[str, str]:
    return {LABEL_PART_OF: PART_OF, LABEL_MANAGED_BY: MANAGED_BY}


def model_selector(pool: str, model: str) -> dict[str, str]:
    return {LABEL_NAME: "vllm", LABEL_INSTANCE: model_child_name(pool, model)}


def model_labels(pool: str, model: str) -> dict[str, str]:
    return {
        **model_selector(pool, model),
        LABEL_COMPONENT: COMPONENT_MODEL,
        **common_labels(),
        LABEL_POOL: pool,
        LABEL_MODEL: model,
    }


def router_selector(policy: str) -> dict[str, str]:
    return {LABEL_NAME: "tollway-router", LABEL_INSTANCE: policy}


def router_labels(policy: str, pool: str) -> dict[str, str]:
    return {
        **router_selector(policy),
        LABEL_COMPONENT: COMPONENT_ROUTER,
        **common_labels(),
        LABEL_POLICY: policy,
        LABEL_POOL: pool,
    }


def pool_children_selector(pool: str) -> str:
    """Label selector for everything a pool owns."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT_MODEL},{LABEL_POOL}={pool}"


def policy_children_selector(policy: str) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT_ROUTER},{LABEL_POLICY}={policy}"


def _metadata(
    name: str, owner: Owner, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _env_name(model: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", model.upper())


def backend_api_key_env(model: str) -> str:
    """Router environment variable that carries an external backend's bearer key."""
    return f"TOLLWAY_BACKEND_{_env_name(model)}_API_KEY"


def check_pool_names(pool: str, spec: ModelPoolSpec) -> None:
    """Child names must be valid Service names (DNS-1035 labels, <= 63 characters)."""
    problems = []
    for i, model in enumerate(spec.models):
        if model.endpoint is not None and not model.model:
            continue
        name = model_child_name(pool, model.name)
        if len(name) > MAX_SERVICE_NAME:
            problems.append(
                f"spec.models[{i}].name: child name {name!r} (pool name + '-' + model name) is {len(name)} "
                f"characters; Service names allow {MAX_SERVICE_NAME}"
            )
        elif not DNS1035.match(name):
            problems.append(f"metadata.name: child name {name!r} must start with a letter (a DNS-1035 label)")
    if problems:
        raise SpecError("; ".join(problems))


def check_policy_names(policy: str) -> None:
    if len(policy) > MAX_SERVICE_NAME or not DNS1035.match(policy):
        raise SpecError(
            f"metadata.name: {policy!r} names the router Service, so it must be a DNS-1035 label "
            f"(lower-case letters, digits, '-', starting with a letter, <= {MAX_SERVICE_NAME} characters)"
        )


# ---------------------------------------------------------------------------------------------
# ModelPool
# ---------------------------------------------------------------------------------------------


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
        "metadata": _metadata(
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
        "metadata": _metadata(model_child_name(pool, model.name), owner, labels),
        "spec": deployment_spec,
    }


def model_service(owner: Owner, model: ModelSpec) -> dict[str, Any]:
    pool = owner.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model_child_name(pool, model.name), owner, model_labels(pool, model.name)),
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


# ---------------------------------------------------------------------------------------------
# RoutingPolicy
# ---------------------------------------------------------------------------------------------


class PolicyReferenceError(Exception):
    """The policy names something its pool does not have (may resolve when the pool changes)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _price_per_token(model: ModelSpec) -> float:
    """Mean of input and output price, USD per million tokens."""
    return (model.cost.input_per_million_tokens + model.cost.output_per_million_tokens) / 2


@dataclass
class BudgetResolution:
    tokens: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve_budgets(
    budgets: BudgetsSpec | None, models: list[ModelSpec], quality: Mapping[str, float] | None = None
) -> BudgetResolution:
    """Tokens per window per model (the whole policy, all router replicas together).

    - `perModel`: as given; names that are not in the pool raise PolicyReferenceError; models
      without an entry get no budget.
    - `totalTokens`: split by `split` with `router_service.budgets.split_weights`, cost = the
      model's mean price per token, perf = the history's mean quality for the model's profile
      (`quality`). A profile missing from `quality` gets the mean of the known ones (1.0 if none
      is known) and a note. A zero price is raised to the smallest positive price in the pool
      (1 USD/M if all are free) so that free models do not take an unbounded share. The shares
      are floored to whole tokens and the remainder goes to the largest shares, so they sum to
      `totalTokens` exactly.
    """
    res = BudgetResolution()
    if budgets is None:
        return res
    names = [m.name for m in models]
    if budgets.per_model is not None:
        unknown = sorted(set(budgets.per_model) - set(names))
        if unknown:
            raise PolicyReferenceError(
                "UnknownModels",
                f"spec.budgets.perModel names model(s) {unknown} that pool has not; it has {names}",
            )
        res.tokens = {m: int(budgets.per_model[m]) for m in names if m in budgets.per_model}
        return res
    if budgets.total_tokens is None or not models:
        return res
    quality = dict(quality or {})
    known = [quality[m.history_profile] for m in models if m.history_profile in quality]
    fallback = sum(known) / len(known) if known else 1.0
    perf = []
    for m in models:
        if m.history_profile in quality:
            perf.append(quality[m.history_profile])
        else:
            perf.append(fallback)
            if budgets.split in ("weighted", "perf"):
                res.notes.append(
                    f"no history quality for profile {m.history_profile!r} of model {m.name!r}; used {fallback:.3f}"
                )
    prices = [_price_per_token(m) for m in models]
    positive = [p for p in prices if p > 0]
    floor = min(positive) if positive else 1.0
    cost = [p if p > 0 else floor for p in prices]
    weights = [float(w) for w in split_weights(perf, cost, budgets.split)]  # type: ignore[arg-type]
    total = budgets.total_tokens
    raw = [total * w for w in weights]
    shares = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (shares[i] - raw[i], -raw[i]))[: total - sum(shares)]:
        shares[i] += 1
    res.tokens = dict(zip(names, shares, strict=True))
    return res


def replica_share(replicas: int) -> float:
    """Each router replica enforces 1/replicas of every budget (0 replicas: nothing runs)."""
    return 1.0 / replicas if replicas > 1 else 1.0


def router_config(
    policy: str,
    spec: RoutingPolicySpec,
    pool: str,
    namespace: str,
    pool_spec: ModelPoolSpec,
    ready_replicas: Mapping[str, int],
    quality: Mapping[str, float] | None = None,
) -> tuple[RouterConfig, BudgetResolution]:
    """The RouterConfig for a policy over its pool.

    `ready_replicas`: model name -> ready replicas of its Deployment (0: the router treats the
    model as unavailable and degrades). External endpoints count as one replica.
    """
    backends = []
    for model in pool_spec.models:
        external = model.endpoint
        backends.append(
            BackendConfig(
                name=model.name,
                url=model_endpoint(pool, namespace, model),
                profile=model.history_profile,
                price=model.cost,
                replicas=1 if external is not None else max(int(ready_replicas.get(model.name, 0)), 0),
                api_key_env=backend_api_key_env(model.name)
                if external is not None and external.api_key_secret
                else None,
                upstream_model=external.upstream_model if external is not None else None,
            )
        )
    if spec.served_model_name in {m.name for m in pool_spec.models}:
        raise PolicyReferenceError(
            "ServedNameCollides",
            f"spec.servedModelName {spec.served_model_name!r} is also a model name in pool {pool!r}; pick another",
        )
    budgets = resolve_budgets(spec.budgets, pool_spec.models, quality)
    history = spec.history
    config = RouterConfig(
        served_model_name=spec.served_model_name,
        backends=backends,
        objective=spec.objective,
        history=history,
        embedding=spec.embedding,
        ann=spec.ann,
        learning=spec.learning,
        budgets=BudgetConfig(
            window_seconds=spec.budgets.window_seconds if spec.budgets else 3600,
            tokens=budgets.tokens,
            replica_share=replica_share(spec.router.replicas),
            state_file=f"{STATE_DIR}/ledger.json",
        ),
        degradation=spec.degradation,
        auth=AuthConfig(bearer_tokens_file=f"{AUTH_DIR}/{AUTH_FILE}" if spec.router.auth_secret else None),
    )
    return config, budgets


def config_checksum(config: RouterConfig) -> str:
    """sha256 of the config without the volatile ready-replica counts (those reach the router by
    hot reload; everything else rolls the router pods)."""
    wire = config.to_wire()
    for backend in wire.get("backends", []):
        backend.pop("replicas", None)
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()


def router_config_map(owner: Owner, pool: str, config: RouterConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(router_child_name(owner.name), owner, router_labels(owner.name, pool)),
        "data": {CONFIG_KEY: dump_router_config(config)},
    }


def router_deployment(
    owner: Owner, spec: RoutingPolicySpec, pool: str, pool_spec: ModelPoolSpec, config: RouterConfig
) -> dict[str, Any]:
    policy = owner.name
    labels = router_labels(policy, pool)
    router = spec.router
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": router_child_name(policy),
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
            },
        },
        {"name": "state", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    env: list[dict[str, Any]] = [
        {"name": "TOLLWAY_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HOME", "value": "/tmp"},
    ]
    if router.auth_secret is not None:
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "auth",
                "secret": {
                    "secretName": router.auth_secret.name,
                    "items": [{"key": router.auth_secret.key, "path": AUTH_FILE}],
                },
            }
        )
    if spec.history.config_map:
        mounts.append({"name": "history", "mountPath": HISTORY_DIR, "readOnly": True})
        volumes.append({"name": "history", "configMap": {"name": spec.history.config_map}})
        env.append({"name": "TOLLWAY_HISTORY_DIR", "value": HISTORY_DIR})
    for model in pool_spec.models:
        if model.endpoint is not None and model.endpoint.api_key_secret is not None:
            ref = model.endpoint.api_key_secret
            env.append(
                {
                    "name": backend_api_key_env(model.name),
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
    container: dict[str, Any] = {
        "name": "router",
        "image": router.image,
        "command": [
            "tollway",
            "router",
            "--config",
            f"{CONFIG_DIR}/{CONFIG_KEY}",
            "--host",
            "0.0.0.0",
            "--port",
            str(ROUTER_PORT),
            "--log-level",
            router.log_level,
        ],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
            "initialDelaySeconds": 10,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": ROUTER_UID,
            "runAsGroup": ROUTER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if router.resources:
        container["resources"] = json.loads(json.dumps(router.resources))
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": ROUTER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": int(config.server.drain_seconds) + 5,
        "enableServiceLinks": False,
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": router_selector(policy)},
                        },
                    }
                ]
            }
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(router_child_name(policy), owner, labels),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": router_selector(policy)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        CHECKSUM_ANNOTATION: config_checksum(config),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ROUTER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def router_service(owner: Owner, pool: str) -> dict[str, Any]:
    policy = owner.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(policy, owner, router_labels(policy, pool)),
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector(policy),
            "ports": [{"name": "http", "port": ROUTER_SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def router_pdb(owner: Owner, spec: RoutingPolicySpec, pool: str) -> dict[str, Any] | None:
    if spec.router.replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(router_child_name(owner.name), owner, router_labels(owner.name, pool)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector(owner.name)}},
    }


@dataclass
class RouterPlan:
    config: RouterConfig
    budgets: BudgetResolution
    children: list[dict[str, Any]]


def policy_children(
    owner: Owner,
    spec: RoutingPolicySpec,
    pool: str,
    pool_spec: ModelPoolSpec,
    ready_replicas: Mapping[str, int],
    quality: Mapping[str, float] | None = None,
) -> RouterPlan:
    """Everything a RoutingPolicy should own: ConfigMap, Deployment, Service, PDB (replicas > 1)."""
    check_policy_names(owner.name)
    config, budgets = router_config(
        owner.name, spec, pool, owner.namespace, pool_spec, ready_replicas, quality
    )
    children = [
        router_config_map(owner, pool, config),
        router_deployment(owner, spec, pool, pool_spec, config),
        router_service(owner, pool),
    ]
    pdb = router_pdb(owner, spec, pool)
    if pdb is not None:
        children.append(pdb)
    return RouterPlan(config=config, budgets=budgets, children=children)
