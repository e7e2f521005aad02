"""The Redis state store: budgets, dual prices and learned history shared by every router replica.

Budgets. Every replica reserves from the whole budget (no per-replica split). A reservation is one
Lua script (`lua/reserve.lua`), atomic in Redis: it checks the model's usage in the window against
the budget and holds the tokens, so the fleet together never admits more than the budget. Settling
or releasing (`lua/end.lua`) is written behind the request, in order, by this store's thread, and
is idempotent (an ended reservation id is remembered for the window), so an operation whose answer
was lost can be sent again. Keys are per policy (`state.key`), window and model, and expire one
window after their window ends. Windows count from the policy's anchor in Redis (the first
replica's start), so every replica and every restart agrees on them. A hold whose replica died is
reclaimed by any replica once it outlives the upstream timeout. A model that ended a window
overdrawn (settling charges true usage, which may exceed the worst case held) repays the overdraw in
the next one: the tokens settled in the window before beyond the budget count as spent (as in the
in-process store); a window that passed idle clears it.

Request path cost: one round trip (`reserve`); `can_afford` and `remaining` read this replica's
view (refreshed by every reply and by the sync every `state.syncIntervalSeconds`) plus its own
operations not yet written.

Redis unreachable (connect error, timeout, any Redis error): the replica keeps serving on a local,
conservative share of what was left: for each model, the remaining budget it last saw divided by
the replicas alive at the last heartbeat count (`local_share`); a replica that never reached Redis
in this window uses the static split, budget x `budgets.replicaShare`. Its operations queue up
(persisted to `budgets.stateFile`, so a restart keeps them) and are written when Redis answers
again, before the replica goes back to shared admission. If Redis came back empty (restarted
without persistence), the first replica to reach it restores the window's usage to what it last saw
before writing its queue (run Redis with its append-only file, as the chart does, to lose nothing).

Shared learning: published dual prices carry a version (every replica adopts the highest); learned
entries go to a Redis stream that every replica reads from the start (so a new or restarted
replica gets all of them). Both are read by the sync; `EngineSync` hands them to the engine.

Calibrations: a hash (model -> zlib-compressed JSON, the latest calibration per model) and a
version counter bumped with every push. A push is written at once (not queued: a multi-megabyte
write does not belong in the outage journal; while Redis is unreachable the push fails and the
pusher retries). The sync reads the counter every interval and the hash only when it changed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from router_service.store.base import (
    Calibration,
    LearnedEntry,
    ModelUsage,
    Reservation,
    SharedGamma,
    StoreHealth,
    StoreUnavailable,
    Window,
    replica_identity,
)
from router_service.store.local import write_atomically

log = logging.getLogger("tollway.state")

STATE_VERSION = 1
LEARNED_STREAM_MAX = 100_000
ALIVE_INTERVALS = 3
"""A replica counts as alive for this many sync intervals after its last heartbeat."""
FLUSH_BATCH = 200
FLUSH_DELAY_SECONDS = 0.01
"""Writes are coalesced for this long before a flush: one pipelined round trip for all the
settlements of a busy moment, and the store's thread wakes at most ~100 times a second."""
SAVE_INTERVAL_SECONDS = 1.0
CALIBRATION_TIMEOUT_SECONDS = 10.0
"""Socket timeout for calibration reads and writes (megabytes, rare, never on the request path)."""


def local_share(remaining: float, live_replicas: int) -> float:
    """What one replica may spend of a model's remaining budget while Redis is unreachable: an
    equal share among the replicas that were alive at the last heartbeat count."""
    return max(0.0, remaining) / max(1, live_replicas)


def redacted(url: str) -> str:
    """The URL without its password (for logs and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _load_scripts() -> dict[str, str]:
    folder = resources.files("router_service.store") / "lua"
    prelude = (folder / "prelude.lua").read_text()
    return {
        name: prelude + "\n" + (folder / f"{name}.lua").read_text()
        for name in ("reserve", "end", "sync", "publish_gamma", "restore")
    }


@dataclass(frozen=True, slots=True)
class Op:
    """One write waiting for Redis (kept in order, persisted with the state file)."""

    kind: str
    """hold (a reservation admitted during an outage), end (settle / release / charge), gamma,
    learned."""
    id: str = ""
    model: str = ""
    window: int = 0
    tokens: float | None = None
    """hold: tokens held; end: tokens consumed (None: released)."""
    delta: float = 0.0
    """How much this operation changes the model's usage in its window."""
    payload: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Op:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Outage:
    """Redis is unreachable: what this replica may still spend, and what it spent meanwhile."""

    since: float
    window: int
    remaining: dict[str, float]
    """Per model: the remaining budget this replica last saw (for `window`)."""
    replicas: int
    static: bool
    """True when this replica had no view of the window: the static split applies."""
    cause: str
    spent: dict[tuple[int, str], float] = field(default_factory=dict)


