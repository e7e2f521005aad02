"""How good the estimates themselves are, against the stream's true per-query values.

- ``mae``: mean absolute error of d_hat (quality) over queries and models, and ``mae_per_model``.
  With 0/1 scores the absolute error rewards sharp guesses (its minimiser is the median), while
  routing by expected quality needs the probability, so ``brier`` (mean squared error, minimised
  by the calibrated probability) is reported next to it.
- ``top1_agreement``: share of queries where the model with the highest d_hat reached the query's
  best true score (the rank agreement with the true best model).
- ``rank_correlation``: mean Spearman correlation between d_hat and the true scores per query,
  over queries whose true scores differ between models.
- ``cost_error``: mean relative error |g_hat - g| / g of the cost estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class EstimateAccuracy:
    mae: float
    mae_per_model: dict[str, float]
    brier: float
    top1_agreement: float
    rank_correlation: float
    cost_error: float

    def to_json(self) -> dict:
        return asdict(self)


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per row (average ranks for ties); NaN where a row is constant."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def estimate_accuracy(
    models: list[str],
    est_quality: np.ndarray,
    true_quality: np.ndarray,
    est_cost: np.ndarray,
    true_cost: np.ndarray,
) -> EstimateAccuracy:
    d_hat, d = np.asarray(est_quality, dtype=np.float64), np.asarray(true_quality, dtype=np.float64)
    if d_hat.shape != d.shape or d.ndim != 2 or d.shape[1] != len(models):
        raise ValueError(f"estimates {d_hat.shape} and truth {d.shape} must be [queries, {len(models)}]")
    err = np.abs(d_hat - d)
    picked = d[np.arange(len(d)), np.argmax(d_hat, axis=1)]
    top1 = float(np.mean(picked >= d.max(axis=1) - 1e-12)) if len(d) else float("nan")
    informative = d.max(axis=1) > d.min(axis=1)
    rho = _row_spearman(d_hat[informative], d[informative])
    g_hat, g = np.asarray(est_cost, dtype=np.float64), np.asarray(true_cost, dtype=np.float64)
    rel = np.abs(g_hat - g) / np.where(g > 0, g, np.nan)
    return EstimateAccuracy(
        mae=float(err.mean()),
        mae_per_model={m: float(e) for m, e in zip(models, err.mean(axis=0), strict=True)},
        brier=float(((d_hat - d) ** 2).mean()),
        top1_agreement=top1,
        rank_correlation=float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
        cost_error=float(np.nanmean(rel)) if np.isfinite(rel).any() else float("nan"),
    )
