"""Reconciles that no kopf handler starts: the periodic resync and the children's events.

- A resync loop every `TOLLWAY_OPERATOR_RESYNC_SECONDS` over every pool and policy kopf has
  indexed (drift repair, missed events, waiting policies) — one loop rather than kopf timers,
  because kopf puts a finalizer on every object with a timer;
- events of the children themselves (a child deleted or edited by hand, a Deployment's ready
  replicas changing): the owner is reconciled after a short debounce, events arriving meanwhile
  coalesced into one reconcile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from tollway_operator import desired as d
from tollway_operator.reconcile import reconcile_policy, reconcile_pool
from tollway_operator.state import DEBOUNCE_SECONDS, RESYNC_SECONDS, STATE

log = logging.getLogger("tollway.operator")


def forget(kind: str, namespace: str, name: str) -> None:
    """Drop the bookkeeping of a deleted object."""
    key = (kind, namespace, name)
    STATE.last_reconciled.pop(key, None)
    lock = STATE.locks.get(key)
    if lock is not None and not lock.locked():
        STATE.locks.pop(key, None)


def remember_indexes(policies: Any, pools: Any) -> None:
    """kopf hands indexes to resource handlers only; keep them for the resync loop, and start that
    loop from here (the first resource handler) rather than from the startup handler: a task
    inherits its creator's context, and only a resource handler's holds kopf's Event queue. From
    the startup handler the resync's Events (a child recreated, updated, deleted) went nowhere."""
    STATE.policies_index = policies
    STATE.pools_index = pools
    if STATE.stopping or (STATE.resync_task is not None and not STATE.resync_task.done()):
        return
    STATE.resync_task = asyncio.get_running_loop().create_task(resync_loop())
    STATE.tasks.add(STATE.resync_task)
    STATE.resync_task.add_done_callback(STATE.tasks.discard)


async def resync_once() -> None:
    """Reconcile every known pool and policy once (from kopf's indexes)."""
    pools = sorted((ns, n) for ns, names in (STATE.pools_index or {}).items() for n in set(names))
    policies = sorted({(ns, n) for (ns, _pool), names in (STATE.policies_index or {}).items() for n in names})
    fresh_after = time.monotonic() - RESYNC_SECONDS / 2  # skip what a recent event already reconciled
    for namespace, name in pools:
        if STATE.last_reconciled.get(("pool", namespace, name), 0.0) < fresh_after:
            await reconcile_pool(namespace, name, "resync", refresh=False)
    for namespace, name in policies:
        if STATE.last_reconciled.get(("policy", namespace, name), 0.0) < fresh_after:
            await reconcile_policy(namespace, name, "resync")


async def resync_loop() -> None:
    """One loop instead of per-object kopf timers: kopf puts a finalizer on every object with a
    timer, which would block deleting pools while the operator is down."""
    while not STATE.stopping:
        await asyncio.sleep(RESYNC_SECONDS)
        try:
            await resync_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic resync failed; retrying in %.0f s", RESYNC_SECONDS)


def owner_of_child(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """("pool", name) or ("policy", name) for a child's labels, None if not ours."""
    if labels.get(d.LABEL_MANAGED_BY) != d.MANAGED_BY:
        return None
    if labels.get(d.LABEL_COMPONENT) == d.COMPONENT_ROUTER and labels.get(d.LABEL_POLICY):
        return "policy", labels[d.LABEL_POLICY]
    if labels.get(d.LABEL_COMPONENT) in (d.COMPONENT_MODEL, d.COMPONENT_CALIBRATION) and labels.get(
        d.LABEL_POOL
    ):
        return "pool", labels[d.LABEL_POOL]
    return None


def schedule(kind: str, namespace: str, name: str) -> None:
    """Reconcile an owner soon; events arriving meanwhile are coalesced into one reconcile."""
    key = (kind, namespace, name)
    task = STATE.pending.get(key)
    if (task is not None and not task.done()) or STATE.stopping:
        return
    task = asyncio.get_running_loop().create_task(_debounced(key))
    STATE.pending[key] = task
    STATE.tasks.add(task)
    task.add_done_callback(STATE.tasks.discard)


async def _debounced(key: tuple[str, str, str]) -> None:
    await asyncio.sleep(DEBOUNCE_SECONDS)
    STATE.pending.pop(key, None)
    kind, namespace, name = key
    log.info("reconciling %s %s/%s after a child event", kind, namespace, name)
    try:
        if kind == "pool":
            await reconcile_pool(namespace, name, "child")
        else:
            await reconcile_policy(namespace, name, "child")
    except Exception:  # a background task must not die silently
        log.exception("reconcile of %s %s/%s after a child event failed", kind, namespace, name)
