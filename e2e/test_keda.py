"""End-to-end: in KEDA mode the operator leaves `spec.replicas` to KEDA.

A model that may scale to zero starts at zero replicas; KEDA (an HPA) owns `spec.replicas` from
then on. Resyncs must never touch it: a real API server defaults a `replicas: null` to 1, which
would wake a 4-GPU model and fight KEDA. A changed bound is carried into the ScaledObject, and
switching the pool to the operator's own autoscaler removes it. The ScaledObject API comes from the `keda_crd` fixture
(KEDA's own CRD where KEDA is installed).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from e2e_lib import GPU_TOLERATION, Cluster, OperatorProcess, model_pool

pytestmark = pytest.mark.timeout(300)
RESYNCS = 3


def keda_pool(namespace: str) -> dict[str, Any]:
    large = {
        "name": "large",
        "model": "Qwen/Qwen2.5-72B-Instruct",
        "gpus": 4,
        "replicas": {"min": 0, "max": 2},
        "tolerations": [GPU_TOLERATION],
    }
    autoscaling = {
        "mode": "keda",
        "prometheusUrl": "http://prometheus.monitoring.svc:9090",
        "scaleToZero": True,
    }
    return model_pool("keda", namespace, large, autoscaling=autoscaling)


def test_keda_mode_keeps_a_scaled_to_zero_model_at_zero(
    cluster: Cluster, namespace: str, keda_crd: None, operator: OperatorProcess | None
) -> None:
    cl = cluster
    if operator is None:
        pytest.skip("counts the out-of-cluster operator's resyncs (TOLLWAY_E2E_OPERATOR=in-cluster)")
    cl.apply([keda_pool(namespace)])
    try:
        cl.wait_for(lambda: "keda-large" in cl.names("scaledobjects"), "the ScaledObject")
        dep = cl.wait_for(lambda: cl.get("deployment", "keda-large"), "the Deployment")
        assert dep["spec"]["replicas"] == 0
        start = operator.resyncs()
        deadline = time.monotonic() + operator.resync_seconds * (RESYNCS + 2) + 30
        seen: list[int | None] = []
        while operator.resyncs() < start + RESYNCS:
            assert time.monotonic() < deadline, f"fewer than {RESYNCS} resyncs:\n{operator.log_tail()}"
            seen.append((cl.get("deployment", "keda-large") or {}).get("spec", {}).get("replicas"))
            time.sleep(0.3)
        seen.append(cl.get("deployment", "keda-large")["spec"].get("replicas"))
        assert set(seen) == {0}, f"spec.replicas over {RESYNCS} resyncs: {seen}"
        assert not cl.items("pods", "app.kubernetes.io/instance=keda-large"), "a pod was started"

        # A new bound reaches the ScaledObject; leaving KEDA mode removes it (the model stays at zero).
        models = keda_pool(namespace)["spec"]["models"]
        models[0]["replicas"]["max"] = 3
        cl.merge_patch("modelpool", "keda", {"spec": {"models": models}})
        cl.wait_for(
            lambda: (cl.get("scaledobject", "keda-large") or {}).get("spec", {}).get("maxReplicaCount") == 3,
            "the ScaledObject's maxReplicaCount 3",
        )
        cl.merge_patch("modelpool", "keda", {"spec": {"autoscaling": {"mode": "operator"}}})
        cl.wait_for(lambda: "keda-large" not in cl.names("scaledobjects"), "the ScaledObject removed")
        assert cl.get("deployment", "keda-large")["spec"]["replicas"] == 0
    finally:
        cl.kubectl("delete", "modelpool", "keda", "-n", namespace, "--wait=false", check=False)
        cl.wait_for(lambda: "keda-large" not in cl.names("deployments"), "the pool's Deployment collected")
