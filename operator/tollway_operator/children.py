"""The children of a custom resource: list what lives, apply what is desired, prune the rest.

Each change is logged, counted in the operator's metrics and posted as an Event on the owner.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from tollway_operator import kube as k
from tollway_operator import metrics, status
from tollway_operator.state import STATE, kube_client

log = logging.getLogger("tollway.operator")


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    with contextlib.suppress(LookupError):  # outside kopf's context (unit use): no event queue
        kopf.event(dict(body), type=type_, reason=reason, message=message[:1000])


def warn_on_change(
    body: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    reason: str,
    message: str,
) -> None:
    """A Warning Event when `reason` or `message` differ from those of the previous status's Ready
    condition (not every resync)."""
    old = status.find_condition((previous or {}).get("conditions"), status.READY) or {}
    if old.get("reason") != reason or old.get("message") != message:
        post_event(body, "Warning", reason, message)


async def write_status(
    kind: k.Kind, body: Mapping[str, Any], previous: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> None:
    if previous and k.contains(previous, new):
        return
    meta = body["metadata"]
    await kube_client().patch_status(kind, meta["namespace"], meta["name"], new)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


Children = dict[tuple[str, str], dict[str, Any]]
"""Live children by (kind, name)."""


async def list_children(body: Mapping[str, Any], kinds: tuple[k.Kind, ...], selector: str) -> Children:
    """One LIST per kind: the live children of an owner (by label and owner uid)."""
    kube = kube_client()
    meta = body["metadata"]
    out: Children = {}
    for kind in kinds:
        if kind == k.SCALED_OBJECT and time.monotonic() < STATE.keda_absent_until:
            continue
        try:
            items = await kube.list(kind, meta["namespace"], selector)
        except k.ApiError as e:
            # KEDA not installed (404), or installed but not granted to us (403: the chart's
            # keda.enabled is off): no ScaledObject of ours can exist; look again in 5 minutes.
            if e.status in (403, 404) and kind == k.SCALED_OBJECT:
                STATE.keda_absent_until = time.monotonic() + 300
                continue
            raise
        for obj in items:
            if _owned_by(obj, meta.get("uid", "")):
                out[kind.kind, obj["metadata"]["name"]] = obj
    return out


async def apply_children(body: Mapping[str, Any], children: list[dict[str, Any]], live: Children) -> Children:
    """Apply children in order against their live state; returns the resulting objects."""
    kube = kube_client()
    out: Children = {}
    for child in children:
        key = (child["kind"], child["metadata"]["name"])
        try:
            result, obj = await kube.apply(child, live.get(key))
        except k.ApiError as e:
            if k.kind_of(child) == k.SCALED_OBJECT and e.status == 404:
                raise k.ApiError(
                    404,
                    "KedaNotInstalled",
                    "autoscaling.mode is keda but the KEDA ScaledObject API is not installed",
                ) from None
            if k.kind_of(child) == k.SCALED_OBJECT and e.status == 403:
                raise k.ApiError(
                    403,
                    "KedaNotAllowed",
                    "autoscaling.mode is keda but the operator may not manage KEDA ScaledObjects "
                    "(install the chart with keda.enabled=true)",
                ) from None
            raise
        out[key] = obj
        if result != "unchanged":
            log.info(
                "%s %s/%s %s", child["kind"], body["metadata"]["namespace"], child["metadata"]["name"], result
            )
            metrics.CHILD_CHANGES.labels(child["kind"], result).inc()
            verb = "Created" if result == "created" else "Updated"
            post_event(body, "Normal", verb, f"{verb} {child['kind']} {child['metadata']['name']}")
    return out


async def prune_children(body: Mapping[str, Any], live: Children, keep: Children) -> None:
    """Delete live children that the desired state no longer has."""
    kube = kube_client()
    namespace = body["metadata"]["namespace"]
    for (kind_name, name), obj in live.items():
        if (kind_name, name) in keep:
            continue
        if await kube.delete(k.kind_of(obj), namespace, name):
            metrics.CHILD_CHANGES.labels(kind_name, "deleted").inc()
            post_event(body, "Normal", "Deleted", f"Deleted {kind_name} {name} (no longer in the spec)")
