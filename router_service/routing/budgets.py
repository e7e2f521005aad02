"""Per-model budgets: the total from a multiplier, and how it is split across models.

PORT's experimental budget is ``multiplier x`` what serving the whole stream with the single
cheapest model would cost, split across models by a weight per model computed from the models'
mean quality and mean cost (on the history):

- ``weighted``: sqrt(mean perf / mean cost)  (the paper's main setting)
- ``uniform``: equal shares
- ``cost``: sqrt(1 / mean cost)
- ``perf``: mean perf
"""

from __future__ import annotations

from typing import Literal

import numpy as np

SplitStrategy = Literal["weighted", "uniform", "cost", "perf"]
SPLIT_STRATEGIES: tuple[str, ...] = ("weighted", "uniform", "cost", "perf")


def cheapest_total(costs: np.ndarray) -> float:
    """Cost of sending every query [n, m] to the model whose total is lowest."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 2 or costs.shape[0] == 0:
        raise ValueError(f"costs must be a non-empty [queries, models] matrix, got shape {costs.shape}")
    return float(costs.sum(axis=0).min())


def total_budget(costs: np.ndarray, multiplier: float) -> float:
    """multiplier x cheapest_total(costs)."""
    if multiplier <= 0:
        raise ValueError(f"budget multiplier must be > 0, got {multiplier}")
    return multiplier * cheapest_total(costs)


def split_weights(mean_perf: np.ndarray, mean_cost: np.ndarray, strategy: SplitStrategy) -> np.ndarray:
    """Normalised weights (sum 1) per model for a split strategy."""
    perf = np.asarray(mean_perf, dtype=np.float64)
    cost = np.asarray(mean_cost, dtype=np.float64)
    if perf.shape != cost.shape or perf.ndim != 1 or perf.size == 0:
        raise ValueError("mean_perf and mean_cost must be 1-d arrays of the same non-zero length")
    if np.any(cost <= 0):
        raise ValueError("mean_cost must be > 0 for every model")
    if strategy == "weighted":
        w = np.sqrt(np.clip(perf, 0, None) / cost)
    elif strategy == "uniform":
        w = np.ones_like(perf)
    elif strategy == "cost":
        w = np.sqrt(1.0 / cost)
    elif strategy == "perf":
        w = np.clip(perf, 0, None)
    else:
        raise ValueError(f"unknown split strategy {strategy!r}; choose one of {', '.join(SPLIT_STRATEGIES)}")
    if w.sum() <= 0:
        raise ValueError(f"split {strategy!r}: all weights are zero")
    return w / w.sum()


def split_budget(
    total: float, mean_perf: np.ndarray, mean_cost: np.ndarray, strategy: SplitStrategy = "weighted"
) -> np.ndarray:
    """Per-model budgets summing to `total`."""
    if total < 0:
        raise ValueError(f"total budget must be >= 0, got {total}")
    return total * split_weights(mean_perf, mean_cost, strategy)
