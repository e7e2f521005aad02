"""Desired state of a RoutingPolicy: the router's config and workload, from the policy and its pool.

RoutingPolicy `R` over pool `P`:
- ConfigMap `R-router` holding `router.yaml` (a `RouterConfig`);
- Deployment `R-router` running `tollway router`, with a checksum of the config on its pod
  template (so a change rolls the pods) — except what scaling changes: the models' ready
  `backends[].replicas` and the router's own `budgets.replicaShare`, which the router picks up by
  hot reload of the mounted file (scaling the router, by hand or by an HPA, restarts nothing),
  and each model's expected calibration revision (`backends[].calibrationRevision`, from the
  pool's status: a model whose weights change is routed by its profile again until it is
  calibrated anew), also hot-reloaded;
- Service `R` (port 80 -> 8080): the cluster-internal OpenAI endpoint http://R.N.svc/v1;
- PodDisruptionBudget `R-router` (maxUnavailable 1) when replicas > 1;
- ServiceAccount, Role and RoleBinding `R-router`: the router pods' identity, allowed to get, list
  and watch EndpointSlices in the namespace and nothing else (the router reads each model's ready
  pods from them and sends requests to the pods directly).

Shared state: with `spec.state.url`, `spec.state.urlSecret` or the operator's default Redis
(`TOLLWAY_ROUTER_STATE_URL`, set by the chart's `redis.*` values) every router replica keeps its
budgets, dual prices and learned history in that Redis under the key `N/R`; the URL from a Secret
reaches the router as `$TOLLWAY_STATE_URL`, never through the ConfigMap.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router_service.config import (
    AuthConfig,
    BackendConfig,
    BudgetConfig,
    EndpointSliceSource,
    RouterConfig,
    StateConfig,
    dump_router_config,
)
from router_service.routing.budgets import split_weights
from tollway_operator.api import (
    DEFAULT_TOLLWAY_IMAGE,
    BudgetsSpec,
    ModelPoolSpec,
    ModelSpec,
    RoutingPolicySpec,
)
from tollway_operator.desired.names import (
    Owner,
    backend_api_key_env,
    check_policy_names,
    child_metadata,
    model_child_name,
    router_child_name,
    router_labels,
    router_selector,
)
from tollway_operator.desired.pool import model_endpoint
from tollway_operator.desired.sizing import vllm_flag

ROUTER_PORT = 8080
ROUTER_SERVICE_PORT = 80
CONFIG_DIR = "/etc/tollway"
CONFIG_KEY = "router.yaml"
AUTH_DIR = "/etc/tollway/auth"
AUTH_FILE = "tokens"
HISTORY_DIR = "/etc/tollway/history"
STATE_DIR = "/var/lib/tollway"
CACHE_DIR = "/var/cache/tollway"
ROUTER_UID = 65532
ROUTER_PRESTOP_SECONDS = 5
"""A stopping router keeps serving this long before its drain starts, while the endpoints drop it
(otherwise new connections meet a closed port in that window)."""
CHECKSUM_ANNOTATION = "tollway.io/config-checksum"
STATE_URL_ENV = "TOLLWAY_STATE_URL"
"""The router reads its Redis URL from here when the policy names a Secret (router_service.store)."""
DEFAULT_STATE_URL_ENV = "TOLLWAY_ROUTER_STATE_URL"
"""The operator's default Redis for every policy that names none (the chart's redis.* values)."""


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
    - `totalTokens`: split by `split` with `router_service.routing.budgets.split_weights`, cost = the
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
    """Each router replica enforces 1/replicas of every budget (0 replicas: nothing runs). With a
    shared store the router ignores it, except while it has never reached the store."""
    return 1.0 / replicas if replicas > 1 else 1.0


def router_replicas(spec: RoutingPolicySpec, live_replicas: int | None) -> int:
    """How many router replicas there are meant to be: `spec.router.replicas`, or with
    `replicasOwner: external` whatever the live Deployment says (spec until it exists)."""
    if spec.router.replicas_owner == "external" and live_replicas is not None:
        return live_replicas
    return spec.router.replicas


def state_config(
    owner_namespace: str, policy: str, spec: RoutingPolicySpec, default_url: str | None
) -> StateConfig:
    """The router's shared-state settings: the policy's own, else the operator's default Redis."""
    settings = spec.state
    url = default_url
    if settings is not None and settings.url_secret is not None:
        url = None  # the router reads it from $TOLLWAY_STATE_URL
    elif settings is not None and settings.url is not None:
        url = settings.url
    base = settings.model_dump(exclude={"url", "url_secret"}) if settings is not None else {}
    return StateConfig(url=url, key=f"{owner_namespace}/{policy}", **base)


