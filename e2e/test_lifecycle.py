"""End-to-end: the tollway lifecycle with the example pool and policy, against whatever cluster the
fixtures provide.

Only kubectl and the public API are used. On a real cluster the garbage collector, the Deployment
controller and the scheduler are real, and the operator acts as the chart's ServiceAccount. Model
pods need GPUs: the suite asserts that they are scheduled and become Ready only on the emulator
(which plays the Deployment controller) or with TOLLWAY_E2E_EXPECT_READY=1 (a cluster whose GPU
nodes can run them; the local control plane's fake nodes can). Without it the pool must say why it
is not Ready.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import yaml
from e2e_lib import GPU, REPO_ROOT, Cluster, OperatorProcess, condition, current

from router_service.config import RouterConfig

pytestmark = pytest.mark.timeout(900)
EXAMPLES = REPO_ROOT / "manifests" / "examples"
MODEL_DEPLOYMENTS = {"chat-small"}
MODEL_STATEFULSETS = {"chat-medium", "chat-large"}
"""`medium` and `large` cache their weights on per-replica claims: StatefulSets."""
MODEL_WORKLOADS = MODEL_DEPLOYMENTS | MODEL_STATEFULSETS


def examples(namespace: str) -> list[dict[str, Any]]:
    docs = []
    for name in ("modelpool", "routingpolicy"):
        doc = copy.deepcopy(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))
        doc["metadata"]["namespace"] = namespace
        docs.append(doc)
    return docs


def hf_token_secret(namespace: str) -> dict[str, Any]:
    """The Secret the example's gated models read their Hugging Face token from."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token", "namespace": namespace},
        "stringData": {"token": "hf_e2e_placeholder"},
    }


