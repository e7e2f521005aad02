"""One evaluation setting: history, stream, estimates for every stream query, budgets.

Everything order-independent is computed once here (embeddings, neighbour estimates, the prior
sample for tollway's initial prices, the offline LPs), so replaying many orders is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from router_service.config import AnnSettings, EstimatorSettings
from router_service.routing.ann import NeighbourIndex
from router_service.routing.budgets import SplitStrategy, split_budget, total_budget
from router_service.routing.embedding import Embedder, EmbeddingCache, fit_to_history
from router_service.routing.estimator import NeighbourEstimator, choose_k_by_leave_one_out
from router_service.routing.history import History

PRIOR_SAMPLE = 2000


@dataclass
class Scenario:
    models: list[str]
    true_quality: np.ndarray
    """[n, m] the stream's true scores."""
    true_cost: np.ndarray
    """[n, m] the stream's true costs (USD)."""
    est_quality: np.ndarray
    est_cost: np.ndarray
    neighbour_ids: np.ndarray
    """[n, k] each stream query's k nearest history entries."""
    history_quality: np.ndarray
    history_cost: np.ndarray
    prior_quality: np.ndarray
    """Leave-one-out estimates for a sample of history queries (tollway's prior)."""
    prior_cost: np.ndarray
    mean_perf: np.ndarray
    mean_cost: np.ndarray
    alpha: float = 1e-4
    k: int = 5
    """Neighbours per estimate (chosen by leave-one-out when the estimator settings say so)."""
    multiplier: float = 1.0
    split: SplitStrategy = "weighted"
    budgets: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n(self) -> int:
        return len(self.true_quality)

    def with_budget(self, multiplier: float, split: SplitStrategy | None = None) -> Scenario:
        """The same scenario under another budget (PORT's: multiplier x cheapest model's total)."""
        split = split or self.split
        total = total_budget(self.true_cost, multiplier)
        budgets = split_budget(total, self.mean_perf, self.mean_cost, split)
        return Scenario(**{**self.__dict__, "multiplier": multiplier, "split": split, "budgets": budgets})


def build_scenario(
    history: History,
    stream: History,
    embedder: Embedder,
    *,
    k: int | None = None,
    estimator: EstimatorSettings | None = None,
    multiplier: float = 1.0,
    split: SplitStrategy = "weighted",
    alpha: float = 1e-4,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
) -> Scenario:
    if history.models != stream.models:
        stream = stream.columns(history.models)
    if len(history) == 0 or len(stream) == 0:
        raise ValueError(f"need a non-empty history and stream (got {len(history)} and {len(stream)} rows)")
    cache = cache or EmbeddingCache()
    embedder = fit_to_history(embedder, history.prompts)
    hv = cache.embed(embedder, history.prompts)
    sv = cache.embed(embedder, stream.prompts)
    k = AnnSettings().k if k is None else k
    settings = estimator or EstimatorSettings()
    index = NeighbourIndex.build(hv, AnnSettings(k=k))
    est = NeighbourEstimator(index, history.scores, history.costs, k, settings)
    if settings.choose_k:
        est.k, _ = choose_k_by_leave_one_out(est, hv, seed=seed)
    ids, sims = est.neighbours(sv)
    d_hat, g_hat = est.estimate_ids(ids, sims)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(history))[: min(len(history), PRIOR_SAMPLE)])
    prior_d, prior_g = est.estimate_ids(*est.neighbours(hv[rows], exclude=rows))
    base = Scenario(
        models=list(history.models),
        true_quality=stream.scores,
        true_cost=stream.costs,
        est_quality=d_hat,
        est_cost=g_hat,
        neighbour_ids=ids[:, : est.k],
        history_quality=history.scores,
        history_cost=history.costs,
        prior_quality=prior_d,
        prior_cost=prior_g,
        mean_perf=history.scores.mean(axis=0),
        mean_cost=history.costs.mean(axis=0),
        alpha=alpha,
        k=est.k,
    )
    return base.with_budget(multiplier, split)
