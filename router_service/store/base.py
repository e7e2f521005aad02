"""The router's state store: what the replicas of one policy share, behind one small interface.

Four kinds of state:
- budget usage per model per window: reservations taken at admission, settled with the true usage
  (`BudgetLedger` in `router_service.routing.ledger` is the facade the request path uses);
- the dual prices gamma: the latest fit published by any replica, with a version;
- learned history entries (`/v1/feedback`): every replica adds every entry to its neighbour index;
- calibrations (`POST /v1/tollway/calibration`, pushed by `tollway calibrate`): per model, its
  measured score and true token counts on a calibration set; the latest one per model is kept and
  every replica routes that model with it instead of its borrowed `profile` columns.

Two implementations: `LocalStateStore` (in-process, the default: one replica, or each replica on
its static share; persisted to `budgets.stateFile`) and `RedisStateStore` (shared by every replica,
atomic Lua scripts, a local conservative share while Redis is unreachable). `open_store` picks one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from router_service.config import REDIS_URL, RouterConfig

STATE_URL_ENV = "TOLLWAY_STATE_URL"
"""Environment variable with the Redis URL (the operator fills it from a Secret); --state-url wins."""

HOLD_GRACE_SECONDS = 60.0
"""A hold outlives the upstream timeout by this much before other replicas may reclaim it."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one in-flight request."""

    id: int
    model: str
    amount: float
    window: int


@dataclass(frozen=True, slots=True)
class Window:
    """Where the current budget window stands."""

    index: int
    """How many windows have passed since the policy's first window began (changes at every rollover)."""
    elapsed_fraction: float
    resets_in_seconds: float


@dataclass(frozen=True, slots=True)
class ModelUsage:
    used: float
    """Tokens charged this window (settled plus held): the whole policy's with a shared store."""
    in_flight: float
    """Tokens this replica holds for requests still running."""