class RedisStateStore:
    """Budgets, gamma and learned entries shared through Redis (see the module docstring)."""

    kind = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        key: str,
        window_seconds: float,
        budgets: Mapping[str, float],
        static_share: float = 1.0,
        state_file: str | None = None,
        sync_interval_seconds: float = 0.5,
        timeout_seconds: float = 0.25,
        hold_seconds: float = 180.0,
        wall_clock: Callable[[], float] = time.time,
        replica_id: str | None = None,
    ) -> None:
        self.replica_id = replica_id or replica_identity()
        self.url = redacted(url)
        self._calibration_redis = redis.Redis.from_url(
            url,
            socket_timeout=max(CALIBRATION_TIMEOUT_SECONDS, timeout_seconds),
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),  # never retry on the request path: fall back at once
            decode_responses=True,
            health_check_interval=0,
        )
        self._scripts = {name: self._redis.register_script(src) for name, src in _load_scripts().items()}
        self._prefix = f"tollway:{{{key}}}"
        self._wall = wall_clock
        self._interval = float(sync_interval_seconds)
        self._hold_seconds = float(hold_seconds)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._window_seconds = float(window_seconds)
        self._budgets = {m: float(b) for m, b in budgets.items()}
        self._static_share = float(static_share)
        self._state_file = Path(state_file) if state_file else None
        self._started_wall = wall_clock()
        self._anchor: float | None = None
        self._view_window: int | None = None
        self._view: dict[str, tuple[float, int]] = {}
        self._owed: dict[str, float] = {}  # per model, owed from the window before `_view_window`
        self._holds: dict[int, Reservation] = {}
        self._local_only: set[int] = set()
        self._local_used: dict[tuple[int, str], float] = {}
        self._queue: deque[Op] = deque()
        self._pending: dict[tuple[int, str], float] = {}
        self._outage: Outage | None = None
        self._live = 1
        self._gamma: SharedGamma | None = None
        self._learned: list[LearnedEntry] = []
        self._seen_uids: set[str] = set()
        self._stream_cursor = "-"
        self._calibrations: dict[str, Calibration] = {}
        self._calibration_version: int | None = None
        self._queries_unsent = 0
        self._window_queries: tuple[int, int] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._errors = 0
        self._outages = 0
        self._last_error = ""
        self._last_sync = -math.inf
        self._last_attempt = -math.inf
        self._last_save = -math.inf
        self._dirty = False
        self._stopping = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._load()
        try:
            self._connect()
        except redis.RedisError as exc:
            self._enter_outage(exc)

    # -- keys -----------------------------------------------------------------------------------

    def _window_base(self, window: int) -> str:
        return f"{self._prefix}:w{self._window_seconds:g}:{window}"

    def _model_keys(self, window: int, model: str) -> list[str]:
        base = self._window_base(window)
        return [
            f"{base}:budget:{model}",
            f"{base}:holds:{model}",
            f"{base}:deadline:{model}",
            f"{base}:ended",
        ]

    def budget_key(self, model: str, window: int | None = None) -> str:
        """The Redis hash holding `model`'s usage in `window` (default: the current one)."""
        return self._model_keys(self.window().index if window is None else window, model)[0]

    def _expire_at(self, window: int) -> int:
        anchor = self._anchor if self._anchor is not None else self._started_wall
        return math.ceil(anchor + (window + 2) * self._window_seconds)

    @property
    def _anchor_key(self) -> str:
        return f"{self._prefix}:anchor"

    @property
    def _gamma_key(self) -> str:
        return f"{self._prefix}:gamma"

    @property
    def _learned_key(self) -> str:
        return f"{self._prefix}:learned"

    @property
    def _calibrations_key(self) -> str:
        return f"{self._prefix}:calibrations"

    @property
    def _calibrations_version_key(self) -> str:
        return f"{self._prefix}:calibrations:version"

    @property
    def _replicas_key(self) -> str:
        return f"{self._prefix}:replicas"

    def _gid(self, reservation_id: int) -> str:
        return f"{self.replica_id}:{reservation_id}"

    # -- window ---------------------------------------------------------------------------------

    def window(self) -> Window:
        anchor = self._anchor if self._anchor is not None else self._started_wall
        elapsed = max(0.0, self._wall() - anchor)
        index = math.floor(elapsed / self._window_seconds)
        into = elapsed - index * self._window_seconds
        return Window(index, min(1.0, into / self._window_seconds), max(0.0, self._window_seconds - into))

    def configure(self, window_seconds: float, budgets: Mapping[str, float], state_file: str | None) -> None:
        with self._lock:
            self._window_seconds = float(window_seconds)
            self._budgets = {m: float(b) for m, b in budgets.items()}
            self._state_file = Path(state_file) if state_file else None

    # -- the view (call with the lock held) -----------------------------------------------------

    def _see(self, window: int, model: str, used: float, seq: int) -> None:
        """Keep the newest usage Redis reported for the current window (highest seq wins)."""
        if self._view_window is None or window > self._view_window:
            self._view_window, self._view, self._owed = window, {}, {}
        if window < self._view_window:
            return
        old = self._view.get(model)
        if old is None or seq >= old[1]:
            self._view[model] = (used, seq)

    def _see_owed(self, window: int, model: str, owed: float) -> None:
        """Keep what `model` owes from the window before `window` (it only grows: late settlements)."""
        if window == self._view_window:
            self._owed[model] = max(owed, self._owed.get(model, 0.0))

    def _viewed_used(self, window: int, model: str) -> float:
        """Usage as this replica sees it: Redis's last answer, the previous window's overdraw (spent
        budget of this one), and this replica's own operations not yet written."""
        if self._view_window != window:
            return self._pending.get((window, model), 0.0)
        seen = self._view.get(model)
        owed = self._owed.get(model, 0.0)
        return (seen[0] if seen else 0.0) + owed + self._pending.get((window, model), 0.0)

    def _enqueue(self, op: Op) -> None:
        """Queue a write (call with the lock held); the first one after a flush wakes the thread."""
        self._queue.append(op)
        if op.delta:
            key = (op.window, op.model)
            self._pending[key] = self._pending.get(key, 0.0) + op.delta
        self._dirty = True
        if len(self._queue) == 1:
            self._wake.set()

    def _share_rule(self, outage: Outage) -> str:
        """How the local share of `outage` is computed, in words (status detail and log)."""
        if outage.static:
            return f"the static split, budget x {self._static_share:g}"
        return f"1/{outage.replicas} of the remaining budget last seen"

    def _allowance(self, outage: Outage, window: int, model: str, budget: float) -> float:
        if outage.static:
            return budget * self._static_share
        if window == outage.window:
            return local_share(outage.remaining.get(model, budget), outage.replicas)
        return local_share(budget, outage.replicas)  # a new window began during the outage

    # -- budgets: the request path --------------------------------------------------------------

    def reserve(self, model: str, tokens: float, budget: float | None) -> Reservation | None:
        window = self.window().index
        reservation = Reservation(next(self._ids), model, tokens, window)
        if budget is None or not math.isfinite(budget):
            with self._lock:  # no budget: nothing to share, only counted here
                self._holds[reservation.id] = reservation
                self._local_only.add(reservation.id)
            return reservation
        if self._outage is None:
            pending = self._pending.get((window, model), 0.0)  # our own writes still queued
            try:
                granted, used, seq, owed = self._scripts["reserve"](
                    keys=[*self._model_keys(window, model), self.budget_key(model, window - 1)],
                    args=[
                        self._gid(reservation.id),
                        tokens,
                        budget,
                        self._hold_seconds,
                        self._expire_at(window),
                        pending,
                    ],
                )
            except redis.RedisError as exc:
                self._enter_outage(exc)
            else:
                with self._lock:
                    self._see(window, model, float(used), int(seq))
                    self._see_owed(window, model, float(owed))
                    if not int(granted):
                        return None
                    self._holds[reservation.id] = reservation
                return reservation
        with self._lock:  # Redis unreachable: admit on the local share, write the hold later
            outage = self._outage
            if outage is None:  # it answered again meanwhile; this one still goes the local way
                if budget - self._viewed_used(window, model) < tokens:
                    return None
            else:
                spent = outage.spent.get((window, model), 0.0)
                if spent + tokens > self._allowance(outage, window, model, budget):
                    return None
                outage.spent[window, model] = spent + tokens
            self._holds[reservation.id] = reservation
            self._enqueue(Op("hold", self._gid(reservation.id), model, window, tokens, tokens))
        return reservation

    def _end(self, reservation: Reservation, consumed: float | None) -> None:
        with self._lock:
            held = self._holds.pop(reservation.id, None)
            if held is None:
                return  # ended already: ending twice must not count twice
            if reservation.id in self._local_only:
                self._local_only.discard(reservation.id)
                if consumed:
                    key = (held.window, held.model)
                    self._local_used[key] = self._local_used.get(key, 0.0) + consumed
                return
            delta = (consumed or 0.0) - held.amount
            if self._outage is not None:
                key = (held.window, held.model)
                self._outage.spent[key] = self._outage.spent.get(key, 0.0) + delta
            self._enqueue(Op("end", self._gid(held.id), held.model, held.window, consumed, delta))

    def settle(self, reservation: Reservation, actual_tokens: float) -> None:
        self._end(reservation, actual_tokens)

    def release(self, reservation: Reservation) -> None:
        self._end(reservation, None)

    def charge(self, model: str, tokens: float) -> None:
        window = self.window().index
        with self._lock:
            if model not in self._budgets:
                key = (window, model)
                self._local_used[key] = self._local_used.get(key, 0.0) + tokens
                return
            if self._outage is not None:
                self._outage.spent[window, model] = self._outage.spent.get((window, model), 0.0) + tokens
            self._enqueue(Op("end", self._gid(next(self._ids)), model, window, tokens, tokens))

    def remaining(self, model: str, budget: float) -> float:
        window = self.window().index
        with self._lock:
            outage = self._outage
            if outage is not None:
                return self._allowance(outage, window, model, budget) - outage.spent.get((window, model), 0.0)
            return budget - self._viewed_used(window, model)

    def usage(self) -> dict[str, ModelUsage]:
        window = self.window().index
        with self._lock:
            in_flight: dict[str, float] = {}
            for r in self._holds.values():
                if r.window == window:
                    in_flight[r.model] = in_flight.get(r.model, 0.0) + r.amount
            out: dict[str, ModelUsage] = {}
            for model in set(self._budgets) | set(in_flight):
                if model in self._budgets:
                    used = self._viewed_used(window, model)
                else:
                    used = self._local_used.get((window, model), 0.0) + in_flight.get(model, 0.0)
                out[model] = ModelUsage(used, in_flight.get(model, 0.0))
            for (w, model), used in self._local_used.items():
                if w == window and model not in out:
                    out[model] = ModelUsage(used, 0.0)
            return out

    # -- dual prices, learned entries, volume ---------------------------------------------------

    def publish_gamma(self, gamma: Mapping[str, float]) -> None:
        payload = json.dumps({m: float(v) for m, v in gamma.items()}, sort_keys=True)
        with self._lock:
            self._enqueue(Op("gamma", payload=payload))

    def shared_gamma(self) -> SharedGamma | None:
        return self._gamma

    def _remember(self, entry: LearnedEntry) -> bool:
        """Keep a learned entry once per uid (call with the lock held); False when seen already."""
        if entry.uid in self._seen_uids:
            return False
        self._seen_uids.add(entry.uid)
        self._learned.append(entry)
        return True

    def append_learned(self, entry: LearnedEntry) -> None:
        with self._lock:
            if self._remember(entry):
                self._enqueue(Op("learned", payload=json.dumps(entry.to_json())))

    def learned(self, start: int) -> Sequence[LearnedEntry]:
        with self._lock:
            return self._learned[start:]

    def put_calibration(self, calibration: Calibration) -> None:
        payload = zlib.compress(json.dumps(calibration.to_json(), ensure_ascii=False).encode())
        pipe = self._calibration_redis.pipeline(transaction=True)
        pipe.hset(self._calibrations_key, calibration.model, payload)
        pipe.incr(self._calibrations_version_key)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis {self.url}: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._calibrations = {**self._calibrations, calibration.model: calibration}

    def calibrations(self) -> Mapping[str, Calibration]:
        with self._lock:
            return dict(self._calibrations)

    def _read_calibrations(self) -> bool:
        """Re-read the calibrations when their version counter moved; True when something changed."""
        raw_version = self._redis.get(self._calibrations_version_key)
        version = int(raw_version or 0)
        if version == self._calibration_version:
            return False
        raw = self._calibration_redis.hgetall(self._calibrations_key)
        found: dict[str, Calibration] = {}
        for field_name, payload in raw.items():
            model = field_name.decode(errors="replace")
            try:
                found[model] = Calibration.from_json(json.loads(zlib.decompress(payload)))
            except (zlib.error, ValueError, KeyError, TypeError, AttributeError):
                log.warning("state store: skipping a malformed calibration of %s", model)
        with self._lock:
            changed = {m: c.digest for m, c in found.items()} != {
                m: c.digest for m, c in self._calibrations.items()
            }
            self._calibrations = found
            self._calibration_version = version
        return changed

    def note_queries(self, count: int) -> None:
        with self._lock:
            self._queries_unsent += count

    def window_queries(self) -> int | None:
        window = self.window().index
        with self._lock:
            if self._window_queries is None or self._window_queries[0] != window:
                return None
            return self._window_queries[1] + self._queries_unsent

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a listener's bug must not stop the sync
                log.exception("state store listener failed")

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> StoreHealth:
        window = self.window().index
        with self._lock:
            outage = self._outage
            if outage is None:
                mode, detail, seconds, share = "shared", f"Redis {self.url}", 0.0, {}
            else:
                mode = "local-share"
                detail = (
                    f"Redis {self.url} unreachable ({outage.cause}); serving on a local share: "
                    f"{self._share_rule(outage)}"
                )
                seconds = time.monotonic() - outage.since
                share = {
                    m: self._allowance(outage, window, m, b) - outage.spent.get((window, m), 0.0)
                    for m, b in self._budgets.items()
                }
            return StoreHealth(
                kind="redis",
                shared=True,
                connected=outage is None,
                mode=mode,  # type: ignore[arg-type]
                detail=detail,
                pending_operations=len(self._queue),
                outage_seconds=seconds,
                outages=self._outages,
                errors=self._errors,
                live_replicas=self._live,
                local_share=share,
            )

    # -- talking to Redis (the store's thread, and the constructor) -----------------------------

    def _connect(self) -> None:
        """First contact or reconnect: agree on the anchor, restore lost usage, write what is
        queued, read the shared state; the outage ends only when nothing is left to write."""
        candidate = self._anchor if self._anchor is not None else self._started_wall
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._anchor_key, repr(candidate), nx=True)
        pipe.get(self._anchor_key)
        created, anchor = pipe.execute()
        with self._lock:
            provisional = self._anchor is None
            self._anchor = float(anchor)
            if provisional:
                self._rewindow(self.window().index)
            view_window, view = self._view_window, dict(self._view)
        if created and view_window is not None and view_window == self.window().index:
            self._restore(view_window, view)
        self._flush()
        self._sync()
        while True:  # the request path may have queued more meanwhile: shared admission resumes
            with self._lock:  # only when nothing is left to write
                if not self._queue:
                    outage, self._outage = self._outage, None
                    break
            self._flush()
        if outage is not None:
            log.warning(
                "state store: Redis %s answers again after %.1f s; reconciled, back to shared budgets",
                self.url,
                time.monotonic() - outage.since,
            )

    def _rewindow(self, window: int) -> None:
        """First contact after starting without Redis (call with the lock held): the windows this
        replica counted from its own start become the policy's current window."""
        ops = [replace(op, window=window) if op.kind in ("hold", "end") else op for op in self._queue]
        self._queue = deque(ops)
        self._pending = {}
        for op in ops:
            if op.delta:
                self._pending[window, op.model] = self._pending.get((window, op.model), 0.0) + op.delta
        self._holds = {rid: replace(r, window=window) for rid, r in self._holds.items()}

    def _restore(self, window: int, view: Mapping[str, tuple[float, int]]) -> None:
        restored = []
        for model, (used, _) in view.items():
            if used > 0 and model in self._budgets:
                u, seq = self._scripts["restore"](
                    keys=self._model_keys(window, model)[:1], args=[used, self._expire_at(window)]
                )
                with self._lock:
                    self._see(window, model, float(u), int(seq))
                restored.append(f"{model}={used:g}")
        if restored:
            log.warning(
                "state store: Redis %s lost this window's usage (restarted without persistence); "
                "restored it to what this replica last saw: %s",
                self.url,
                ", ".join(restored),
            )

    def _flush(self) -> None:
        """Write queued operations in order, in pipelined batches; stops at the first failure."""
        while True:
            with self._lock:
                batch = list(itertools.islice(self._queue, FLUSH_BATCH))
            if not batch:
                return
            pipe = self._redis.pipeline(transaction=False)
            for op in batch:
                self._queue_op(pipe, op)
            results = pipe.execute(raise_on_error=False)
            changed = False
            with self._lock:
                for op, result in zip(batch, results, strict=True):
                    if isinstance(result, Exception):
                        raise (
                            result if isinstance(result, redis.RedisError) else redis.RedisError(str(result))
                        )
                    self._queue.popleft()
                    if op.delta:
                        key = (op.window, op.model)
                        self._pending[key] = self._pending.get(key, 0.0) - op.delta
                        if abs(self._pending[key]) < 1e-9:
                            del self._pending[key]
                    if op.kind in ("hold", "end"):
                        self._see(op.window, op.model, float(result[1]), int(result[2]))
                    elif op.kind == "gamma":
                        gamma = {m: float(v) for m, v in json.loads(op.payload).items()}
                        if self._gamma is None or int(result) > self._gamma.version:
                            self._gamma = SharedGamma(int(result), gamma, self.replica_id)
                            changed = True
                self._dirty = True
            if changed:
                self._notify()

    def _queue_op(self, pipe: Any, op: Op) -> None:
        if op.kind == "hold":
            self._scripts["reserve"](
                keys=self._model_keys(op.window, op.model),
                args=[op.id, op.tokens, "", self._hold_seconds, self._expire_at(op.window), 0],
                client=pipe,
            )
        elif op.kind == "end":
            self._scripts["end"](
                keys=self._model_keys(op.window, op.model),
                args=[op.id, "" if op.tokens is None else op.tokens, self._expire_at(op.window)],
                client=pipe,
            )
        elif op.kind == "gamma":
            self._scripts["publish_gamma"](
                keys=[self._gamma_key], args=[op.payload, self.replica_id], client=pipe
            )
        elif op.kind == "learned":
            pipe.xadd(self._learned_key, {"e": op.payload}, maxlen=LEARNED_STREAM_MAX, approximate=True)
        else:  # pragma: no cover - the queue only ever holds the kinds above
            raise ValueError(f"unknown state operation {op.kind!r}")

    def _sync(self) -> None:
        """Heartbeat, usage of every budgeted model, live replicas, volume, gamma, learned."""
        window = self.window().index
        with self._lock:
            budgets = {m: b for m, b in self._budgets.items() if math.isfinite(b)}
            models = sorted(budgets)
            delta, self._queries_unsent = self._queries_unsent, 0
        keys = [self._replicas_key, f"{self._window_base(window)}:queries", self._gamma_key]
        for model in models:
            keys += [*self._model_keys(window, model)[:3], self.budget_key(model, window - 1)]
        try:
            reply = self._scripts["sync"](
                keys=keys,
                args=[self.replica_id, self._interval * ALIVE_INTERVALS, delta, self._expire_at(window)],
            )
        except redis.RedisError:
            with self._lock:
                self._queries_unsent += delta
            raise
        live, queries, version = int(reply[1]), int(reply[2]), int(reply[3])
        with self._lock:
            self._live = max(1, live)
            self._window_queries = (window, queries)
            for i, model in enumerate(models):
                used, seq, settled_before = reply[4 + 3 * i : 7 + 3 * i]
                self._see(window, model, float(used), int(seq))
                self._see_owed(window, model, max(0.0, float(settled_before) - budgets[model]))
            self._last_sync = time.monotonic()
            current = self._gamma.version if self._gamma is not None else 0
        changed = False
        if version > current:
            values = self._redis.hmget(self._gamma_key, ["version", "gamma", "origin"])
            if values[1]:
                gamma = {m: float(v) for m, v in json.loads(values[1]).items()}
                with self._lock:
                    self._gamma = SharedGamma(int(values[0]), gamma, values[2] or "")
                changed = True
        changed |= self._read_learned()
        changed |= self._read_calibrations()
        if changed:
            self._notify()

    def _read_learned(self) -> bool:
        added = False
        while True:
            start = "-" if self._stream_cursor == "-" else "(" + self._stream_cursor
            batch = self._redis.xrange(self._learned_key, min=start, max="+", count=500)
            if not batch:
                return added
            with self._lock:
                for stream_id, fields in batch:
                    self._stream_cursor = stream_id
                    try:
                        entry = LearnedEntry.from_json(json.loads(fields["e"]))
                    except (KeyError, ValueError, TypeError, AttributeError):
                        log.warning("state store: skipping a malformed learned entry %s", stream_id)
                        continue
                    added |= self._remember(entry)

    def _enter_outage(self, exc: BaseException) -> None:
        window = self.window().index
        with self._lock:
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._outage is not None:
                return
            static = self._view_window is None
            remaining = {m: b - self._viewed_used(window, m) for m, b in self._budgets.items()}
            self._outage = Outage(time.monotonic(), window, remaining, self._live, static, self._last_error)
            self._outages += 1
            rule = self._share_rule(self._outage)
        log.warning(
            "state store: Redis %s unreachable (%s); serving on a local share until it answers: %s",
            self.url,
            self._last_error,
            rule,
        )
        self._wake.set()

    # -- the store's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            writing = bool(self._queue) and self._outage is None
            self._wake.wait(timeout=FLUSH_DELAY_SECONDS if writing else self._interval)
            self._wake.clear()
            if self._stopping:
                return
            if self._queue and self._outage is None:
                time.sleep(FLUSH_DELAY_SECONDS)  # let the writes of this moment gather
            now = time.monotonic()
            try:
                if self._outage is not None:
                    if now - self._last_attempt >= self._interval:
                        self._last_attempt = now
                        self._connect()
                else:
                    self._flush()
                    if now - self._last_sync >= self._interval * 0.9:
                        self._sync()
            except redis.RedisError as exc:
                self._enter_outage(exc)
            except Exception:
                log.exception("state store: sync failed; trying again")
            if self._dirty and now - self._last_save >= SAVE_INTERVAL_SECONDS:
                self._last_save = now
                try:
                    self.save()
                except OSError as exc:
                    log.warning("state store: cannot write %s: %s", self._state_file, exc)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tollway-state", daemon=True)
            self._thread.start()

    def close(self, flush_timeout: float = 5.0) -> None:
        """Stop the thread, write what is queued (if Redis answers), persist the rest."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_timeout)
            self._thread = None
        if self._outage is None:
            with contextlib.suppress(redis.RedisError):
                self._flush()
        with contextlib.suppress(OSError):
            self.save()
        self._redis.close()
        self._calibration_redis.close()

    # -- persistence ----------------------------------------------------------------------------

    def save(self) -> None:
        """Write the anchor, the last usage seen and the queued operations to the state file."""
        with self._lock:
            if self._state_file is None:
                return
            state = {
                "version": STATE_VERSION,
                "kind": "redis",
                "window_seconds": self._window_seconds,
                "anchor": self._anchor,
                "view_window": self._view_window,
                "view": {m: [u, s] for m, (u, s) in self._view.items()},
                "live_replicas": self._live,
                "journal": [op.to_json() for op in self._queue],
            }
            path = self._state_file
            self._dirty = False
        write_atomically(path, json.dumps(state))

    def _load(self) -> None:
        if self._state_file is None:
            return
        try:
            state = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"budgets.stateFile {str(self._state_file)!r} is unreadable: {exc}") from exc
        if (
            not isinstance(state, dict)
            or state.get("kind") != "redis"
            or state.get("version") != STATE_VERSION
        ):
            return  # the in-process store's file (or none of ours): nothing to carry over
        if state.get("window_seconds") == self._window_seconds and state.get("anchor") is not None:
            self._anchor = float(state["anchor"])
            if state.get("view_window") is not None:
                self._view_window = int(state["view_window"])
                self._view = {str(m): (float(u), int(s)) for m, (u, s) in state.get("view", {}).items()}
            self._live = max(1, int(state.get("live_replicas", 1)))
        for raw in state.get("journal", []):
            op = Op.from_json(raw)
            self._enqueue(op)
            if op.kind == "learned":
                with contextlib.suppress(KeyError, ValueError, TypeError, AttributeError):
                    self._remember(LearnedEntry.from_json(json.loads(op.payload)))
        if self._queue:
            log.info(
                "state store: %d operation(s) from %s wait for Redis", len(self._queue), self._state_file
            )
