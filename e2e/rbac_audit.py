"""The operator's API calls, read from the API server's audit log, and the chart's RBAC grants, both as
permissions `(apiGroup, resource[/subresource], verb)`, so that the e2e suite can compare them.

The audit log (JSON lines, level Metadata; e2e/cluster/cluster.py writes one) has an event per request;
`objectRef` names the resource and subresource, `verb` is already RBAC's verb (a watch is `watch`, a GET of
a collection `list`), and the annotation `authorization.k8s.io/decision` says whether RBAC allowed it.
Requests for non-resource URLs (API discovery: `/api`, `/apis/apps/v1`) carry no `objectRef`: the
cluster's `system:discovery` role grants them to every authenticated user, so they are left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Permission = tuple[str, str, str]
"""(apiGroup, resource or resource/subresource, verb); the core group is ""."""

DECISION = "authorization.k8s.io/decision"


@dataclass(frozen=True)
class Call:
    """One request of one user to a resource, and whether RBAC allowed it."""

    user: str
    permission: Permission
    allowed: bool
    uri: str


def read_events(path: Path) -> list[dict[str, Any]]:
    """The audit log's events (a line cut short by a write still in progress is skipped)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def resource_calls(events: Iterable[Mapping[str, Any]], users: set[str]) -> list[Call]:
    """The resource requests of `users` (full names, `system:serviceaccount:NS:NAME`)."""
    calls = []
    for event in events:
        ref = event.get("objectRef")
        user = (event.get("user") or {}).get("username", "")
        if user not in users or not ref or not ref.get("resource"):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        decision = (event.get("annotations") or {}).get(DECISION)
        calls.append(
            Call(
                user,
                (ref.get("apiGroup", ""), resource, event["verb"]),
                decision == "allow",
                event["requestURI"],
            )
        )
    return calls


def granted(docs: Iterable[Mapping[str, Any] | None]) -> set[Permission]:
    """Every permission the (Cluster)Roles among rendered manifests grant, one per group, resource and
    verb (no wildcards: the chart has none, a unit test checks)."""
    out: set[Permission] = set()
    for doc in docs:
        if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        for rule in doc.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    out.update((group, resource, verb) for verb in rule.get("verbs") or [])
    return out


def describe(permissions: Iterable[Permission]) -> str:
    """`verb group/resource` lines, sorted: how the test names permissions in its messages."""
    return "\n".join(
        f"  {verb} {group + '/' if group else ''}{resource}" for group, resource, verb in sorted(permissions)
    )
