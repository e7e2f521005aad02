"""End-to-end: a model's cache moves from one shared claim to per-replica claims, and its pool drops
its NetworkPolicy.

With `cache.accessMode: ReadWriteMany` every replica mounts one claim that the operator creates (a
Deployment). Switched to `ReadWriteOnce`, each replica gets its own claim from a StatefulSet: the
Deployment goes, and the shared claim goes with it where `retention: Delete` says so (a claim left
behind would hold storage nobody mounts). Turning `networkPolicy.enabled` off removes the pool's
NetworkPolicy.
"""

from __future__ import annotations

from typing import Any

import pytest
from e2e_lib import SHARED_CACHE, Cluster, OperatorProcess, model_pool, small_model

pytestmark = pytest.mark.timeout(300)


def shared_pool(namespace: str) -> dict[str, Any]:
    model = small_model(replicas={"min": 1, "max": 2}, cache=dict(SHARED_CACHE))
    return model_pool("shared", namespace, model, networkPolicy={"enabled": True})


def test_shared_claim_and_network_policy_leave_with_the_spec(
    cluster: Cluster, namespace: str, operator: OperatorProcess | None
) -> None:
    cl = cluster
    pool = shared_pool(namespace)
    cl.apply([pool])
    try:
        cl.wait_for(lambda: cl.get("deployment", "shared-small"), "the model's Deployment")
        cl.wait_for(lambda: cl.get("persistentvolumeclaim", "shared-small-cache"), "the shared cache claim")
        cl.wait_for(lambda: cl.get("networkpolicy", "shared-models"), "the pool's NetworkPolicy")
        assert cl.get("statefulset", "shared-small") is None

        model = pool["spec"]["models"][0]
        model["cache"]["accessMode"] = "ReadWriteOnce"
        patch = {"spec": {"models": [model], "networkPolicy": {"enabled": False}}}
        cl.merge_patch("modelpool", "shared", patch)

        cl.wait_for(lambda: cl.get("statefulset", "shared-small"), "the model's StatefulSet")
        cl.wait_for(lambda: "shared-small" not in cl.names("deployments"), "the Deployment removed")
        cl.wait_for(
            lambda: "shared-small-cache" not in cl.names("persistentvolumeclaims"),
            "the shared claim deleted (retention Delete)",
        )
        cl.wait_for(lambda: "shared-models" not in cl.names("networkpolicies"), "the NetworkPolicy removed")
    finally:
        cl.kubectl("delete", "modelpool", "shared", "-n", namespace, "--wait=false", check=False)
        cl.wait_for(
            lambda: not {"shared-small"} & (cl.names("deployments") | cl.names("statefulsets")),
            "the pool's children collected",
        )