def with_current_status(cl: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    obj = cl.get(kind, name)
    return obj if current(obj) else None


def router_config(cl: Cluster) -> RouterConfig | None:
    cm = cl.get("configmap", "chat-auto-router")
    return RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"])) if cm else None


def workload(cl: Cluster, name: str) -> dict[str, Any] | None:
    kind = "statefulset" if name in MODEL_STATEFULSETS else "deployment"
    return cl.get(kind, name)


def args_of(cl: Cluster, name: str) -> list[str]:
    dep = workload(cl, name)
    return dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else []


def workloads(cl: Cluster) -> set[str]:
    return cl.names("deployments") | cl.names("statefulsets")


def running_model_pods(cl: Cluster, deployment: str, gpus: int) -> list[dict[str, Any]] | None:
    """The workload's pods when all of them run, each on a GPU node with `gpus` GPUs asked for,
    and with CPU and memory requests (not BestEffort, the first evicted under memory pressure)."""
    dep = workload(cl, deployment)
    want = int(dep["spec"].get("replicas", 1)) if dep else -1
    pods = cl.items("pods", f"app.kubernetes.io/instance={deployment}")
    pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if len(pods) != want:
        return None
    gpu_nodes = cl.gpu_nodes()
    for pod in pods:
        limits = pod["spec"]["containers"][0]["resources"].get("limits") or {}
        assert limits.get(GPU) == str(gpus), f"{pod['metadata']['name']} asks for {limits.get(GPU)} GPUs"
        assert pod["status"].get("qosClass") in {"Burstable", "Guaranteed"}, pod["status"].get("qosClass")
        node = pod["spec"].get("nodeName")
        if (
            not node
            or pod["status"].get("phase") != "Running"
            or condition(pod, "Ready").get("status") != "True"
        ):
            return None
        assert gpu_nodes.get(node, 0) >= gpus, f"{pod['metadata']['name']} runs on {node}, not a GPU node"
    return pods


def bound(cl: Cluster, claim: str) -> bool:
    return ((cl.get("persistentvolumeclaim", claim) or {}).get("status") or {}).get("phase") == "Bound"


def test_lifecycle(cluster: Cluster, namespace: str, operator: OperatorProcess | None) -> None:
    cl = cluster
    expect_ready = cl.emulated or os.environ.get("TOLLWAY_E2E_EXPECT_READY") == "1"

    # 1. Apply the examples: children appear.
    cl.apply([hf_token_secret(namespace)])
    out = cl.apply(examples(namespace))
    assert "modelpool.tollway.io/chat created" in out and "routingpolicy.tollway.io/chat-auto created" in out
    cl.wait_for(
        lambda: MODEL_DEPLOYMENTS | {"chat-auto-router"} <= cl.names("deployments"), "the Deployments"
    )
    cl.wait_for(lambda: cl.names("statefulsets") >= MODEL_STATEFULSETS, "the StatefulSets")
    cl.wait_for(lambda: MODEL_WORKLOADS | {"chat-auto"} <= cl.names("services"), "the Services")
    cl.wait_for(lambda: "chat-auto-router" in cl.names("poddisruptionbudgets"), "the PodDisruptionBudget")
    config = cl.wait_for(lambda: router_config(cl), "the router ConfigMap")
    assert [b.name for b in config.backends] == ["small", "medium", "large"]
    assert config.backends[0].url == f"http://chat-small.{namespace}.svc.cluster.local:8000"
    assert sum(config.budgets.tokens.values()) == 20_000_000
    medium = cl.get("statefulset", "chat-medium")
    assert medium["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == "2"
    assert medium["metadata"]["ownerReferences"][0]["kind"] == "ModelPool"
    for name in MODEL_WORKLOADS:  # the pool's GPU scheduling defaults reach every model
        pod_spec = workload(cl, name)["spec"]["template"]["spec"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    svc = cl.get("service", "chat-auto")
    assert svc["spec"]["ports"][0]["port"] == 80

    # 2. Model pods are scheduled onto the tainted GPU nodes with their GPU count and run (real
    #    clusters); each replica of `medium` gets its own cache claim.
    models = examples(namespace)[0]["spec"]["models"]
    if expect_ready and not cl.emulated:
        assert cl.gpu_nodes(), "TOLLWAY_E2E_EXPECT_READY=1 but no Ready node advertises nvidia.com/gpu"
        for deployment, gpus in (("chat-small", 1), ("chat-medium", 2)):
            cl.wait_for(
                lambda d=deployment, g=gpus: running_model_pods(cl, d, g), f"{deployment}'s pods Running"
            )
        # `large` may scale to zero and starts there: no pod, no GPU taken, no claim.
        assert cl.get("statefulset", "chat-large")["spec"]["replicas"] == 0
        assert cl.items("pods", "app.kubernetes.io/instance=chat-large") == []
        cl.wait_for(lambda: bound(cl, "model-cache-chat-medium-0"), "medium's replica claim Bound")
        # Wake `large` (min 1): every model of the example then runs, `large` on a GPU node of its own.
        models[2]["replicas"]["min"] = 1
        cl.merge_patch("modelpool", "chat", {"spec": {"models": models}})
        cl.wait_for(lambda: running_model_pods(cl, "chat-large", 4), "chat-large's pod Running")
        cl.wait_for(lambda: bound(cl, "model-cache-chat-large-0"), "large's replica claim Bound")

    # 3. Status conditions are written for the current generation and tell the truth.
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
    else:  # the models cannot be ready here, and the pool must say so
        ready = cl.wait_for(
            lambda: condition(cl.get("modelpool", "chat"), "Ready") or None,
            "pool Ready condition",
        )
        if ready["status"] == "False":
            assert ready["reason"] == "ModelsUnavailable"
    if operator is not None:
        assert operator.total("tollway_operator_reconciles_total", kind="ModelPool") > 0

    # 4. A spec change rolls through to the Deployment (and the generation is observed).
    models[0]["maxModelLen"] = 4096
    cl.merge_patch("modelpool", "chat", {"spec": {"models": models}})
    cl.wait_for(lambda: "4096" in args_of(cl, "chat-small"), "the new --max-model-len")
    cl.wait_for(
        lambda: (
            (p := cl.get("modelpool", "chat"))["status"].get("observedGeneration")
            == p["metadata"]["generation"]
        ),
        "observedGeneration",
    )

    # 4b. A cache claim can grow only where its StorageClass allows it, and never shrink: the pool
    #     says so (the test cluster's `standard` class does not allow expansion).
    if expect_ready and not cl.emulated:

        def cache_condition(reason: str) -> dict[str, Any] | None:
            c = condition(cl.get("modelpool", "chat"), "CacheSizeApplied")
            return c if c.get("reason") == reason else None

        assert cl.wait_for(lambda: cache_condition("AsRequested"), "CacheSizeApplied")["status"] == "True"
        for size, reason in (("200Gi", "ExpansionRefused"), ("100Gi", "CannotShrink")):
            models[2]["cache"]["size"] = size
            cl.merge_patch("modelpool", "chat", {"spec": {"models": models}})
            cached = cl.wait_for(lambda r=reason: cache_condition(r), f"CacheSizeApplied {reason}")
            assert cached["status"] == "False" and "model-cache-chat-large-0" in cached["message"], cached
            if reason == "ExpansionRefused":  # the API server's own answer, not RBAC's
                assert "resize" in cached["message"] and "forbidden: User" not in cached["message"], cached
            # The StatefulSet keeps its claim template (the API refuses changes to it): no failed reconcile.
            assert condition(cl.get("modelpool", "chat"), "Degraded").get("reason") != "ReconcileFailed"
        del models[2]["cache"]["size"]
        cl.merge_patch("modelpool", "chat", {"spec": {"models": models}})
        cl.wait_for(lambda: cache_condition("AsRequested"), "CacheSizeApplied back to AsRequested")

    # 5. A child deleted by hand is restored.
    uid = cl.get("service", "chat-small")["metadata"]["uid"]
    cl.kubectl("delete", "service", "chat-small", "-n", namespace)
    cl.wait_for(
        lambda: (s := cl.get("service", "chat-small")) and s["metadata"]["uid"] != uid, "the Service restored"
    )

    # 5b. Children edited by hand are put back (a merge patch of the fields the operator owns).
    config_text = cl.get("configmap", "chat-auto-router")["data"]["router.yaml"]
    edits = {
        ("service", "chat-auto"): {"spec": {"ports": [{"name": "http", "port": 81, "targetPort": "http"}]}},
        ("configmap", "chat-auto-router"): {"data": {"router.yaml": "edited: by hand\n"}},
        ("poddisruptionbudget", "chat-auto-router"): {"spec": {"maxUnavailable": 2}},
    }
    for (kind, name), patch in edits.items():
        cl.merge_patch(kind, name, patch)
    cl.wait_for(lambda: cl.get("service", "chat-auto")["spec"]["ports"][0]["port"] == 80, "the port put back")
    cl.wait_for(
        lambda: cl.get("configmap", "chat-auto-router")["data"]["router.yaml"] == config_text,
        "the router config put back",
    )
    cl.wait_for(
        lambda: cl.get("poddisruptionbudget", "chat-auto-router")["spec"]["maxUnavailable"] == 1,
        "the PodDisruptionBudget put back",
    )

    # 6. Removing a model removes its children (its cache claims too: retention Delete) and its backend.
    models = [m for m in models if m["name"] != "medium"]
    cl.merge_patch("modelpool", "chat", {"spec": {"models": models}})
    cl.wait_for(
        lambda: (
            "chat-medium" not in workloads(cl)
            and "chat-medium" not in cl.names("services")
            and not [c for c in cl.names("persistentvolumeclaims") if "chat-medium" in c]
        ),
        "medium's StatefulSet, Service and claims removed",
    )
    cl.wait_for(lambda: [b.name for b in router_config(cl).backends] == ["small", "large"], "backend removed")
    pool = cl.wait_for(lambda: with_current_status(cl, "modelpool", "chat"), "pool status after the removal")
    assert condition(pool, "Degraded").get("reason") != "ReconcileFailed", condition(pool, "Degraded")

    # 7. One router replica needs no PodDisruptionBudget: it goes.
    cl.merge_patch("routingpolicy", "chat-auto", {"spec": {"router": {"replicas": 1}}})
    cl.wait_for(lambda: "chat-auto-router" not in cl.names("poddisruptionbudgets"), "the PDB removed")
    cl.wait_for(lambda: cl.get("deployment", "chat-auto-router")["spec"]["replicas"] == 1, "one router")

    # 8. Deleting the parents cascades (the garbage collector, real or emulated).
    cl.kubectl("delete", "routingpolicy", "chat-auto", "-n", namespace, "--wait=false")
    cl.kubectl("delete", "modelpool", "chat", "-n", namespace, "--wait=false")
    cl.wait_for(
        lambda: not cl.names("modelpools") and not cl.names("routingpolicies"),
        "the custom resources gone",
        timeout=cl.timeout * 3,
    )
    cl.wait_for(
        lambda: (
            not (workloads(cl) & (MODEL_WORKLOADS | {"chat-auto-router"}))
            and not (cl.names("services") & (MODEL_WORKLOADS | {"chat-auto"}))
            and not cl.names("poddisruptionbudgets")
            and "chat-auto-router" not in cl.names("configmaps")
        ),
        "the children collected",
        timeout=cl.timeout * 3,
    )
    # `large`'s cache outlives its pool (retention Retain, the default): a pool of the same name
    # would find the weights again. Nothing else of the pool's is left.
    retained = {c for c in cl.names("persistentvolumeclaims") if "chat-" in c}
    assert retained == ({"model-cache-chat-large-0"} if expect_ready and not cl.emulated else set()), retained
    for name in retained:
        cl.kubectl("delete", "persistentvolumeclaim", name, "-n", namespace, "--wait=false")
