"""The budget ledger: hard per-model budgets per time window, charged with true usage.

Flow for one request: ``reserve(model, estimated)`` before sending it (None when the model's
remaining budget cannot pay the estimate: the caller falls back to another model),
``settle(reservation, actual)`` when the response reports its usage, or ``release(reservation)``
when the upstream call failed and nothing was consumed.

Budgets come from `BudgetConfig`: tokens per window per model, times this replica's share. Models
without a budget are unlimited. Budgets refill when a window ends; reservations still in flight at
that moment are carried into the new window so that settling them stays consistent. A model that
ended its window overdrawn (a backend used more than the worst case reserved for it: settling
charges true usage whatever it is) carries the overdraw into the next window as spent budget, so
the debt is repaid there; a window that then passes idle clears it. The clock is
injectable (tests drive window rollover by hand). All methods take one lock and are short, so the
ledger can be used from threads and from asyncio code alike.

With ``config.state_file`` set, the ledger's usage is written there (atomically, at most once per
``save_interval_seconds`` from `settle`, and on `save()`) and read back at construction, so a
restart or reload within the same window does not hand out the budget a second time. Windows are
placed on the wall clock (``wall_clock``) in the file because monotonic clocks do not survive a
restart.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from router_service.config import BudgetConfig

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one in-flight request."""

    id: int
    model: str
    amount: float
    window: int


