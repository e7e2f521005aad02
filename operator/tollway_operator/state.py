"""The operator's process-wide state and settings: the API client, per-object locks, pending
debounced reconciles, kopf's indexes, and the timings read from the environment.

Environment (set by `tollway operator`, see run.py):
TOLLWAY_OPERATOR_RESYNC_SECONDS (60), TOLLWAY_OPERATOR_RETRY_SECONDS (15),
TOLLWAY_OPERATOR_DEBOUNCE_SECONDS (0.2), TOLLWAY_OPERATOR_METRICS_PORT (unset: no metrics server),
TOLLWAY_OPERATOR_METRICS_HOST (0.0.0.0), TOLLWAY_SIMULATE (`true`: pools that do not say run
simulators instead of vLLM; the chart's simulate.default).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from tollway_operator import desired as d
from tollway_operator import kube as k


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


RESYNC_SECONDS = _env_float("TOLLWAY_OPERATOR_RESYNC_SECONDS", 60.0)


RETRY_SECONDS = _env_float("TOLLWAY_OPERATOR_RETRY_SECONDS", 15.0)


DEBOUNCE_SECONDS = _env_float("TOLLWAY_OPERATOR_DEBOUNCE_SECONDS", 0.2)


SIMULATE_ENV = "TOLLWAY_SIMULATE"


def simulate_default() -> bool:
    """The operator's default for a ModelPool's `simulate.enabled` (read at each reconcile)."""
    return os.environ.get(SIMULATE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


POOLS = "modelpools"


POLICIES = "routingpolicies"


MANAGED_CHILD = {d.LABEL_MANAGED_BY: d.MANAGED_BY}


POOL_CHILD_KINDS = (k.DEPLOYMENT, k.STATEFULSET, k.SERVICE, k.PVC, k.NETWORK_POLICY, k.SCALED_OBJECT)


POLICY_CHILD_KINDS = (k.CONFIGMAP, k.DEPLOYMENT, k.SERVICE, k.PDB, k.SERVICE_ACCOUNT, k.ROLE, k.ROLE_BINDING)


@dataclass
class Outcome:
    """How a reconcile ended: ok, invalid (permanent until the spec changes), waiting (for
    something else to change), error (API trouble: retry)."""

    state: str = "ok"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class OperatorState:
    kube: k.Kube | None = None
    locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    pending: dict[tuple[str, str, str], asyncio.Task[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    policies_index: Any = None
    pools_index: Any = None
    resync_task: asyncio.Task[None] | None = None
    last_reconciled: dict[tuple[str, str, str], float] = field(default_factory=dict)
    keda_absent_until: float = 0.0
    stopping: bool = False

    def lock(self, key: tuple[str, str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def begin_run(self) -> None:
        """Forget what belongs to an earlier run of the operator in this process (its tasks and
        locks are bound to that run's event loop, which may be gone: tests run kopf many times)."""
        self.locks.clear()
        self.pending.clear()
        self.tasks.clear()
        self.last_reconciled.clear()
        self.resync_task = None
        self.stopping = False


STATE = OperatorState()


def kube_client() -> k.Kube:
    if STATE.kube is None:
        raise RuntimeError("the operator's API client is not connected (startup handler did not run)")
    return STATE.kube
