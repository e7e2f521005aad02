"""End-to-end: a pool asking for more GPUs per replica than any node has says so in its status.

The scheduler leaves the pod Pending with `PodScheduled=False, reason Unschedulable` and a message
("0/3 nodes are available: 2 Insufficient nvidia.com/gpu, ..."); the pool's Ready condition must
carry that reason within one resync of the pod becoming unschedulable.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from e2e_lib import (
    GPU,
    GPU_TOLERATION,
    Cluster,
    OperatorProcess,
    condition,
    model_pool,
    real_cluster_only,
)

pytestmark = pytest.mark.timeout(300)
MAX_GPUS_PER_MODEL = 16  # the API's bound on spec.models[].gpus


def too_big_pool(namespace: str, gpus: int) -> dict[str, Any]:
    giant = {
        "name": "giant",
        "model": "meta-llama/Llama-3.1-405B-Instruct",
        "gpus": gpus,
        "replicas": {"min": 1, "max": 1},
        "tolerations": [GPU_TOLERATION],
    }
    return model_pool("huge", namespace, giant)


def unschedulable_since(cl: Cluster) -> float | None:
    pods = cl.items("pods", "app.kubernetes.io/instance=huge-giant")
    for pod in pods:
        scheduled = condition(pod, "PodScheduled")
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            return time.monotonic()
    return None


def test_unschedulable_model_is_reported(
    cluster: Cluster, namespace: str, operator: OperatorProcess | None
) -> None:
    cl = cluster
    real_cluster_only(cl, "a scheduler")
    nodes = cl.gpu_nodes()
    if not nodes:
        pytest.skip("no Ready node advertises nvidia.com/gpu")
    gpus = max(nodes.values()) + 1
    if gpus > MAX_GPUS_PER_MODEL:
        pytest.skip(f"every GPU count a model may ask for ({MAX_GPUS_PER_MODEL}) fits on a node")
    resync = operator.resync_seconds if operator is not None else 60.0

    cl.apply([too_big_pool(namespace, gpus)])
    try:
        seen = cl.wait_for(lambda: unschedulable_since(cl), "the scheduler to give up on the pod")
        pool = cl.wait_for(
            lambda: (
                (p := cl.get("modelpool", "huge"))
                and "Unschedulable" in condition(p, "Ready").get("message", "")
                and p
            ),
            "the pool to report the pod's Unschedulable reason",
            timeout=resync + 10,
        )
        reported_after = time.monotonic() - seen
        ready = condition(pool, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "ModelsUnavailable", ready
        assert "giant" in ready["message"] and f"Insufficient {GPU}" in ready["message"], ready["message"]
        assert reported_after <= resync + 10, (
            f"reported {reported_after:.1f} s after the pod became unschedulable"
        )
        events = cl.items("events")
        assert any(
            e["involvedObject"].get("kind") == "ModelPool"
            and e["involvedObject"].get("name") == "huge"
            and e.get("type") == "Warning"
            and "Unschedulable" in e.get("message", "")
            for e in events
        ), "no Warning Event on the pool tells why"
    finally:
        cl.kubectl("delete", "modelpool", "huge", "-n", namespace, "--wait=false", check=False)
        cl.wait_for(lambda: "huge-giant" not in cl.names("deployments"), "the pool's Deployment collected")