class BudgetLedger:
    """Per-model budgets per window with reserve / settle / release."""

    def __init__(
        self,
        config: BudgetConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        save_interval_seconds: float = 1.0,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._config = config
        self._budgets = self._budgets_from(config)
        self._window_seconds = float(config.window_seconds)
        self._window_start = clock()
        self._window_start_wall = wall_clock()
        self._window = 0
        self._used: dict[str, float] = {}
        self._in_flight: dict[int, Reservation] = {}
        self._save_interval = save_interval_seconds
        self._last_save = -math.inf
        self._dirty = False
        self._state_file = Path(config.state_file) if config.state_file else None
        if self._state_file is not None:
            self._load()

    # -- construction helpers -------------------------------------------------------------------

    @classmethod
    def from_amounts(
        cls, amounts: Mapping[str, float], clock: Callable[[], float] = time.monotonic
    ) -> BudgetLedger:
        """A single-window ledger over arbitrary (possibly fractional) amounts, e.g. USD budgets
        in the offline evaluation. The window never rolls over."""
        ledger = cls(BudgetConfig(window_seconds=1e18), clock=clock)
        ledger._budgets = {m: float(v) for m, v in amounts.items()}
        return ledger

    @staticmethod
    def _budgets_from(config: BudgetConfig) -> dict[str, float]:
        return {m: float(t) * config.replica_share for m, t in config.tokens.items()}

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
        self._dirty = True

    def _remaining(self, model: str) -> float:
        budget = self._budgets.get(model)
        if budget is None:
            return math.inf
        return budget - self._used.get(model, 0.0)

    # -- public API -----------------------------------------------------------------------------

    def reserve(self, model: str, tokens: float) -> Reservation | None:
        """Hold `tokens` of `model`'s budget; None when the remaining budget cannot pay them."""
        if tokens < 0 or math.isnan(tokens):
            raise ValueError(f"reserve: tokens must be a non-negative number, got {tokens!r}")
        with self._lock:
            self._roll()
            if self._remaining(model) < tokens:
                return None
            reservation = Reservation(next(self._ids), model, float(tokens), self._window)
            self._used[model] = self._used.get(model, 0.0) + reservation.amount
            self._in_flight[reservation.id] = reservation
            self._dirty = True
            return reservation

    def settle(self, reservation: Reservation, actual_tokens: float) -> None:
        """Replace the reserved estimate by the true usage (may overdraw: the work is done)."""
        if actual_tokens < 0 or math.isnan(actual_tokens):
            raise ValueError(f"settle: actual_tokens must be a non-negative number, got {actual_tokens!r}")
        with self._lock:
            self._roll()
            held = self._in_flight.pop(reservation.id, None)
            if held is None:
                return  # settled or released already: settling twice must not charge twice
            self._used[held.model] = self._used.get(held.model, 0.0) - held.amount + float(actual_tokens)
            self._dirty = True
            due = self._state_file is not None and self._clock() - self._last_save >= self._save_interval
        if due:
            self.save()

    def release(self, reservation: Reservation) -> None:
        """Give the reserved amount back (the request failed before consuming anything)."""
        with self._lock:
            self._roll()
            held = self._in_flight.pop(reservation.id, None)
            if held is None:
                return
            self._used[held.model] = self._used.get(held.model, 0.0) - held.amount
            self._dirty = True

    def charge(self, model: str, tokens: float) -> None:
        """Charge usage that had no reservation (e.g. a pinned model, or the offline evaluation)."""
        with self._lock:
            self._roll()
            self._used[model] = self._used.get(model, 0.0) + float(tokens)
            self._dirty = True

    def remaining(self, model: str) -> float:
        """Budget left in this window (inf for a model without a budget; negative when overdrawn)."""
        with self._lock:
            self._roll()
            return self._remaining(model)

    def can_afford(self, model: str, tokens: float) -> bool:
        with self._lock:
            self._roll()
            return self._remaining(model) >= tokens

    def budget(self, model: str) -> float:
        """This replica's budget per window for `model` (inf without one)."""
        return self._budgets.get(model, math.inf)

    @property
    def budgets(self) -> dict[str, float]:
        return dict(self._budgets)

    @property
    def window_index(self) -> int:
        """How many windows have passed since the ledger started (changes at every rollover)."""
        with self._lock:
            self._roll()
            return self._window

    def window_elapsed_fraction(self) -> float:
        with self._lock:
            self._roll()
            return min(1.0, max(0.0, (self._clock() - self._window_start) / self._window_seconds))

    def snapshot(self) -> dict:
        """JSON-ready state for status endpoints and metrics."""
        with self._lock:
            self._roll()
            models = sorted(set(self._budgets) | set(self._used))
            in_flight: dict[str, float] = {}
            for r in self._in_flight.values():
                in_flight[r.model] = in_flight.get(r.model, 0.0) + r.amount
            return {
                "window_seconds": self._window_seconds,
                "window_index": self._window,
                "window_resets_in_seconds": max(
                    0.0, self._window_start + self._window_seconds - self._clock()
                ),
                "replica_share": self._config.replica_share,
                "models": {
                    m: {
                        "budget": self._budgets.get(m),
                        "used": self._used.get(m, 0.0),
                        "in_flight": in_flight.get(m, 0.0),
                        "remaining": None if m not in self._budgets else self._remaining(m),
                    }
                    for m in models
                },
            }

    def resize(self, config: BudgetConfig) -> None:
        """Take new budgets (config reload) keeping this window's usage and in-flight holds."""
        with self._lock:
            self._roll()
            self._config = config
            self._budgets = self._budgets_from(config)
            self._window_seconds = float(config.window_seconds)
            self._state_file = Path(config.state_file) if config.state_file else None
            self._dirty = True

    # -- persistence ----------------------------------------------------------------------------

    def save(self) -> None:
        """Write usage to the state file (atomic replace); no-op without one."""
        with self._lock:
            if self._state_file is None:
                return
            state = {
                "version": STATE_VERSION,
                "window_seconds": self._window_seconds,
                "window_start_wall": self._window_start_wall,
                "used": self._used,
            }
            path = self._state_file
            self._last_save = self._clock()
            self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(state, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self) -> None:
        assert self._state_file is not None
        try:
            state = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"budgets.stateFile {str(self._state_file)!r} is unreadable: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"budgets.stateFile {str(self._state_file)!r}: unknown format (version)")
        elapsed = self._wall_clock() - float(state["window_start_wall"])
        if 0 <= elapsed < self._window_seconds:
            # Same window as before the restart: keep its usage, align our clock to it.
            self._used = {str(m): float(v) for m, v in state["used"].items()}
            self._window_start = self._clock() - elapsed
            self._window_start_wall = float(state["window_start_wall"])
