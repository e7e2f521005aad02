"""End-to-end: the chart grants the operator exactly the API calls it makes, no more, no less.

The API server's audit log records every request of the operator's ServiceAccounts (every release the
suite installed: its own, the uninstall test's, the peering test's). After every other test has run
(`last`), their calls are compared with the (Cluster)Roles each release's chart renders:

- no call was denied, but for the documented probes, and those only where that release's values do not
  grant them (so a missing grant fails here, naming it, not somewhere in a reconcile);
- every permission the chart grants, with every optional rule set on (KEDA, peering), was granted to some
  release of this run and used by it, but for the permissions that admission checks without a request of
  their own (so a grant nobody uses fails here, naming it).

The second check needs the whole suite (the paths that use each grant live in the other tests); with
some tests deselected only the first one runs. Needs the audit log: `TOLLWAY_E2E_AUDIT_LOG`, which
`e2e/cluster/run` sets (its cluster logs the ServiceAccounts' requests); elsewhere the test skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_lib import (
    RELEASES,
    Cluster,
    OperatorProcess,
    chart_values,
    in_cluster_operator,
    real_cluster_only,
    render_chart,
    whole_suite_ran,
)
from rbac_audit import Permission, describe, granted, read_events, resource_calls

pytestmark = [pytest.mark.last, pytest.mark.timeout(120)]

ADMISSION_ONLY: dict[Permission, str] = (
    {
        ("tollway.io", f"{plural}/finalizers", "update"): (
            "children carry ownerReferences with blockOwnerDeletion; the OwnerReferencesPermissionEnforcement "
            "admission plugin (on in e2e/cluster) allows that only to who may update the owner's finalizers, "
            "a check without a request of its own (e2e/cluster/smoke shows the refusal without it)"
        )
        for plural in ("modelpools", "routingpolicies")
    }
    | {
        ("discovery.k8s.io", "endpointslices", verb): (
            "the router's Role grants it; RBAC lets the operator write a Role only with permissions it holds "
            "itself (no escalate), a check at the Role's creation without a request of its own"
        )
        for verb in ("get", "list", "watch")
    }
    | {
        (group, resource, "delete"): (
            "adopting an orphan sets an ownerReference; OwnerReferencesPermissionEnforcement allows that only "
            "to who may delete the object (e2e/test_adoption.py fails without it); the operator never deletes "
            "these itself (the garbage collector removes them with their owner)"
        )
        for group, resource in (
            ("", "configmaps"),
            ("", "serviceaccounts"),
            ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"),
        )
    }
)
"""Permissions that no request uses, yet the operator needs, and why."""

PROBES: dict[Permission, str] = {
    ("keda.sh", "scaledobjects", "list"): (
        "listing a pool's ScaledObjects: a 403 (the chart's keda.enabled off) means KEDA mode is not "
        "available, which pools asking for it report in their status"
    ),
}
"""Calls that may be denied (the operator handles the 403), where the release does not grant them."""

EVERY_RULE_SET = ("--set", "keda.enabled=true", "--set", "peering.enabled=true")


def test_audit_events_become_permissions() -> None:
    def event(user: str, verb: str, ref: dict[str, str] | None, decision: str = "allow") -> dict:
        return {
            "user": {"username": user},
            "verb": verb,
            "objectRef": ref,
            "requestURI": "/x",
            "annotations": {"authorization.k8s.io/decision": decision},
        }

    op = "system:serviceaccount:ns:tollway"
    events = [
        event(op, "patch", {"apiGroup": "tollway.io", "resource": "modelpools", "subresource": "status"}),
        event(op, "watch", {"apiGroup": "apps", "resource": "deployments"}),
        event(op, "list", {"resource": "pods"}),
        event(op, "list", {"apiGroup": "keda.sh", "resource": "scaledobjects"}, decision="forbid"),
        event(op, "get", None),  # discovery (/apis): a non-resource URL
        event("system:serviceaccount:ns:other", "delete", {"resource": "pods"}),
    ]
    calls = resource_calls(events, {op})
    assert [(c.permission, c.allowed) for c in calls] == [
        (("tollway.io", "modelpools/status", "patch"), True),
        (("apps", "deployments", "watch"), True),
        (("", "pods", "list"), True),
        (("keda.sh", "scaledobjects", "list"), False),
    ]
    role = {
        "kind": "ClusterRole",
        "rules": [{"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list"]}],
    }
    assert granted([role, {"kind": "ServiceAccount"}, None]) == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "services", "get"),
        ("", "services", "list"),
    }
    assert describe({("", "pods", "list"), ("apps", "deployments", "get")}) == (
        "  list pods\n  get apps/deployments"
    )


def test_the_operator_used_exactly_what_the_chart_grants(
    cluster: Cluster, operator: OperatorProcess | None, request: pytest.FixtureRequest
) -> None:
    real_cluster_only(cluster, "an API server's audit log")
    if in_cluster_operator():
        pytest.skip("an operator the suite did not start (TOLLWAY_E2E_OPERATOR=in-cluster): not its RBAC")
    audit_log = os.environ.get("TOLLWAY_E2E_AUDIT_LOG")
    if not audit_log:
        pytest.skip("needs the API server's audit log: TOLLWAY_E2E_AUDIT_LOG (e2e/cluster/run sets it)")
    releases = list(RELEASES)
    calls = resource_calls(read_events(Path(audit_log)), {r.user for r in releases})
    assert calls, (
        f"no request of the operator's ServiceAccounts ({[r.user for r in releases]}) in {audit_log}"
    )

    grants = {r.user: granted(render_chart(*r.values)) for r in releases}
    denied: set[Permission] = set()
    for call in calls:
        if not call.allowed and (call.permission not in PROBES or call.permission in grants[call.user]):
            denied.add(call.permission)
    assert not denied, (
        "the operator was denied calls it needs (grant them in charts/tollway/templates/rbac.yaml):\n"
        + describe(denied)
    )

    partial = whole_suite_ran(request.session)
    if partial is not None:
        print(f"\nRBAC audit: nothing denied; unused grants not checked ({partial})")
        return
    granted_in_run = set().union(*grants.values())
    every_rule = granted(render_chart(*chart_values("tollway-e2e", *EVERY_RULE_SET)))
    assert every_rule <= granted_in_run, (
        "no release of this run was granted these rules of the chart, so nothing shows whether they "
        "are used (install one with the values that add them):\n" + describe(every_rule - granted_in_run)
    )
    used = {c.permission for c in calls if c.allowed}
    assert used <= granted_in_run, "allowed by the cluster's default roles only:\n" + describe(
        used - granted_in_run
    )
    unused = granted_in_run - used - ADMISSION_ONLY.keys()
    failed = request.session.testsfailed
    assert not unused, (
        "granted, never used by the operator in the whole e2e run (remove them from "
        "charts/tollway/templates/rbac.yaml, or add the e2e path that uses them)"
        + (f"; {failed} earlier test(s) failed, which may have skipped their paths" if failed else "")
        + ":\n"
        + describe(unused)
    )
    assert ADMISSION_ONLY.keys() <= granted_in_run, describe(ADMISSION_ONLY.keys() - granted_in_run)
    print(f"\nRBAC audit: {len(calls)} calls of {len(releases)} releases; used = granted:\n{describe(used)}")
