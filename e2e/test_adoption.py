"""End-to-end: a pool and policy deleted with `--cascade=orphan` and applied again take their children back.

The garbage collector strips the old owners from the children and leaves them running. Applied again
(new uids), the operator finds each child's name taken, reads the object and adopts it: the Deployments,
Services, the NetworkPolicy, the router's ConfigMap, PodDisruptionBudget, ServiceAccount, Role and
RoleBinding and the ScaledObject get the new owner, the same objects (same uid), and the model's pods keep
running (no rollout). The shared cache claim and the calibration Job, which are never patched, are reused
as they are.
"""

from __future__ import annotations

from typing import Any

import pytest
from e2e_lib import (
    SHARED_CACHE,
    Cluster,
    OperatorProcess,
    current,
    model_pool,
    real_cluster_only,
    small_model,
)

pytestmark = pytest.mark.timeout(400)
ADOPTED = {
    ("deployment", "adopt-small"): "ModelPool",
    ("service", "adopt-small"): "ModelPool",
    ("scaledobject", "adopt-small"): "ModelPool",
    ("networkpolicy", "adopt-models"): "ModelPool",
    ("deployment", "adopt-auto-router"): "RoutingPolicy",
    ("service", "adopt-auto"): "RoutingPolicy",
    ("configmap", "adopt-auto-router"): "RoutingPolicy",
    ("poddisruptionbudget", "adopt-auto-router"): "RoutingPolicy",
    ("serviceaccount", "adopt-auto-router"): "RoutingPolicy",
    ("role", "adopt-auto-router"): "RoutingPolicy",
    ("rolebinding", "adopt-auto-router"): "RoutingPolicy",
}


def adopt_pool(namespace: str) -> dict[str, Any]:
    return model_pool(
        "adopt",
        namespace,
        small_model(replicas={"min": 1, "max": 2}, cache=SHARED_CACHE),
        autoscaling={"mode": "keda", "prometheusUrl": "http://prometheus.monitoring.svc:9090"},
        networkPolicy={"enabled": True},
    )


def adopt_policy(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "tollway.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "adopt-auto", "namespace": namespace},
        "spec": {"poolRef": {"name": "adopt"}, "router": {"replicas": 2}},
    }


def owner_uids(obj: dict[str, Any] | None) -> set[str]:
    return {ref["uid"] for ref in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []}


def owned_by(cl: Cluster, owners: dict[str, str]) -> bool:
    """Every child exists, owned by the uid `owners` names for its owner's kind (none when absent)."""
    wrong = {}
    for key, owner_kind in ADOPTED.items():
        obj = cl.get(*key)
        want = {owners[owner_kind]} if owner_kind in owners else set()
        if obj is None or owner_uids(obj) != want:
            wrong[key] = owner_uids(obj) if obj else "absent"
    assert not wrong, f"not as expected: {wrong}"
    return True


def calibration_jobs(cl: Cluster) -> set[str]:
    return {j for j in cl.names("jobs") if j.startswith("adopt-small-cal-")}


def test_orphaned_children_are_adopted_by_the_reapplied_pool_and_policy(
    cluster: Cluster, namespace: str, keda_crd: None, operator: OperatorProcess | None
) -> None:
    cl = cluster
    real_cluster_only(cl, "the garbage collector's orphan deletion")
    cl.apply([adopt_pool(namespace), adopt_policy(namespace)])
    try:
        cl.wait_for(lambda: all(cl.get(kind, name) for kind, name in ADOPTED), "the children")
        cl.wait_for(lambda: calibration_jobs(cl), "the calibration Job (the model is ready)")
        before = {key: cl.get(*key)["metadata"]["uid"] for key in ADOPTED}
        kept = {
            ("persistentvolumeclaim", "adopt-small-cache"): cl.get("pvc", "adopt-small-cache")["metadata"][
                "uid"
            ],
            **{("job", job): cl.get("job", job)["metadata"]["uid"] for job in calibration_jobs(cl)},
        }
        pods = {p["metadata"]["uid"] for p in cl.items("pods", "app.kubernetes.io/instance=adopt-small")}
        assert pods

        for kind, name in (("routingpolicy", "adopt-auto"), ("modelpool", "adopt")):
            cl.kubectl("delete", kind, name, "-n", namespace, "--cascade=orphan")
        cl.wait_for(
            lambda: owned_by(cl, {}), "the children orphaned (the garbage collector drops their owners)"
        )

        cl.apply([adopt_pool(namespace), adopt_policy(namespace)])
        owners = {
            "ModelPool": cl.get("modelpool", "adopt")["metadata"]["uid"],
            "RoutingPolicy": cl.get("routingpolicy", "adopt-auto")["metadata"]["uid"],
        }
        cl.wait_for(lambda: owned_by(cl, owners), "every child owned by the re-applied pool or policy")
        cl.wait_for(lambda: current(cl.get("modelpool", "adopt")), "the pool's status")
        cl.wait_for(lambda: current(cl.get("routingpolicy", "adopt-auto")), "the policy's status")
        assert {key: cl.get(*key)["metadata"]["uid"] for key in ADOPTED} == before, "a child was replaced"
        assert {key: cl.get(*key)["metadata"]["uid"] for key in kept} == kept
        now = {p["metadata"]["uid"] for p in cl.items("pods", "app.kubernetes.io/instance=adopt-small")}
        assert now == pods, "the model's pods were replaced"
    finally:
        for kind, name in (("routingpolicy", "adopt-auto"), ("modelpool", "adopt")):
            cl.kubectl("delete", kind, name, "-n", namespace, "--wait=false", check=False)
        # The claim and the Job were reused, not adopted: theirs to remove here.
        cl.kubectl("delete", "pvc", "adopt-small-cache", "-n", namespace, "--wait=false", check=False)
        for job in calibration_jobs(cl):
            cl.kubectl("delete", "job", job, "-n", namespace, "--wait=false", check=False)
        cl.wait_for(
            lambda: not {"adopt-small", "adopt-auto-router"} & cl.names("deployments"),
            "the children collected",
        )
