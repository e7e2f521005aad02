"""Routing decisions as pure functions: score, rank, pick.

The routing rule is PORT's: a model's score for a query is ``alpha * d - gamma * g`` where ``d`` is
the estimated quality, ``g`` the estimated cost and ``gamma`` the model's dual price (the value of
one unit of its budget). Ranking orders every model best-first; picking walks that order through
two filters the caller supplies (can the model's budget pay the estimated cost? does it have room
right now?) and says why it chose what it chose.

Nothing here holds state or does I/O; the online engine, the HTTP router and the offline
evaluation all call these same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

PickReason = Literal["routed", "degraded", "over-budget", "rejected", "none"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model as a destination for one query."""

    model: str
    score: float
    """alpha * quality - gamma * cost: what the router maximises."""
    quality: float
    """Estimated quality d_hat (0..1)."""
    est_tokens: float
    """Estimated cost in budget units (tokens for the online router)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The outcome of `pick`."""

    model: str | None
    """Chosen model, or None when nothing may serve the query."""
    reason: PickReason
    """routed: the best-ranked model; over-budget: the best one(s) could not pay, a lower-ranked
    model serves; degraded: the best one(s) had no room (saturated), a lower-ranked model serves;
    rejected: the best score is below the reject threshold; none: no model passes the filters."""
    candidate: Candidate | None = None
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """(model, 'over-budget' | 'no-room') for every better-ranked model passed over."""

    @property
    def budget_exhausted(self) -> bool:
        """True when no model was chosen and at least one was skipped for its budget."""
        return self.model is None and any(why == "over-budget" for _, why in self.skipped)


def scores(quality: np.ndarray, cost: np.ndarray, gamma: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * d - gamma * g, elementwise; works for one query [m] or a batch [n, m]."""
    return alpha * np.asarray(quality, dtype=np.float64) - np.asarray(gamma, dtype=np.float64) * np.asarray(
        cost, dtype=np.float64
    )


def rank(
    models: Sequence[str],
    quality: np.ndarray,
    cost: np.ndarray,
    gamma: np.ndarray,
    alpha: float,
) -> list[Candidate]:
    """Every model as a Candidate, best score first (ties: higher quality, then listed order)."""
    s = scores(quality, cost, gamma, alpha)
    # lexsort sorts by the last key first: score desc, then quality desc, then index asc.
    order = np.lexsort((np.arange(len(models)), -np.asarray(quality, dtype=np.float64), -s))
    return [
        Candidate(model=models[i], score=float(s[i]), quality=float(quality[i]), est_tokens=float(cost[i]))
        for i in order
    ]


def _always(_: Candidate) -> bool:
    return True


def pick(
    ranking: Sequence[Candidate],
    can_afford: Callable[[Candidate], bool] = _always,
    has_room: Callable[[Candidate], bool] = _always,
    reject_below: float | None = None,
) -> Choice:
    """Walk the ranking best-first and take the first model that can pay and has room.

    The reject option looks at the best-ranked candidate only: when even the best score is below
    ``reject_below`` the query is not worth any model's budget (reason "rejected").
    """
    if not ranking:
        return Choice(model=None, reason="none")
    if reject_below is not None and ranking[0].score < reject_below:
        return Choice(model=None, reason="rejected")
    skipped: list[tuple[str, str]] = []
    for candidate in ranking:
        if not can_afford(candidate):
            skipped.append((candidate.model, "over-budget"))
            continue
        if not has_room(candidate):
            skipped.append((candidate.model, "no-room"))
            continue
        if not skipped:
            reason: PickReason = "routed"
        elif skipped[0][1] == "over-budget":
            reason = "over-budget"
        else:
            reason = "degraded"
        return Choice(model=candidate.model, reason=reason, candidate=candidate, skipped=tuple(skipped))
    return Choice(model=None, reason="none", skipped=tuple(skipped))


def argmax_model(quality: np.ndarray, cost: np.ndarray, gamma: np.ndarray, alpha: float) -> np.ndarray:
    """Index of the best model per query for a batch [n, m] (PORT's rule without budget checks)."""
    return np.argmax(scores(quality, cost, gamma, alpha), axis=-1)


def gamma_vector(models: Sequence[str], gamma: Mapping[str, float]) -> np.ndarray:
    """Dual prices as an array in `models` order (missing models: 0, i.e. unconstrained)."""
    return np.array([float(gamma.get(m, 0.0)) for m in models], dtype=np.float64)
