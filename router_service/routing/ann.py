"""Nearest-neighbour search over the history's embeddings (cosine = inner product of unit vectors).

Below ``exact_below`` entries the search is exact (faiss IndexFlatIP: brute force in optimised
BLAS); from there on an HNSW graph (faiss IndexHNSWFlat, inner-product metric). The index only
ever holds history entries; live queries are searched, never inserted (online growth from
feedback inserts *history* entries through `add`).
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from router_service.config import AnnSettings

SMALL_BATCH = 4


class NeighbourIndex:
    """k-NN over unit vectors; `search` returns (ids [q, k], similarities [q, k])."""

    def __init__(self, dim: int, settings: AnnSettings | None = None) -> None:
        self.dim = int(dim)
        self.settings = settings or AnnSettings()
        self._lock = threading.Lock()
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._index: faiss.Index = faiss.IndexFlatIP(self.dim)
        self.kind = "exact"

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, settings: AnnSettings | None = None) -> NeighbourIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, dim], got shape {vectors.shape}")
        index = cls(vectors.shape[1], settings)
        index.add(vectors)
        return index

    def _hnsw(self) -> faiss.Index:
        s = self.settings
        hnsw = faiss.IndexHNSWFlat(self.dim, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = s.ef_construction
        hnsw.hnsw.efSearch = s.ef_search
        return hnsw

    def add(self, vectors: np.ndarray) -> None:
        """Append entries (ids continue from len(self)); switches to HNSW past `exact_below`."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {self.dim}")
        with self._lock:
            total = len(self) + len(vectors)
            if self.kind == "exact" and total >= max(self.settings.exact_below, 1):
                self._vectors = np.vstack([self._vectors, vectors])
                hnsw = self._hnsw()
                hnsw.add(self._vectors)
                self._index = hnsw
                self.kind = "hnsw"
                self._vectors = np.zeros((0, self.dim), dtype=np.float32)  # HNSW keeps its own copy
                return
            if self.kind == "exact":
                self._vectors = np.vstack([self._vectors, vectors])
            self._index.add(vectors)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar entries per query row; ids are -1 where the index has fewer."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        # HNSW keeps a candidate list of efSearch entries; asking for more neighbours than that
        # needs a longer list, or the tail of the k hits is poor.
        params = None
        if self.kind == "hnsw" and k > self.settings.ef_search:
            params = faiss.SearchParametersHNSW(efSearch=int(k))
        with self._lock:
            if len(queries) <= SMALL_BATCH:
                # One query gains nothing from OpenMP threads, and their wake-up/spin costs dominate
                # the tail latency on a busy host: search it on the calling thread.
                threads = faiss.omp_get_max_threads()
                faiss.omp_set_num_threads(1)
                try:
                    sims, ids = self._index.search(queries, k, params=params)
                finally:
                    faiss.omp_set_num_threads(threads)
            else:
                sims, ids = self._index.search(queries, k, params=params)
        return ids, sims
