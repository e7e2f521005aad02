"""End-to-end: the tollway lifecycle against whatever cluster the fixtures provide.

Only kubectl and the public API are used. On a real cluster the garbage collector and the
Deployment controller are real, but model pods will not get GPUs there, so assertions that need
ready pods run only on the emulator or with TOLLWAY_E2E_EXPECT_READY=1.
"""

from __future__ import annotations

import copy
import os
import urllib.request
from typing import Any

import pytest
import yaml
from e2e_lib import REPO_ROOT, Cluster

from router_service.config import RouterConfig

pytestmark = pytest.mark.timeout(600)
EXAMPLES = REPO_ROOT / "manifests" / "examples"
MODEL_DEPLOYMENTS = {"chat-small", "chat-medium", "chat-large"}


def examples(namespace: str) -> list[dict[str, Any]]:
    docs = []
    for name in ("modelpool", "routingpolicy"):
        doc = copy.deepcopy(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))
        doc["metadata"]["namespace"] = namespace
        docs.append(doc)
    return docs


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c.get("type") == type_:
            return c
    return {}


def current(obj: dict[str, Any] | None) -> bool:
    """Status written for the object's current generation, with a reason on every condition."""
    if not obj:
        return False
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    return (
        st.get("observedGeneration") == obj["metadata"].get("generation")
        and len(conds) >= 3
        and all(c.get("reason") for c in conds)
    )


def with_current_status(cl: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    obj = cl.get(kind, name)
    return obj if current(obj) else None


def router_config(cl: Cluster) -> RouterConfig | None:
    cm = cl.get("configmap", "chat-auto-router")
    return RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"])) if cm else None


def args_of(cl: Cluster, name: str) -> list[str]:
    dep = cl.get("deployment", name)
    return dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else []


def test_lifecycle(cluster: Cluster, namespace: str, operator: str) -> None:
    cl = cluster
    expect_ready = cl.emulated or os.environ.get("TOLLWAY_E2E_EXPECT_READY") == "1"

    # 1. Apply the examples: children appear.
    out = cl.apply(examples(namespace))
    assert "modelpool.tollway.io/chat created" in out and "routingpolicy.tollway.io/chat-auto created" in out
    cl.wait_for(
        lambda: MODEL_DEPLOYMENTS | {"chat-auto-router"} <= cl.names("deployments"), "the Deployments"
    )
    cl.wait_for(lambda: MODEL_DEPLOYMENTS | {"chat-auto"} <= cl.names("services"), "the Services")
    config = cl.wait_for(lambda: router_config(cl), "the router ConfigMap")
    assert [b.name for b in config.backends] == ["small", "medium", "large"]
    assert config.backends[0].url == f"http://chat-small.{namespace}.svc.cluster.local:8000"
    assert sum(config.budgets.tokens.values()) == 20_000_000
    medium = cl.get("deployment", "chat-medium")
    assert medium["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert medium["metadata"]["ownerReferences"][0]["kind"] == "ModelPool"
    svc = cl.get("service", "chat-auto")
    assert svc["spec"]["ports"][0]["port"] == 80

    # 2. Status conditions are written for the current generation and tell the truth.
    pool = cl.wait_for(lambda: with_current_status(cl, "modelpool", "chat"), "pool status")
    policy = cl.wait_for(lambda: with_current_status(cl, "routingpolicy", "chat-auto"), "policy status")
    assert policy["status"]["endpoint"] == f"http://chat-auto.{namespace}.svc/v1"
    auto = pool["status"].get("autoscaling")
    if auto and auto.get("healthy") is False:  # e.g. the example's Prometheus is not reachable from here
        degraded = cl.wait_for(
            lambda: (c := condition(cl.get("modelpool", "chat"), "Degraded")).get("status") == "True" and c,
            "Degraded from the autoscaler",
        )
        assert degraded["reason"] == (
            cl.get("modelpool", "chat")["status"]["autoscaling"].get("reason") or "AutoscalerUnhealthy"
        )
    if expect_ready:
        cl.wait_for(
            lambda: condition(cl.get("modelpool", "chat"), "Ready").get("status") == "True", "pool Ready"
        )
        cl.wait_for(
            lambda: condition(cl.get("routingpolicy", "chat-auto"), "Ready").get("status") == "True",
            "policy Ready",
        )
    else:  # no GPUs: the models cannot be ready, and the pool must say so
        ready = cl.wait_for(
            lambda: condition(cl.get("modelpool", "chat"), "Ready") or None,
            "pool Ready condition",
        )
        if ready["status"] == "False":
            assert ready["reason"] == "ModelsUnavailable"
    if operator.startswith("http://"):
        metrics = urllib.request.urlopen(operator, timeout=5).read().decode()
        assert "tollway_operator_reconciles_total" in metrics

    # 3. A spec change rolls through to the Deployment (and the generation is observed).
    models = examples(namespace)[0]["spec"]["models"]
    models[0]["maxModelLen"] = 4096
    cl.kubectl(
        "patch",
        "modelpool",
        "chat",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        yaml.safe_dump({"spec": {"models": models}}),
    )
    cl.wait_for(lambda: "4096" in args_of(cl, "chat-small"), "the new --max-model-len")
    cl.wait_for(
        lambda: (
            (p := cl.get("modelpool", "chat"))["status"].get("observedGeneration")
            == p["metadata"]["generation"]
        ),
        "observedGeneration",
    )

    # 4. A child deleted by hand is restored.
    uid = cl.get("service", "chat-small")["metadata"]["uid"]
    cl.kubectl("delete", "service", "chat-small", "-n", namespace)
    cl.wait_for(
        lambda: (s := cl.get("service", "chat-small")) and s["metadata"]["uid"] != uid, "the Service restored"
    )

    # 5. Removing a model removes its children and its backend.
    models = [m for m in models if m["name"] != "medium"]
    cl.kubectl(
        "patch",
        "modelpool",
        "chat",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        yaml.safe_dump({"spec": {"models": models}}),
    )
    cl.wait_for(
        lambda: "chat-medium" not in cl.names("deployments") and "chat-medium" not in cl.names("services"),
        "medium removed",
    )
    cl.wait_for(lambda: [b.name for b in router_config(cl).backends] == ["small", "large"], "backend removed")

    # 6. Deleting the parents cascades (the garbage collector, real or emulated).
    cl.kubectl("delete", "routingpolicy", "chat-auto", "-n", namespace, "--wait=false")
    cl.kubectl("delete", "modelpool", "chat", "-n", namespace, "--wait=false")
    cl.wait_for(
        lambda: not cl.names("modelpools") and not cl.names("routingpolicies"),
        "the custom resources gone",
        timeout=cl.timeout * 3,
    )
    cl.wait_for(
        lambda: (
            not cl.names("deployments") and not (cl.names("services") & (MODEL_DEPLOYMENTS | {"chat-auto"}))
        ),
        "the children collected",
        timeout=cl.timeout * 3,
    )
    assert "chat-auto-router" not in cl.names("configmaps")
