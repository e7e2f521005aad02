"""The in-process state store: one replica's budgets, dual prices and learned entries.

The default, for a single router replica and for local use (with several replicas each one
enforces its static share of every budget, `budgets.replicaShare`).

Budgets: usage per model per window, reservations in flight. The window begins when the store is
created (or when the persisted one began) and rolls over on the injectable monotonic clock;
reservations still in flight at a rollover are carried into the new window so that settling them
stays consistent. A model that ended its window overdrawn (a backend used more than the worst case
reserved for it: settling charges true usage whatever it is) carries the overdraw into the next
window as spent budget, so the debt is repaid there; a window that then passes idle clears it. One lock, short critical sections: usable from threads and asyncio alike.

Persistence, with ``state_file`` set: usage, the window's wall-clock start and the last published
dual prices are written there (atomically, at most once per ``save_interval_seconds`` from
`settle`, and on `save()`) and read back at construction, so a restart or reload within the same
window does not hand out the budget a second time. Learned entries are appended to a JSON-lines
file next to it (``<state_file>.learned.jsonl``) and read back at construction; calibrations (the
latest per model) are rewritten atomically to ``<state_file>.calibrations.json`` at every push.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from router_service.store.base import (
    Calibration,
    LearnedEntry,
    ModelUsage,
    Reservation,
    SharedGamma,
    StoreHealth,
    Window,
    replica_identity,
)

STATE_VERSION = 1


def learned_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".learned.jsonl")


def calibrations_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".calibrations.json")


class LocalStateStore:
    """Budgets, gamma and learned entries of one router process."""

    kind = "local"
    shared = False

    def __init__(
        self,
        *,
        window_seconds: float,
        state_file: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        save_interval_seconds: float = 1.0,
    ) -> None:
        self.replica_id = replica_identity()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._window_seconds = float(window_seconds)
        self._window_start = clock()
        self._window_start_wall = wall_clock()
        self._window = 0
        self._used: dict[str, float] = {}
        self._budgets: dict[str, float] = {}  # this replica's budgets, for the overdraw carry
        self._in_flight: dict[int, Reservation] = {}
        self._save_interval = save_interval_seconds
        self._last_save = -math.inf
        self._gamma: SharedGamma | None = None
        self._learned: list[LearnedEntry] = []
        self._calibrations: dict[str, Calibration] = {}
        self._state_file = Path(state_file) if state_file else None
        if self._state_file is not None:
            self._load()

    # -- window handling (call with the lock held) ---------------------------------------------

    def _roll(self) -> None:
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self._window_seconds:
            return
        periods = math.floor(elapsed / self._window_seconds)
        self._window_start += periods * self._window_seconds
        self._window_start_wall += periods * self._window_seconds
        self._window += periods
        carried: dict[str, float] = {}
        for r in self._in_flight.values():
            carried[r.model] = carried.get(r.model, 0.0) + r.amount
            self._in_flight[r.id] = Reservation(r.id, r.model, r.amount, self._window)
        if periods == 1:  # the overdraw of the window that just ended is repaid by this one
            for model, budget in self._budgets.items():
                debt = self._used.get(model, 0.0) - carried.get(model, 0.0) - budget
                if debt > 0:
                    carried[model] = carried.get(model, 0.0) + debt
        self._used = carried

    # -- budgets --------------------------------------------------------------------------------

    def configure(self, window_seconds: float, budgets: Mapping[str, float], state_file: str | None) -> None:
        with self._lock:
            self._roll()
            self._budgets = {m: float(b) for m, b in budgets.items()}
            self._window_seconds = float(window_seconds)
            self._state_file = Path(state_file) if state_file else None

    def window(self) -> Window:
        with self._lock:
            self._roll()
            elapsed = self._clock() - self._window_start
            return Window(
                index=self._window,
                elapsed_fraction=min(1.0, max(0.0, elapsed / self._window_seconds)),
                resets_in_seconds=max(0.0, self._window_seconds - elapsed),
            )

    def reserve(self, model: str, tokens: float, budget: float | None) -> Reservation | None:
        with self._lock:
            self._roll()
            if budget is not None and budget - self._used.get(model, 0.0) < tokens:
                return None
            reservation = Reservation(next(self._ids), model, float(tokens), self._window)
            self._used[model] = self._used.get(model, 0.0) + reservation.amount
            self._in_flight[reservation.id] = reservation
            return reservation

    def settle(self, reservation: Reservation, actual_tokens: float) -> None:
        with self._lock:
            self._roll()
            held = self._in_flight.pop(reservation.id, None)
            if held is None:
                return  # settled or released already: settling twice must not charge twice
            self._used[held.model] = self._used.get(held.model, 0.0) - held.amount + float(actual_tokens)
            due = self._state_file is not None and self._clock() - self._last_save >= self._save_interval
        if due:
            self.save()

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._roll()
            held = self._in_flight.pop(reservation.id, None)
            if held is None:
                return
            self._used[held.model] = self._used.get(held.model, 0.0) - held.amount

    def charge(self, model: str, tokens: float) -> None:
        with self._lock:
            self._roll()
            self._used[model] = self._used.get(model, 0.0) + float(tokens)

    def remaining(self, model: str, budget: float) -> float:
        with self._lock:
            self._roll()
            return budget - self._used.get(model, 0.0)

    def usage(self) -> dict[str, ModelUsage]:
        with self._lock:
            self._roll()
            in_flight: dict[str, float] = {}
            for r in self._in_flight.values():
                in_flight[r.model] = in_flight.get(r.model, 0.0) + r.amount
            models = set(self._used) | set(in_flight)
            return {m: ModelUsage(self._used.get(m, 0.0), in_flight.get(m, 0.0)) for m in models}

    # -- dual prices and learned entries --------------------------------------------------------

    def publish_gamma(self, gamma: Mapping[str, float]) -> None:
        with self._lock:
            version = self._gamma.version + 1 if self._gamma is not None else 1
            self._gamma = SharedGamma(version, {m: float(v) for m, v in gamma.items()}, self.replica_id)

    def shared_gamma(self) -> SharedGamma | None:
        return self._gamma

    def append_learned(self, entry: LearnedEntry) -> None:
        with self._lock:
            self._learned.append(entry)
            path = learned_path(self._state_file) if self._state_file is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(json.dumps(entry.to_json()) + "\n")

    def learned(self, start: int) -> Sequence[LearnedEntry]:
        with self._lock:
            return self._learned[start:]

    def put_calibration(self, calibration: Calibration) -> None:
        with self._lock:
            updated = {**self._calibrations, calibration.model: calibration}
            path = calibrations_path(self._state_file) if self._state_file is not None else None
        if path is not None:  # written before it is in use: a restart never loses one that was used
            write_atomically(path, json.dumps({m: c.to_json() for m, c in updated.items()}))
        with self._lock:
            self._calibrations = updated

    def calibrations(self) -> Mapping[str, Calibration]:
        with self._lock:
            return dict(self._calibrations)

    def note_queries(self, count: int) -> None:
        return None  # one replica: nobody else needs the count

    def window_queries(self) -> int | None:
        return None  # one replica: the engine's own count is the whole count

    # -- lifecycle ------------------------------------------------------------------------------

    def on_change(self, callback: Callable[[], None]) -> None:
        return None  # nothing arrives from elsewhere

    def health(self) -> StoreHealth:
        return StoreHealth(kind="local", shared=False, connected=True, mode="local")

    def start(self) -> None:
        return None

    def close(self) -> None:
        self.save()

    # -- persistence ----------------------------------------------------------------------------

    def save(self) -> None:
        """Write usage (and the last published gamma) to the state file; no-op without one."""
        with self._lock:
            if self._state_file is None:
                return
            state: dict = {
                "version": STATE_VERSION,
                "window_seconds": self._window_seconds,
                "window_start_wall": self._window_start_wall,
                "used": dict(self._used),
            }
            if self._gamma is not None:
                state["gamma"] = dict(self._gamma.gamma)
            path = self._state_file
            self._last_save = self._clock()
        write_atomically(path, json.dumps(state))

    def _load(self) -> None:
        assert self._state_file is not None
        try:
            state = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            state = None
        except (OSError, ValueError) as exc:
            raise ValueError(f"budgets.stateFile {str(self._state_file)!r} is unreadable: {exc}") from exc
        if isinstance(state, dict) and state.get("kind", "local") != "local":
            state = None  # the shared store's file (a config switched stores): nothing to carry over
        if state is not None:
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError(f"budgets.stateFile {str(self._state_file)!r}: unknown format (version)")
            elapsed = self._wall_clock() - float(state["window_start_wall"])
            if 0 <= elapsed < self._window_seconds:
                # Same window as before the restart: keep its usage, align our clock to it.
                self._used = {str(m): float(v) for m, v in state["used"].items()}
                self._window_start = self._clock() - elapsed
                self._window_start_wall = float(state["window_start_wall"])
            if isinstance(state.get("gamma"), dict):
                gamma = {str(m): float(v) for m, v in state["gamma"].items()}
                self._gamma = SharedGamma(1, gamma, "state-file")
        self._learned = read_learned(learned_path(self._state_file))
        self._calibrations = read_calibrations(calibrations_path(self._state_file))


def read_learned(path: Path) -> list[LearnedEntry]:
    """Entries of a learned-entries file; a torn last line (a crash mid-write) is skipped."""
    out: list[LearnedEntry] = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            try:
                out.append(LearnedEntry.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return out


def read_calibrations(path: Path) -> dict[str, Calibration]:
    """The calibrations file (absent: none). Unreadable content is an error: it was written
    atomically, so it is not a torn write but something to look at."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"calibrations file {str(path)!r} is unreadable: {exc}") from exc
    try:
        return {str(model): Calibration.from_json(raw) for model, raw in data.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"calibrations file {str(path)!r}: bad content ({exc})") from exc


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
