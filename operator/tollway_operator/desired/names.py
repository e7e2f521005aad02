"""Names, labels and metadata shared by everything the operator creates.

Pure functions: a pool's or policy's name in, child names, label sets, selectors and object
metadata (with the owner reference that lets the garbage collector delete children with their
owner) out. The spec checks here reject names that would make invalid child names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tollway_operator.api import API_VERSION, ModelPoolSpec, SpecError

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
COMPONENT_CALIBRATION = "calibration"

VLLM_PORT = 8000
MAX_SERVICE_NAME = 63
MAX_STATEFULSET_NAME = 52
"""The StatefulSet controller labels each pod `controller-revision-hash: <name>-<10-char hash>`,
and a label value allows 63 characters."""
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


def router_selector_text(policy: str) -> str:
    """The router pods' selector as a label-selector string (`status.routerSelector`, which the
    RoutingPolicy's scale subresource hands to an HPA)."""
    return ",".join(f"{k}={v}" for k, v in sorted(router_selector(policy).items()))


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


def child_metadata(
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


def env_name(model: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", model.upper())


def backend_api_key_env(model: str) -> str:
    """Router environment variable that carries an external backend's bearer key."""
    return f"TOLLWAY_BACKEND_{env_name(model)}_API_KEY"


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
        elif model.cache.per_replica and len(name) > MAX_STATEFULSET_NAME:
            problems.append(
                f"spec.models[{i}].name: child name {name!r} (pool name + '-' + model name) is {len(name)} "
                f"characters; a model with per-replica cache claims runs as a StatefulSet, whose names allow "
                f"{MAX_STATEFULSET_NAME}"
            )
    if problems:
        raise SpecError("; ".join(problems))


def check_policy_names(policy: str) -> None:
    if len(policy) > MAX_SERVICE_NAME or not DNS1035.match(policy):
        raise SpecError(
            f"metadata.name: {policy!r} names the router Service, so it must be a DNS-1035 label "
            f"(lower-case letters, digits, '-', starting with a letter, <= {MAX_SERVICE_NAME} characters)"
        )
