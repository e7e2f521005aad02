"""Dual prices (gamma): fitting them, and the online state that decides when to re-fit.

PORT prices each model's budget with a dual variable gamma_i and routes a query to
argmax_i (alpha d_ij - gamma_i g_ij). The prices minimise, over a sample of queries,

    F(gamma) = sum_i gamma_i b_i + sum_j max_i (alpha d_ij - gamma_i g_ij)     (1)

where b_i is model i's budget scaled to the sample (eps x B_i for the eps x N learning queries).
(1) is the Lagrangian dual of the allocation LP "maximise estimated quality subject to per-model
budgets, every query served". tollway's variant adds the reject option, max(0, .) inside the sum,
which is the dual of the LP where a query may also be left unserved (the same LP as
Approx-Optimum's): it is always bounded, so gamma needs no artificial upper bound.

Solvers:
- ``lp`` (default): (1) is convex and piecewise linear, so it is solved *exactly* as an LP
  (epigraph variables u_j >= alpha d_ij - gamma_i g_ij) with HiGHS. One solve of a few thousand
  rows takes milliseconds and gives the true minimiser.
- ``lbfgsb``: what the reference code does: L-BFGS-B from gamma = 1/M with numerical gradients
  on a non-smooth function. Kept for the faithful reproduction; it stops wherever the finite
  differences stop improving, which is usually not the minimiser (see the benchmark results).

Both are fitted on normalised units internally (costs divided by their mean, the objective by
alpha) so that USD costs around 1e-4 and token costs around 1e3 behave the same numerically.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.optimize import linprog, minimize

FitMethod = Literal["lp", "lbfgsb"]
Algorithm = Literal["tollway", "port"]


def _check(d: np.ndarray, g: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.asarray(d, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    b = np.asarray(budgets, dtype=np.float64)
    if d.ndim != 2 or d.shape != g.shape:
        raise ValueError(
            f"quality and cost must be [queries, models] of one shape, got {d.shape} and {g.shape}"
        )
    if b.shape != (d.shape[1],):
        raise ValueError(f"budgets must have one entry per model ({d.shape[1]}), got shape {b.shape}")
    if np.any(b < 0) or np.any(np.isnan(b)):
        raise ValueError("budgets must be >= 0 (inf: unconstrained)")
    if np.any(g < 0):
        raise ValueError("costs must be >= 0")
    return d, g, b


def dual_objective(
    gamma: np.ndarray, d: np.ndarray, g: np.ndarray, budgets: np.ndarray, alpha: float, reject: bool
) -> float:
    """F(gamma) of (1); models with infinite budget must have gamma 0."""
    gamma = np.asarray(gamma, dtype=np.float64)
    finite = np.isfinite(budgets)
    inner = (alpha * d - gamma * g).max(axis=1)
    if reject:
        inner = np.maximum(inner, 0.0)
    return float((gamma[finite] * budgets[finite]).sum() + inner.sum())


def fit_duals(
    quality: np.ndarray,
    cost: np.ndarray,
    budgets: np.ndarray,
    alpha: float,
    *,
    reject: bool = True,
    upper: float | None = None,
    method: FitMethod = "lp",
) -> np.ndarray:
    """Dual prices minimising (1) over a sample: quality/cost [n, m], budgets [m] for that sample.

    ``upper`` bounds every gamma (PORT uses 1.0); ``reject`` adds the max(0, .) term. Without the
    reject term and without an upper bound the problem is unbounded whenever the sample cannot be
    served within the budgets, so that combination needs ``upper``. Infinite budgets mean "no
    constraint" and get gamma 0.
    """
    d, g, b = _check(quality, cost, budgets)
    n, m = d.shape
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not reject and upper is None:
        raise ValueError("fit_duals without the reject term needs an upper bound on gamma")
    finite = np.isfinite(b)
    if n == 0 or not finite.any():
        return np.zeros(m)
    if method == "lbfgsb":
        return _fit_lbfgsb(d, g, b, alpha, reject=reject, upper=1.0 if upper is None else upper)
    if method != "lp":
        raise ValueError(f"unknown dual fit method {method!r}; use 'lp' or 'lbfgsb'")

    scale = float(g[:, finite].mean()) or 1.0  # cost unit: the mean cost
    gn = g / scale
    bn = np.where(finite, b, 0.0) / scale
    # Variables: gamma' (m) then u (n), gamma = gamma' * alpha / scale, u = u' * alpha.
    c = np.concatenate([bn, np.ones(n)])
    rows = np.repeat(np.arange(n * m), 2)
    cols = np.empty(2 * n * m, dtype=np.int64)
    cols[0::2] = np.tile(np.arange(m), n)
    cols[1::2] = m + np.repeat(np.arange(n), m)
    vals = np.empty(2 * n * m)
    vals[0::2] = -gn.ravel()
    vals[1::2] = -1.0
    a_ub = sparse.csr_matrix((vals, (rows, cols)), shape=(n * m, m + n))
    b_ub = -d.ravel()
    gamma_hi = None if upper is None else upper * scale / alpha
    bounds = [(0.0, gamma_hi) if finite[i] else (0.0, 0.0) for i in range(m)]
    bounds += [(0.0, None) if reject else (None, None)] * n
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"dual LP failed: {res.message}")
    return np.clip(res.x[:m], 0.0, None) * alpha / scale


def _fit_lbfgsb(
    d: np.ndarray, g: np.ndarray, b: np.ndarray, alpha: float, *, reject: bool, upper: float
) -> np.ndarray:
    """The reference code's fit: L-BFGS-B, numeric gradients, gamma0 = 1/M, bounds [0, upper]."""
    m = d.shape[1]
    finite = np.isfinite(b)
    bf = np.where(finite, b, 0.0)

    def objective(gamma: np.ndarray) -> float:
        return dual_objective(np.where(finite, gamma, 0.0), d, g, bf, alpha, reject)

    x0 = np.where(finite, 1.0 / m, 0.0)
    bounds = [(0.0, upper) if finite[i] else (0.0, 0.0) for i in range(m)]
    res = minimize(objective, x0, method="L-BFGS-B", bounds=bounds)
    return np.clip(res.x, 0.0, None)


