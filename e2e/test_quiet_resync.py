"""End-to-end: resyncs of an unchanged pool and policy write nothing and post no Events.

The pool and the policy ask for resources the way people write them (`cpu: 1`, `memory: 1024Mi`):
the API server stores them normalised (`"1"`, `"1Gi"`), which must still count as "as desired".
After they settle, 3 resyncs must leave every object's resourceVersion, the Events on them and the
operator's count of child changes as they were.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from e2e_lib import Cluster, OperatorProcess, condition, current, model_pool, small_model

pytestmark = pytest.mark.timeout(400)
RESYNCS = 3
CHILD_KINDS = (
    "deployments",
    "statefulsets",
    "services",
    "configmaps",
    "persistentvolumeclaims",
    "poddisruptionbudgets",
    "networkpolicies",
)


def quiet_pool(namespace: str) -> dict[str, Any]:
    model = small_model(
        resources={"requests": {"cpu": 1, "memory": "1024Mi"}, "limits": {"memory": "16Gi"}},
        # Per-replica claims: a StatefulSet, whose claim template the API server fills in.
        cache={"kind": "pvc", "size": "50Gi", "retention": "Delete"},
    )
    prometheus = {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}
    return model_pool("quiet", namespace, model, networkPolicy={"prometheus": prometheus})


def quiet_policy(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "tollway.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "quiet", "namespace": namespace},
        "spec": {
            "poolRef": {"name": "quiet"},
            "router": {"replicas": 1, "resources": {"requests": {"cpu": 0.5, "memory": "256Mi"}}},
        },
    }


def snapshot(cl: Cluster) -> dict[str, Any]:
    """resourceVersions of the pool, the policy and their children; the Events about them."""
    objects = {}
    for kind in ("modelpools", "routingpolicies", *CHILD_KINDS):
        for item in cl.items(kind):
            meta = item["metadata"]
            owners = {ref["name"] for ref in meta.get("ownerReferences") or []}
            if meta["name"].startswith("quiet") or "quiet" in owners:
                objects[kind, meta["name"]] = meta["resourceVersion"]
    events = {
        e["metadata"]["name"]: (e.get("count"), e.get("lastTimestamp"), e.get("message"))
        for e in cl.items("events")
        if e["involvedObject"].get("name", "").startswith("quiet")
    }
    return {"objects": objects, "events": events}


def settled(cl: Cluster, expect_ready: bool) -> bool:
    pool, policy = cl.get("modelpool", "quiet"), cl.get("routingpolicy", "quiet")
    if not (current(pool) and current(policy)):
        return False
    if expect_ready:
        return all(condition(o, "Ready").get("status") == "True" for o in (pool, policy))
    return True


def test_resyncs_of_an_unchanged_pool_write_nothing(
    cluster: Cluster, namespace: str, operator: OperatorProcess | None
) -> None:
    cl = cluster
    if operator is None:
        pytest.skip("counts the out-of-cluster operator's resyncs (TOLLWAY_E2E_OPERATOR=in-cluster)")
    expect_ready = cl.emulated or os.environ.get("TOLLWAY_E2E_EXPECT_READY") == "1"
    cl.apply([quiet_pool(namespace), quiet_policy(namespace)])
    try:
        cl.wait_for(lambda: settled(cl, expect_ready), "the pool and the policy to settle")
        # Quiet = one full resync with nothing changing; then count the next ones.
        before = snapshot(cl)
        deadline = time.monotonic() + 120
        while True:
            start = operator.resyncs()
            cl.wait_for(
                lambda s=start: operator.resyncs() > s, "a resync", timeout=operator.resync_seconds * 3 + 10
            )
            now = snapshot(cl)
            if now == before:
                break
            assert time.monotonic() < deadline, f"never settled; last change: {before} -> {now}"
            before = now
        changes = operator.total("tollway_operator_child_changes_total")
        start = operator.resyncs()
        cl.wait_for(
            lambda: operator.resyncs() >= start + RESYNCS,
            f"{RESYNCS} resyncs",
            timeout=operator.resync_seconds * (RESYNCS + 2) + 30,
        )
        after = snapshot(cl)
        assert operator.total("tollway_operator_child_changes_total") == changes, operator.log_tail()
        changed = {
            k: (v, after["objects"].get(k))
            for k, v in before["objects"].items()
            if after["objects"].get(k) != v
        }
        assert not changed, f"written during {RESYNCS} resyncs: {changed}"
        new_events = {k: v for k, v in after["events"].items() if before["events"].get(k) != v}
        assert not new_events, f"Events during {RESYNCS} resyncs: {new_events}"
    finally:
        for kind in ("routingpolicy", "modelpool"):
            cl.kubectl("delete", kind, "quiet", "-n", namespace, "--wait=false", check=False)
        cl.wait_for(
            lambda: (
                not {"quiet-small", "quiet-router"} & (cl.names("deployments") | cl.names("statefulsets"))
            ),
            "the children collected",
        )
