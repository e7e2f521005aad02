"""Quality and cost estimates for a query from its nearest history neighbours.

For a query with neighbours n = 1..k (cosine similarities s_n), model i's estimate is

    d_hat_i = (sum_n w_n d_ni + lambda mu_i) / (sum_n w_n + lambda)

with w_n = 1 (``uniform``, PORT's plain mean) or w_n = exp(-(1 - s_n) / T) (``similarity``), and
the optional shrinkage (lambda > 0) toward a prior mean mu_i: over the query's ``prior_k`` nearest
entries (``neighbourhood``) or over the whole history (``global``). The cost estimate g_hat_i is
the same combination of the neighbours' costs. `cost` is whatever unit the caller routes in: USD
in the offline evaluation, completion tokens in the online router (which adds the prompt's own
tokens, known exactly).

Nothing is fitted: every estimate is computed from the neighbours found at query time, so a
history entry added through `add` counts for the next query. `choose_k_by_leave_one_out` picks k
from a few candidates by how well each estimates held-out history entries (the ``chooseK``
setting); it reads the history, it fits no model.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from router_service.config import EstimatorSettings
from router_service.routing.ann import NeighbourIndex

K_CANDIDATES: tuple[int, ...] = (5, 10, 20, 50, 100, 200)
LOO_SAMPLE = 2000


def neighbour_weights(sims: np.ndarray, valid: np.ndarray, settings: EstimatorSettings) -> np.ndarray:
    """Weight per neighbour [q, k]: 1 or the similarity kernel, 0 where the id is missing."""
    if settings.weighting == "uniform":
        w = np.ones(sims.shape, dtype=np.float64)
    else:
        w = np.exp(-(1.0 - np.minimum(sims.astype(np.float64), 1.0)) / settings.temperature)
    return np.where(valid, w, 0.0)


def combine(
    values: np.ndarray,
    sims: np.ndarray,
    valid: np.ndarray,
    k: int,
    settings: EstimatorSettings,
    global_mean: np.ndarray,
) -> np.ndarray:
    """Estimates [q, m] from neighbour values [q, K, m] (K >= k, best first), similarities and
    validity [q, K]. The first k neighbours vote; the first prior_k form the neighbourhood prior."""
    w = neighbour_weights(sims[:, :k], valid[:, :k], settings)
    num = np.einsum("qk,qkm->qm", w, values[:, :k])
    den = w.sum(axis=1)[:, None]
    lam = settings.shrinkage
    if lam > 0:
        if settings.prior == "global":
            mu = np.broadcast_to(global_mean, num.shape)
        else:
            pk = min(settings.prior_k, values.shape[1])
            pv = valid[:, :pk, None].astype(np.float64)
            count = pv.sum(axis=1)
            mu = np.where(count > 0, (values[:, :pk] * pv).sum(axis=1) / np.maximum(count, 1.0), global_mean)
        return (num + lam * mu) / (den + lam)
    # A query without a single neighbour (empty index) falls back to the history's mean.
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), global_mean)


class NeighbourEstimator:
    """Index + per-entry score/cost matrices -> (d_hat, g_hat) per query."""

    def __init__(
        self,
        index: NeighbourIndex,
        scores: np.ndarray,
        costs: np.ndarray,
        k: int = 5,
        settings: EstimatorSettings | None = None,
    ) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        costs = np.asarray(costs, dtype=np.float64)
        if scores.shape != costs.shape or scores.ndim != 2:
            raise ValueError(
                f"scores and costs must be [n, models] of one shape: {scores.shape}, {costs.shape}"
            )
        if len(index) != len(scores):
            raise ValueError(f"index has {len(index)} entries, the matrices {len(scores)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.index = index
        self.k = int(k)
        self.settings = settings or EstimatorSettings(weighting="uniform")
        # Row buffers with spare capacity so that online growth appends in O(1) amortised.
        self._n = len(scores)
        self._scores_buf = scores.copy()
        self._costs_buf = costs.copy()
        self._score_sum = scores.sum(axis=0)
        self._cost_sum = costs.sum(axis=0)
        self._lock = threading.Lock()

    @property
    def _scores(self) -> np.ndarray:
        return self._scores_buf[: self._n]

    @property
    def _costs(self) -> np.ndarray:
        return self._costs_buf[: self._n]

    def __len__(self) -> int:
        return self._n

    @property
    def n_models(self) -> int:
        return self._scores_buf.shape[1]

    @property
    def search_k(self) -> int:
        """Neighbours fetched per query: k, or prior_k when a neighbourhood prior needs more."""
        s = self.settings
        if s.shrinkage > 0 and s.prior == "neighbourhood":
            return max(self.k, s.prior_k)
        return self.k

    def neighbours(
        self, vectors: np.ndarray, exclude: np.ndarray | None = None, count: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour ids and similarities [q, count] (default: search_k), best first. `exclude`
        (leave-one-out): each query's own history row, dropped from its hits."""
        kk = self.search_k if count is None else int(count)
        if exclude is None:
            return self.index.search(vectors, kk)
        exclude = np.asarray(exclude).reshape(-1, 1)
        if len(exclude) != len(np.atleast_2d(vectors)):
            raise ValueError(f"exclude has {len(exclude)} rows for {len(np.atleast_2d(vectors))} queries")
        ids, sims = self.index.search(vectors, kk + 1)
        # The first kk hits per row that are not the row itself (rows without a self-hit drop the last).
        order = np.argsort(ids == exclude, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)

    def estimate_ids(
        self, ids: np.ndarray, sims: np.ndarray, k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Estimates from neighbour ids and similarities [q, K] (-1 ids ignored) -> d_hat, g_hat [q, m]."""
        ids, sims = np.atleast_2d(ids), np.atleast_2d(sims)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        with self._lock:
            s, c = self._scores[safe], self._costs[safe]
            n = max(self._n, 1)
            mean_s, mean_c = self._score_sum / n, self._cost_sum / n
        kk = self.k if k is None else k
        return (
            combine(s, sims, valid, kk, self.settings, mean_s),
            combine(c, sims, valid, kk, self.settings, mean_c),
        )

    def scores_of(self, rows: np.ndarray) -> np.ndarray:
        """The stored quality rows [len(rows), m] of history entries."""
        with self._lock:
            return self._scores[np.asarray(rows)].copy()

    def estimate(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch: vectors [q, dim] -> d_hat [q, m], g_hat [q, m]."""
        return self.estimate_ids(*self.neighbours(vectors))

    def estimate_one(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query: vector [dim] -> d_hat [m], g_hat [m]."""
        d, g = self.estimate(vector.reshape(1, -1))
        return d[0], g[0]

    def add(self, vectors: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> None:
        """Grow the history (online learning from feedback)."""
        vectors = np.atleast_2d(vectors)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(vectors), self.n_models)
        costs = np.asarray(costs, dtype=np.float64).reshape(len(vectors), self.n_models)
        with self._lock:
            # Rows first: a concurrent search never sees an id without its row.
            need = self._n + len(vectors)
            if need > len(self._scores_buf):
                cap = max(need, 2 * len(self._scores_buf), 64)
                for name in ("_scores_buf", "_costs_buf"):
                    old = getattr(self, name)
                    grown = np.zeros((cap, old.shape[1]), dtype=np.float64)
                    grown[: self._n] = old[: self._n]
                    setattr(self, name, grown)
            self._scores_buf[self._n : need] = scores
            self._costs_buf[self._n : need] = costs
            self._score_sum = self._score_sum + scores.sum(axis=0)
            self._cost_sum = self._cost_sum + costs.sum(axis=0)
            self._n = need
            self.index.add(vectors)


def choose_k_by_leave_one_out(
    estimator: NeighbourEstimator,
    vectors: np.ndarray,
    candidates: Sequence[int] | None = None,
    *,
    sample: int = LOO_SAMPLE,
    seed: int = 0,
) -> tuple[int, dict[int, float]]:
    """The candidate k whose leave-one-out quality estimates have the least squared error over
    (a sample of) the history entries, and the error per candidate. `vectors` are the history
    entries' own embeddings, in index order; `candidates` default to `K_CANDIDATES` up to the
    estimator's current k (its ceiling)."""
    if candidates is None:
        candidates = [c for c in K_CANDIDATES if c <= estimator.k] or [estimator.k]
    ks = sorted({int(k) for k in candidates if 1 <= k < len(estimator)})
    if not ks:
        return estimator.k, {}
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(n, sample)])
    ids, sims = estimator.neighbours(vectors[rows], exclude=rows, count=max(max(ks), estimator.search_k))
    truth = estimator.scores_of(rows)
    errors: dict[int, float] = {}
    for k in ks:
        d, _ = estimator.estimate_ids(ids, sims, k=k)
        errors[k] = float(np.mean((d - truth) ** 2))
    return min(errors, key=errors.__getitem__), errors