class DualController:
    """When to fit gamma and on which sample: the state shared by the online engine and the
    offline evaluation.

    - ``port``: the first ``warmup_queries`` observed queries are the learning set; gamma is fitted
      once on them with budgets ``warmup_fraction x B`` and (1) without the reject term, gamma in
      [0, 1] (as published). Before that, gamma is 0 and the phase is "warmup".
    - ``tollway``: gamma starts from a fit on a prior sample (the history's own neighbour
      estimates, scaled to the expected volume), so warm-up queries are already priced and served.
      After ``warmup_queries`` and then every ``refit_every`` queries it re-fits on the most recent
      observed queries (padded with the prior sample while they are few) against the *remaining*
      budget and the *remaining* expected queries, which tracks both consumption and drift.
    """

    def __init__(
        self,
        models: Sequence[str],
        alpha: float,
        *,
        algorithm: Algorithm = "tollway",
        expected_queries: int,
        warmup_fraction: float,
        refit_every: int = 0,
        method: FitMethod = "lp",
        prior_quality: np.ndarray | None = None,
        prior_cost: np.ndarray | None = None,
        max_sample: int = 2000,
        min_sample: int = 200,
    ) -> None:
        if expected_queries < 1:
            raise ValueError("expected_queries must be >= 1")
        self.models = list(models)
        self.alpha = float(alpha)
        self.algorithm: Algorithm = algorithm
        self.expected_queries = int(expected_queries)
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_queries = math.ceil(warmup_fraction * expected_queries)
        self.refit_every = int(refit_every)
        self.method: FitMethod = method
        self.min_sample = min_sample
        self._lock = threading.Lock()
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max_sample)
        self._prior_d = None if prior_quality is None else np.asarray(prior_quality, dtype=np.float64)
        self._prior_g = None if prior_cost is None else np.asarray(prior_cost, dtype=np.float64)
        self.observed = 0
        self.fits = 0
        self.adopted = 0
        self.gamma = np.zeros(len(self.models))

    # -- state ----------------------------------------------------------------------------------

    @property
    def phase(self) -> Literal["warmup", "routed"]:
        return "warmup" if self.observed < self.warmup_queries or self.fits == 0 else "routed"

    def gamma_dict(self) -> dict[str, float]:
        return {m: float(v) for m, v in zip(self.models, self.gamma, strict=True)}

    def set_expected_queries(self, expected_queries: int) -> None:
        """A new expected volume per window (this replica's share of it changed)."""
        if expected_queries < 1:
            raise ValueError("expected_queries must be >= 1")
        with self._lock:
            self.expected_queries = int(expected_queries)
            self.warmup_queries = math.ceil(self.warmup_fraction * expected_queries)

    def adopt(self, gamma: dict[str, float]) -> None:
        """Install prices fitted elsewhere (another router replica); models it does not name keep
        theirs. Not a fit of this controller: `fits` does not change."""
        with self._lock:
            new = self.gamma.copy()
            for i, model in enumerate(self.models):
                if model in gamma and math.isfinite(gamma[model]) and gamma[model] >= 0:
                    new[i] = float(gamma[model])
            self.gamma = new
            self.adopted += 1

    def reset_window(self) -> None:
        """A new budget window began: count queries from zero again (gamma is kept)."""
        with self._lock:
            self.observed = 0

    def observe(self, quality: np.ndarray, cost: np.ndarray) -> bool:
        """Record one routed query's estimates; True when a (re-)fit is due now."""
        with self._lock:
            self._recent.append((np.asarray(quality, dtype=np.float64), np.asarray(cost, dtype=np.float64)))
            self.observed += 1
            return self._due()

    def observe_batch(self, quality: np.ndarray, cost: np.ndarray) -> None:
        with self._lock:
            for q, c in zip(np.asarray(quality), np.asarray(cost), strict=True):
                self._recent.append((q, c))
            self.observed += len(quality)

    def _due(self) -> bool:
        n = self.observed
        if n == self.warmup_queries:
            return True
        if self.algorithm == "tollway" and self.refit_every > 0 and n > self.warmup_queries:
            return (n - self.warmup_queries) % self.refit_every == 0
        return False

    # -- fitting --------------------------------------------------------------------------------

    def fit_prior(self, budgets: np.ndarray) -> np.ndarray:
        """tollway's initial prices from the prior sample; budgets are per window (full)."""
        if self._prior_d is None or self._prior_g is None or len(self._prior_d) == 0:
            return self.gamma
        scale = len(self._prior_d) / self.expected_queries
        gamma = fit_duals(
            self._prior_d, self._prior_g, np.asarray(budgets, dtype=np.float64) * scale, self.alpha,
            reject=True, method=self.method,
        )  # fmt: skip
        with self._lock:
            self.gamma = gamma
        return gamma

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The queries the next fit runs on."""
        with self._lock:
            recent = list(self._recent)
        m = len(self.models)
        rows = recent[: self.warmup_queries] if self.algorithm == "port" else recent
        d = np.array([r[0] for r in rows], dtype=np.float64).reshape(-1, m)
        g = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, m)
        if self.algorithm == "tollway" and len(d) < self.min_sample and self._prior_d is not None:
            need = self.min_sample - len(d)
            pick = np.linspace(0, len(self._prior_d) - 1, num=min(need, len(self._prior_d))).astype(int)
            d = np.vstack([d, self._prior_d[pick]])
            g = np.vstack([g, self._prior_g[pick]])
        return d, g

    def fit(
        self,
        remaining_budgets: np.ndarray,
        full_budgets: np.ndarray | None = None,
        remaining_queries: float | None = None,
    ) -> np.ndarray:
        """Fit gamma now and install it.

        port: ``full_budgets`` x warmup_fraction on the learning set (remaining is ignored).
        tollway: ``remaining_budgets`` spread over the remaining expected queries
        (``remaining_queries``, default expected_queries - observed, at least 1): the sample's
        budget is remaining x len(sample) / remaining_queries.
        """
        d, g = self.sample()
        if self.algorithm == "port":
            base = full_budgets if full_budgets is not None else remaining_budgets
            b = np.asarray(base, dtype=np.float64) * self.warmup_fraction
            gamma = fit_duals(d, g, b, self.alpha, reject=False, upper=1.0, method=self.method)
        else:
            left = (
                remaining_queries if remaining_queries is not None else self.expected_queries - self.observed
            )
            left = max(float(left), 1.0)
            b = np.clip(np.asarray(remaining_budgets, dtype=np.float64), 0.0, None) * (len(d) / left)
            gamma = fit_duals(d, g, b, self.alpha, reject=True, method=self.method)
        with self._lock:
            self.gamma = gamma
            self.fits += 1
        return gamma
