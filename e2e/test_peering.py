"""End-to-end: two operator replicas with kopf peering, one at work.

Its own release (`peering.enabled=true`: kopf's peering CRDs and the peering role) and namespace. The
operator creates the KopfPeering object at start-up (the chart cannot, in the release that installs its
CRD). Two replicas run as the chart's ServiceAccount with different priorities: only the higher one
reconciles a pool; when it stops (and removes itself from the peering object), the other takes over.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from e2e_lib import (
    Cluster,
    OperatorProcess,
    current,
    in_cluster_operator,
    model_pool,
    own_release,
    real_cluster_only,
    run_operator,
)

pytestmark = pytest.mark.timeout(400)
PEERING = "tollway"
PEERING_CRDS = ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")


def external_pool(namespace: str) -> dict[str, Any]:
    """A pool that deploys nothing (one external model): only its status shows who reconciled it."""
    return model_pool(
        "peered", namespace, {"name": "remote", "endpoint": {"url": "http://remote.example:8000/v1"}}
    )


def pool_reconciles(operator: OperatorProcess) -> float:
    return operator.total("tollway_operator_reconciles_total", kind="ModelPool")


def test_with_peering_one_replica_works_and_the_other_takes_over(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cl = cluster
    real_cluster_only(cl, "helm, RBAC and kopf's peering CRDs")
    if in_cluster_operator():
        pytest.skip("runs its own operators next to its own release (TOLLWAY_E2E_OPERATOR=in-cluster)")
    crds_before = {crd for crd in PEERING_CRDS if cl.kubectl("get", "crd", crd, check=False).returncode == 0}
    workdir = tmp_path_factory.mktemp("peering")
    try:
        release = own_release(cl, "tollway-e2e-peering", workdir, "--set", "peering.enabled=true")
        with release as (namespace, kubeconfig):
            run_peered_operators(cl, namespace, kubeconfig, workdir)
    finally:
        for crd in set(PEERING_CRDS) - crds_before:  # kept by Helm (resource-policy: keep); ours to remove
            cl.kubectl("delete", "crd", crd, "--wait=false", check=False)


def run_peered_operators(cl: Cluster, namespace: str, kubeconfig: Path, workdir: Path) -> None:
    """The leader (priority 20) works, the standby (10) waits; when the leader stops, the standby takes over."""

    def peers() -> dict[str, Any]:
        return dict((cl.get("kopfpeering", PEERING, namespace=namespace) or {}).get("status") or {})

    with contextlib.ExitStack() as standby_stack:
        with run_operator(kubeconfig, namespace, workdir / "leader.log", peering=(PEERING, 20)) as leader:
            cl.wait_for(lambda: len(peers()) == 1, "the leader in the KopfPeering object it created")
            standby = standby_stack.enter_context(
                run_operator(kubeconfig, namespace, workdir / "standby.log", peering=(PEERING, 10))
            )
            cl.wait_for(lambda: len(peers()) == 2, "both replicas in the KopfPeering object")
            assert sorted(p["priority"] for p in peers().values()) == [10, 20]
            cl.apply([external_pool(namespace)])
            cl.wait_for(lambda: current(cl.get("modelpool", "peered", namespace=namespace)), "pool status")
            cl.wait_for(lambda: pool_reconciles(leader) >= 2, "the leader's resyncs of the pool")
            assert pool_reconciles(standby) == 0, f"the standby reconciled:\n{standby.log_tail()}"
        # The leader stopped and removed itself from the peering object: the standby resumes.
        cl.wait_for(lambda: len(peers()) == 1, "the leader gone from the KopfPeering object")
        cl.wait_for(lambda: pool_reconciles(standby) >= 1, "the standby reconciling the pool")
