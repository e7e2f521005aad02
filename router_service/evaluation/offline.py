"""Offline allocation LPs: Approx-Optimum (on estimates) and Optimum (on true values).

    maximise   sum_ij d_ij x_ij
    subject to sum_i x_ij <= 1            (each query served at most once)
               sum_j g_ij x_ij <= B_i     (per-model budgets)
               0 <= x_ij <= 1

solved with HiGHS, then rounded: query j goes to argmax_i x_ij when it carries any mass (a basic
optimal solution has at most M fractional queries, so rounding changes little).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linprog


def solve_allocation(quality: np.ndarray, cost: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """The LP's optimal x [n, m] (infinite budgets: unconstrained)."""
    d = np.asarray(quality, dtype=np.float64)
    g = np.asarray(cost, dtype=np.float64)
    b = np.asarray(budgets, dtype=np.float64)
    n, m = d.shape
    if n == 0:
        return np.zeros((0, m))
    scale = float(g.mean()) or 1.0
    var = np.arange(n * m).reshape(n, m)
    # One row per query (sum_i x_ij <= 1), then one per finite-budget model.
    q_rows = sparse.csr_matrix((np.ones(n * m), (np.repeat(np.arange(n), m), var.ravel())), shape=(n, n * m))
    finite = np.flatnonzero(np.isfinite(b))
    b_rows = sparse.csr_matrix(
        ((g[:, finite] / scale).T.ravel(), (np.repeat(np.arange(len(finite)), n), var[:, finite].T.ravel())),
        shape=(len(finite), n * m),
    )
    a_ub = sparse.vstack([q_rows, b_rows]).tocsr()
    b_ub = np.concatenate([np.ones(n), b[finite] / scale])
    res = linprog(-d.ravel(), A_ub=a_ub, b_ub=b_ub, bounds=(0.0, 1.0), method="highs")
    if res.status != 0:
        raise RuntimeError(f"allocation LP failed: {res.message}")
    return res.x.reshape(n, m)


def round_allocation(x: np.ndarray, min_mass: float = 1e-6) -> np.ndarray:
    """Model index per query (argmax of its row), -1 where the LP serves it not at all."""
    choice = np.argmax(x, axis=1)
    return np.where(x.max(axis=1) > min_mass, choice, -1)