@dataclass(frozen=True, slots=True)
class LearnedEntry:
    """One served query with observed quality, as every replica adds it to its history."""

    prompt: str
    quality: Mapping[str, float]
    """Per backend: the observed score for the model that served, the estimates for the others."""
    completion: Mapping[str, float]
    """Per backend: completion tokens (observed for the served model when given, else estimated)."""
    uid: str
    """Unique across replicas and restarts (deduplicates an entry written twice)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "quality": dict(self.quality),
            "completion": dict(self.completion),
            "uid": self.uid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LearnedEntry:
        return cls(
            prompt=str(data["prompt"]),
            quality={str(k): float(v) for k, v in data["quality"].items()},
            completion={str(k): float(v) for k, v in data["completion"].items()},
            uid=str(data["uid"]),
        )


@dataclass(frozen=True, slots=True)
class CalibratedRow:
    """One calibration line as a model answered it."""

    prompt: str
    score: float
    """The grade in [0, 1]."""
    prompt_tokens: float
    """True prompt tokens (the server's `usage`)."""
    completion_tokens: float
    """True completion tokens (the server's `usage`)."""
    task: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "task": self.task,
            "score": self.score,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibratedRow:
        return cls(
            prompt=str(data["prompt"]),
            score=float(data["score"]),
            prompt_tokens=float(data.get("promptTokens", 0.0)),
            completion_tokens=float(data["completionTokens"]),
            task=str(data.get("task", "")),
        )


@dataclass(frozen=True)
class Calibration:
    """One model's calibration: what `tollway calibrate` measured for it on a calibration set."""

    model: str
    """The backend's name (its column)."""
    revision: str
    """What was calibrated (the operator's hash of model id, set and judge; free text otherwise)."""
    rows: tuple[CalibratedRow, ...]
    dataset: str = ""
    """Where the lines came from (informational)."""

    @functools.cached_property
    def digest(self) -> str:
        """Identifies the content (revision and rows): equal digests, equal calibrations."""
        h = hashlib.sha256(self.revision.encode() + b"\0")
        for row in self.rows:
            h.update(json.dumps(row.to_json(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "dataset": self.dataset,
            "rows": [row.to_json() for row in self.rows],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            model=str(data["model"]),
            revision=str(data.get("revision", "")),
            rows=tuple(CalibratedRow.from_json(r) for r in data["rows"]),
            dataset=str(data.get("dataset", "")),
        )


class StoreUnavailable(RuntimeError):
    """The store cannot take a write now (Redis unreachable); the caller should retry later."""


@dataclass(frozen=True, slots=True)
class SharedGamma:
    """The latest published dual prices; `version` grows with every publication."""

    version: int
    gamma: Mapping[str, float]
    origin: str


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What `/readyz`, `/v1/tollway/status`, the metrics and the logs say about the store."""

    kind: Literal["local", "redis"]
    shared: bool
    connected: bool
    mode: Literal["local", "shared", "local-share"]
    """local: in-process store; shared: Redis answers; local-share: Redis unreachable, serving on
    this replica's conservative share of the remaining budget."""
    detail: str = ""
    pending_operations: int = 0
    outage_seconds: float = 0.0
    outages: int = 0
    errors: int = 0
    live_replicas: int = 1
    local_share: Mapping[str, float] = field(default_factory=dict)
    """During an outage: tokens this replica may still spend per model until Redis answers."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.kind,
            "shared": self.shared,
            "connected": self.connected,
            "mode": self.mode,
            "liveReplicas": self.live_replicas,
            "pendingOperations": self.pending_operations,
            "outages": self.outages,
            "errors": self.errors,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.mode == "local-share":
            out["outageSeconds"] = round(self.outage_seconds, 3)
            out["localShare"] = {m: v for m, v in self.local_share.items() if math.isfinite(v)}
        return out


class StateStore(Protocol):
    """What the router needs from a state store. Budget calls are on the request path: short, no
    waiting on anything but (for Redis) one round trip in `reserve`."""

    kind: Literal["local", "redis"]
    shared: bool
    """True when other replicas see this store's usage (no per-replica split of the budgets)."""
    replica_id: str

    # -- budgets --------------------------------------------------------------------------------
    def configure(
        self, window_seconds: float, budgets: Mapping[str, float], state_file: str | None
    ) -> None: ...
    def window(self) -> Window: ...
    def reserve(self, model: str, tokens: float, budget: float | None) -> Reservation | None: ...
    def settle(self, reservation: Reservation, actual_tokens: float) -> None: ...
    def release(self, reservation: Reservation) -> None: ...
    def charge(self, model: str, tokens: float) -> None: ...
    def remaining(self, model: str, budget: float) -> float: ...
    def usage(self) -> dict[str, ModelUsage]: ...
    def save(self) -> None: ...

    # -- dual prices ----------------------------------------------------------------------------
    def publish_gamma(self, gamma: Mapping[str, float]) -> None: ...
    def shared_gamma(self) -> SharedGamma | None: ...

    # -- learned history ------------------------------------------------------------------------
    def append_learned(self, entry: LearnedEntry) -> None: ...
    def learned(self, start: int) -> Sequence[LearnedEntry]:
        """Entries from position `start` on (positions are stable for this process's lifetime)."""
        ...

    # -- calibrations ---------------------------------------------------------------------------
    def put_calibration(self, calibration: Calibration) -> None:
        """Keep `calibration` as its model's (replacing the model's earlier one), durably: in the
        shared store for every replica, else in the state file. Raises StoreUnavailable when it
        cannot be written now (nothing is queued: the pusher retries)."""
        ...

    def calibrations(self) -> Mapping[str, Calibration]:
        """The latest calibration per model name."""
        ...

    # -- traffic volume -------------------------------------------------------------------------
    def note_queries(self, count: int) -> None: ...
    def window_queries(self) -> int | None:
        """Routed queries in this window across the fleet (None: only this replica's are known)."""
        ...

    # -- lifecycle ------------------------------------------------------------------------------
    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) when new gamma, learned entries or calibrations arrive."""
        ...

    def health(self) -> StoreHealth: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


def replica_identity() -> str:
    """This process's name in the shared store: the pod name (or host name) plus a per-process
    suffix, so that a restarted pod never reuses a reservation id of its previous life."""
    host = os.environ.get("POD_NAME") or socket.gethostname() or "router"
    return f"{host}:{uuid.uuid4().hex[:8]}"


def state_url(config: RouterConfig, override: str | None = None) -> str | None:
    """The Redis URL in effect: `--state-url`, else $TOLLWAY_STATE_URL, else `state.url`."""
    return override or os.environ.get(STATE_URL_ENV) or config.state.url


def open_store(
    config: RouterConfig,
    *,
    url: str | None = None,
    clock: Callable[[], float] | None = None,
    wall_clock: Callable[[], float] | None = None,
) -> StateStore:
    """The store a router config asks for (Redis when a URL is in effect, else in-process)."""
    import time

    chosen = state_url(config, url)
    if chosen and not re.match(REDIS_URL, chosen):
        raise ValueError(f"state URL {chosen!r}: expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    budgets = {m: float(t) for m, t in config.budgets.tokens.items()}
    if chosen:
        from router_service.store.redis_store import RedisStateStore

        return RedisStateStore(
            chosen,
            key=config.state.key,
            window_seconds=config.budgets.window_seconds,
            budgets=budgets,
            static_share=config.budgets.replica_share,
            state_file=config.budgets.state_file,
            sync_interval_seconds=config.state.sync_interval_seconds,
            timeout_seconds=config.state.timeout_seconds,
            hold_seconds=config.server.upstream_timeout_seconds + HOLD_GRACE_SECONDS,
            wall_clock=wall_clock or time.time,
        )
    from router_service.store.local import LocalStateStore

    return LocalStateStore(
        window_seconds=config.budgets.window_seconds,
        state_file=config.budgets.state_file,
        clock=clock or time.monotonic,
        wall_clock=wall_clock or time.time,
    )
