"""The budget ledger: hard per-model budgets per time window, charged with true usage.

Flow for one request: ``reserve(model, estimated)`` before sending it (None when the model's
remaining budget cannot pay the estimate: the caller falls back to another model),
``settle(reservation, actual)`` when the response reports its usage, or ``release(reservation)``
when the upstream call failed and nothing was consumed.

Budgets come from `BudgetConfig`: tokens per window per model. Models without a budget are
unlimited. Where usage is kept is the state store's business (`router_service.store`):

- in-process (`LocalStateStore`, the default): this replica enforces `replicaShare` of every
  budget; usage persists to `budgets.stateFile`;
- Redis (`RedisStateStore`): every replica reserves from the whole budget, atomically, so the
  fleet together never admits more than the budget; no per-replica split.

The clock is injectable (tests drive window rollover by hand) and reaches the default store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from router_service.config import BudgetConfig
from router_service.store.base import Reservation, StateStore
from router_service.store.local import LocalStateStore

__all__ = ["BudgetLedger", "Reservation"]


class BudgetLedger:
    """Per-model budgets per window with reserve / settle / release, over a state store."""

    def __init__(
        self,
        config: BudgetConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        save_interval_seconds: float = 1.0,
        store: StateStore | None = None,
    ) -> None:
        self._store: StateStore = store or LocalStateStore(
            window_seconds=config.window_seconds,
            state_file=config.state_file,
            clock=clock,
            wall_clock=wall_clock,
            save_interval_seconds=save_interval_seconds,
        )
        self._config = config
        self._budgets = self._budgets_from(config)
        self._store.configure(config.window_seconds, self._budgets, config.state_file)

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

    def _budgets_from(self, config: BudgetConfig) -> dict[str, float]:
        share = 1.0 if self._store.shared else config.replica_share
        return {m: float(t) * share for m, t in config.tokens.items()}

    @property
    def store(self) -> StateStore:
        return self._store

    @property
    def shared(self) -> bool:
        """True when every replica spends from the whole budget through a shared store."""
        return self._store.shared

    # -- public API -----------------------------------------------------------------------------

    def reserve(self, model: str, tokens: float) -> Reservation | None:
        """Hold `tokens` of `model`'s budget; None when the remaining budget cannot pay them."""
        if tokens < 0 or math.isnan(tokens):
            raise ValueError(f"reserve: tokens must be a non-negative number, got {tokens!r}")
        return self._store.reserve(model, float(tokens), self._budgets.get(model))

    def settle(self, reservation: Reservation, actual_tokens: float) -> None:
        """Replace the reserved estimate by the true usage (may overdraw: the work is done)."""
        if actual_tokens < 0 or math.isnan(actual_tokens):
            raise ValueError(f"settle: actual_tokens must be a non-negative number, got {actual_tokens!r}")
        self._store.settle(reservation, float(actual_tokens))

    def release(self, reservation: Reservation) -> None:
        """Give the reserved amount back (the request failed before consuming anything)."""
        self._store.release(reservation)

    def charge(self, model: str, tokens: float) -> None:
        """Charge usage that had no reservation (e.g. a pinned model, or the offline evaluation)."""
        self._store.charge(model, float(tokens))

    def remaining(self, model: str) -> float:
        """Budget left in this window (inf for a model without a budget; negative when overdrawn)."""
        budget = self._budgets.get(model)
        if budget is None:
            return math.inf
        return self._store.remaining(model, budget)

    def can_afford(self, model: str, tokens: float) -> bool:
        return self.remaining(model) >= tokens

    def budget(self, model: str) -> float:
        """The budget per window this replica enforces for `model` (inf without one)."""
        return self._budgets.get(model, math.inf)

    @property
    def budgets(self) -> dict[str, float]:
        return dict(self._budgets)

    @property
    def window_index(self) -> int:
        """How many windows have passed since the first one (changes at every rollover)."""
        return self._store.window().index

    def window_elapsed_fraction(self) -> float:
        return self._store.window().elapsed_fraction

    def snapshot(self) -> dict:
        """JSON-ready state for status endpoints and metrics."""
        window = self._store.window()
        usage = self._store.usage()
        models = sorted(set(self._budgets) | set(usage))
        return {
            "window_seconds": self._config.window_seconds,
            "window_index": window.index,
            "window_resets_in_seconds": window.resets_in_seconds,
            "replica_share": 1.0 if self._store.shared else self._config.replica_share,
            "store": self._store.kind,
            "models": {
                m: {
                    "budget": self._budgets.get(m),
                    "used": usage[m].used if m in usage else 0.0,
                    "in_flight": usage[m].in_flight if m in usage else 0.0,
                    "remaining": None if m not in self._budgets else self.remaining(m),
                }
                for m in models
            },
        }

    def resize(self, config: BudgetConfig) -> None:
        """Take new budgets (config reload) keeping this window's usage and in-flight holds."""
        self._config = config
        self._budgets = self._budgets_from(config)
        self._store.configure(config.window_seconds, self._budgets, config.state_file)

    def save(self) -> None:
        """Persist what the store keeps locally (no-op without a state file)."""
        self._store.save()