def router_config(
    policy: str,
    spec: RoutingPolicySpec,
    pool: str,
    namespace: str,
    pool_spec: ModelPoolSpec,
    ready_replicas: Mapping[str, int],
    quality: Mapping[str, float] | None = None,
    *,
    live_router_replicas: int | None = None,
    default_state_url: str | None = None,
    calibration_revisions: Mapping[str, str] | None = None,
) -> tuple[RouterConfig, BudgetResolution]:
    """The RouterConfig for a policy over its pool.

    `ready_replicas`: model name -> ready replicas of its Deployment (0: the router treats the
    model as unavailable and degrades). External endpoints count as one replica.
    `live_router_replicas`: the router Deployment's replicas now (None: not created yet).
    `default_state_url`: the operator's default Redis for policies that name none.
    `calibration_revisions`: model -> the calibration revision it is routed by once calibrated
    (the pool's `status.calibration`); a model without one takes any calibration pushed for it.
    """
    calibration_revisions = calibration_revisions or {}
    backends = []
    for model in pool_spec.models:
        external = model.endpoint
        key_ref = pool_spec.backend_key_secret_for(model)
        backends.append(
            BackendConfig(
                name=model.name,
                url=model_endpoint(pool, namespace, model),
                profile=model.history_profile,
                price=model.cost,
                replicas=1 if external is not None else max(int(ready_replicas.get(model.name, 0)), 0),
                api_key_env=backend_api_key_env(model.name) if key_ref is not None else None,
                upstream_model=external.upstream_model if external is not None else None,
                # What the router needs to know of the vLLM server: its concurrency (to see a burst
                # queue up between metric scrapes) and its context window (to bound a request).
                max_num_seqs=vllm_flag(model.extra_args, "--max-num-seqs") if external is None else None,
                max_model_len=model.max_model_len if external is None else None,
                endpoint_slices=model_endpoint_slices(pool, namespace, model),
                calibration_revision=calibration_revisions.get(model.name),
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
        estimator=spec.estimator,
        learning=spec.learning,
        budgets=BudgetConfig(
            window_seconds=spec.budgets.window_seconds if spec.budgets else 3600,
            tokens=budgets.tokens,
            replica_share=replica_share(router_replicas(spec, live_router_replicas)),
            state_file=f"{STATE_DIR}/ledger.json",
        ),
        state=state_config(namespace, policy, spec, default_state_url),
        degradation=spec.degradation,
        auth=AuthConfig(bearer_tokens_file=f"{AUTH_DIR}/{AUTH_FILE}" if spec.router.auth_secret else None),
    )
    return config, budgets


def config_checksum(config: RouterConfig) -> str:
    """sha256 of the config without what scaling and calibration change: the models' ready-replica
    counts, the router's own share of the budgets and the expected calibration revisions (they
    reach the router by hot reload; everything else rolls the router pods)."""
    wire = config.to_wire()
    for backend in wire.get("backends", []):
        backend.pop("replicas", None)
        backend.pop("calibrationRevision", None)
    wire.get("budgets", {}).pop("replicaShare", None)
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()


def router_config_map(owner: Owner, pool: str, config: RouterConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(router_child_name(owner.name), owner, router_labels(owner.name, pool)),
        "data": {CONFIG_KEY: dump_router_config(config)},
    }


def router_deployment(
    owner: Owner,
    spec: RoutingPolicySpec,
    pool: str,
    pool_spec: ModelPoolSpec,
    config: RouterConfig,
    live_replicas: int | None = None,
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
        # The replica's name in the shared store (heartbeats, reservation ids).
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if spec.state is not None and spec.state.url_secret is not None:
        ref = spec.state.url_secret
        env.append({"name": STATE_URL_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
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
        # A backend's bearer key: an external endpoint's, or the key the pool's vLLM servers require.
        ref = pool_spec.backend_key_secret_for(model)
        if ref is not None:
            env.append(
                {
                    "name": backend_api_key_env(model.name),
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
    container: dict[str, Any] = {
        "name": "router",
        "image": router.image or DEFAULT_TOLLWAY_IMAGE,
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
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(ROUTER_PRESTOP_SECONDS)]}}},
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
        "serviceAccountName": router_child_name(policy),
        "automountServiceAccountToken": True,
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": ROUTER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # preStop, then the drain (in-flight requests finish, /readyz 503), then exit.
        "terminationGracePeriodSeconds": ROUTER_PRESTOP_SECONDS + int(config.server.drain_seconds) + 5,
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
        "metadata": child_metadata(router_child_name(policy), owner, labels),
        "spec": {
            "replicas": router_replicas(spec, live_replicas),
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
        "metadata": child_metadata(policy, owner, router_labels(policy, pool)),
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector(policy),
            "ports": [{"name": "http", "port": ROUTER_SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def router_pdb(owner: Owner, replicas: int, pool: str) -> dict[str, Any] | None:
    if replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(router_child_name(owner.name), owner, router_labels(owner.name, pool)),
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
    *,
    live_router_replicas: int | None = None,
    default_state_url: str | None = None,
    calibration_revisions: Mapping[str, str] | None = None,
) -> RouterPlan:
    """Everything a RoutingPolicy should own: the router's ServiceAccount, Role and RoleBinding,
    ConfigMap, Deployment, Service, PDB (replicas > 1).

    `live_router_replicas`: the router Deployment's spec.replicas now (None: not created yet),
    kept when `spec.router.replicasOwner` is external. `default_state_url`: the operator's
    default Redis (`TOLLWAY_ROUTER_STATE_URL`)."""
    check_policy_names(owner.name)
    config, budgets = router_config(
        owner.name,
        spec,
        pool,
        owner.namespace,
        pool_spec,
        ready_replicas,
        quality,
        live_router_replicas=live_router_replicas,
        default_state_url=default_state_url,
        calibration_revisions=calibration_revisions,
    )
    children = [
        *router_access(owner, pool),  # first: the Deployment's pods run as this ServiceAccount
        router_config_map(owner, pool, config),
        router_deployment(owner, spec, pool, pool_spec, config, live_router_replicas),
        router_service(owner, pool),
    ]
    pdb = router_pdb(owner, router_replicas(spec, live_router_replicas), pool)
    if pdb is not None:
        children.append(pdb)
    return RouterPlan(config=config, budgets=budgets, children=children)


# --- the router's access to EndpointSlices (issue 13) ---------------------------------------------

ENDPOINT_SLICE_RULE = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["get", "list", "watch"],
}
"""All the router may do with the Kubernetes API: read the EndpointSlices of its namespace."""


def model_endpoint_slices(pool: str, namespace: str, model: ModelSpec) -> EndpointSliceSource | None:
    """Where the router finds a deployed model's ready pods: its Service's EndpointSlices (the
    Service's port is named `http`). None for an external endpoint."""
    if model.endpoint is not None:
        return None
    return EndpointSliceSource(
        service=model_child_name(pool, model.name), namespace=namespace, port_name="http"
    )


def router_access(owner: Owner, pool: str) -> list[dict[str, Any]]:
    """The router pods' ServiceAccount, a Role that lets it get/list/watch EndpointSlices in this
    namespace, and the RoleBinding between them."""
    name = router_child_name(owner.name)
    labels = router_labels(owner.name, pool)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": child_metadata(name, owner, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": child_metadata(name, owner, labels),
            "rules": [ENDPOINT_SLICE_RULE],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": child_metadata(name, owner, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]
