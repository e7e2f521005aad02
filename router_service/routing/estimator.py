"""Quality and cost estimates for a query from its nearest history neighbours (PORT's estimator).

d_hat_i and g_hat_i are the unweighted means of model i's score and cost over the k nearest
history entries. `cost` is whatever unit the caller routes in: USD in the offline evaluation,
tokens in the online router.
"""

from __future__ import annotations

import threading

import numpy as np

from router_service.routing.ann import NeighbourIndex


class NeighbourEstimator:
    """Index + per-entry score/cost matrices -> (d_hat, g_hat) per query."""

    def __init__(self, index: NeighbourIndex, scores: np.ndarray, costs: np.ndarray, k: int = 5) -> None:
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
        # Row buffers with spare capacity so that online growth appends in O(1) amortised.
        self._n = len(scores)
        self._scores_buf = scores.copy()
        self._costs_buf = costs.copy()
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

    def neighbours(self, vectors: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """Neighbour ids [q, k]. With `exclude_self` (leave-one-out on history rows searched with
        their own vectors) the first hit equal to the query's row is dropped."""
        if not exclude_self:
            ids, _ = self.index.search(vectors, self.k)
            return ids
        ids, _ = self.index.search(vectors, self.k + 1)
        rows = np.arange(len(ids))[:, None]
        keep = ids != rows
        # Keep the first k hits that are not the query itself.
        out = np.empty((len(ids), self.k), dtype=ids.dtype)
        for i in range(len(ids)):
            out[i] = ids[i][keep[i]][: self.k]
        return out

    def estimate_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means over neighbour ids [q, k] (-1 entries ignored) -> d_hat [q, m], g_hat [q, m]."""
        ids = np.atleast_2d(ids)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        with self._lock:
            s = self._scores[safe]
            c = self._costs[safe]
        w = valid[..., None].astype(np.float64)
        count = np.maximum(w.sum(axis=1), 1.0)
        return (s * w).sum(axis=1) / count, (c * w).sum(axis=1) / count

    def estimate(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch: vectors [q, dim] -> d_hat [q, m], g_hat [q, m]."""
        return self.estimate_ids(self.neighbours(vectors))

    def estimate_one(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query: vector [dim] -> d_hat [m], g_hat [m]."""
        ids, _ = self.index.search(vector.reshape(1, -1), self.k)
        row = ids[0]
        row = row[row >= 0]
        with self._lock:
            if len(row) == 0:
                return self._scores.mean(axis=0), self._costs.mean(axis=0)
            return self._scores[row].mean(axis=0), self._costs[row].mean(axis=0)

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
            self._n = need
            self.index.add(vectors)
