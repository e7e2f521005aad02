"""The neighbour estimator's variants: weighting, shrinkage, leave-one-out, choosing k."""

import numpy as np
import pytest
from pydantic import ValidationError

from router_service.config import AnnSettings, EstimatorSettings, RouterConfig
from router_service.routing.ann import NeighbourIndex
from router_service.routing.estimator import NeighbourEstimator, choose_k_by_leave_one_out


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def angle_vectors(degrees: list[float]) -> np.ndarray:
    """Unit vectors in the plane at these angles: cos(a - b) is their similarity."""
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_similarity_weighting_counts_near_neighbours_more():
    vecs = angle_vectors([0, 60])  # similarities to the query at 0 degrees: 1.0 and 0.5
    scores = np.array([[1.0], [0.0]])
    costs = np.array([[10.0], [30.0]])
    uniform = NeighbourEstimator(
        NeighbourIndex.build(vecs), scores, costs, 2, EstimatorSettings(weighting="uniform")
    )
    kernel = NeighbourEstimator(
        NeighbourIndex.build(vecs),
        scores,
        costs,
        2,
        EstimatorSettings(weighting="similarity", temperature=0.25),
    )
    q = angle_vectors([0])[0]
    d_u, g_u = uniform.estimate_one(q)
    assert d_u == pytest.approx([0.5]) and g_u == pytest.approx([20.0])
    w_far = np.exp(-(1 - 0.5) / 0.25)  # the near neighbour weighs exp(0) = 1
    d_k, g_k = kernel.estimate_one(q)
    assert d_k == pytest.approx([1 / (1 + w_far)], rel=1e-5)
    assert g_k == pytest.approx([(10 + 30 * w_far) / (1 + w_far)], rel=1e-5)


def test_shrinkage_pulls_far_neighbourhoods_to_the_prior_and_leaves_near_ones():
    # Two entries near 0 degrees (score 1), eight far away near 180 degrees (score 0).
    vecs = angle_vectors([0, 2, 178, 179, 180, 181, 182, 183, 184, 185])
    scores = np.array([[1.0]] * 2 + [[0.0]] * 8)
    costs = np.ones_like(scores)
    settings = EstimatorSettings(weighting="similarity", temperature=0.05, shrinkage=1.0, prior="global")
    est = NeighbourEstimator(NeighbourIndex.build(vecs), scores, costs, 2, settings)
    near, _ = est.estimate_one(angle_vectors([1])[0])
    assert near[0] > 0.6  # two near neighbours weigh ~2 against one pseudo-neighbour at 0.2
    far, _ = est.estimate_one(angle_vectors([90])[0])  # the nearest entries are 88 degrees away
    assert far[0] == pytest.approx(0.2, abs=1e-3)  # nothing near: the global mean
    hood = NeighbourEstimator(
        NeighbourIndex.build(vecs),
        scores,
        costs,
        2,
        settings.model_copy(update={"prior": "neighbourhood", "prior_k": 4}),
    )
    assert hood.search_k == 4
    far_hood, _ = hood.estimate_one(angle_vectors([90])[0])
    assert far_hood[0] == pytest.approx(0.5, abs=1e-3)  # the 4 nearest: 2 ones and 2 zeros


def test_an_added_entry_is_used_by_the_next_query_with_every_setting():
    vecs = angle_vectors([0, 90, 180])
    scores = np.array([[0.0], [0.0], [0.0]])
    for settings in (
        EstimatorSettings(weighting="uniform"),
        EstimatorSettings(),
        EstimatorSettings(shrinkage=0.5, prior="global"),
        EstimatorSettings(shrinkage=0.5, prior_k=3),
    ):
        est = NeighbourEstimator(NeighbourIndex.build(vecs), scores, np.ones_like(scores), 1, settings)
        q = angle_vectors([45])[0]
        before, _ = est.estimate_one(q)
        est.add(q[None, :], np.array([[1.0]]), np.array([[1.0]]))
        after, _ = est.estimate_one(q)
        assert after[0] > before[0] + 0.3, settings


def test_leave_one_out_drops_each_querys_own_row_also_for_a_sample_of_rows():
    rng = np.random.default_rng(0)
    vecs = unit(rng.normal(size=(300, 16)))
    est = NeighbourEstimator(NeighbourIndex.build(vecs), np.zeros((300, 2)), np.zeros((300, 2)), k=5)
    rows = np.array([7, 150, 299])  # not 0..2: the rows searched are a sample
    ids, sims = est.neighbours(vecs[rows], exclude=rows)
    assert ids.shape == sims.shape == (3, 5)
    for row, hits in zip(rows, ids, strict=True):
        assert row not in hits
    plain, _ = est.neighbours(vecs[rows])
    assert (plain[:, 0] == rows).all()  # without exclusion every row finds itself first
    np.testing.assert_array_equal(ids[:, :4], plain[:, 1:5])
    with pytest.raises(ValueError, match="exclude"):
        est.neighbours(vecs[rows], exclude=rows[:2])


def test_choose_k_prefers_few_neighbours_for_sharp_structure_and_many_for_noise():
    rng = np.random.default_rng(1)
    angles = np.sort(rng.uniform(0, 360, 1200))
    vecs = angle_vectors(list(angles))
    # Sharp: the score flips every 6 degrees (about 20 entries), so only near neighbours agree.
    sharp = ((angles // 6) % 2)[:, None].astype(float)
    est = NeighbourEstimator(
        NeighbourIndex.build(vecs), sharp, np.ones_like(sharp), 200, EstimatorSettings(weighting="uniform")
    )
    k, errors = choose_k_by_leave_one_out(est, vecs)
    assert k <= 10 and set(errors) == {5, 10, 20, 50, 100, 200}
    # Noise: coin flips with p=0.3 everywhere: the more neighbours, the better the mean.
    noise = (rng.random((1200, 1)) < 0.3).astype(float)
    est = NeighbourEstimator(
        NeighbourIndex.build(vecs), noise, np.ones_like(noise), 200, EstimatorSettings(weighting="uniform")
    )
    k, _ = choose_k_by_leave_one_out(est, vecs)
    assert k >= 100
    capped = NeighbourEstimator(
        NeighbourIndex.build(vecs), noise, np.ones_like(noise), 20, EstimatorSettings(weighting="uniform")
    )
    assert choose_k_by_leave_one_out(capped, vecs)[0] <= 20  # ann.k is the ceiling


def test_hnsw_returns_good_neighbours_when_k_exceeds_ef_search():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(30, 32)))
    data = unit(centres[rng.integers(0, 30, 4000)] + 0.1 * rng.normal(size=(4000, 32)))
    exact = NeighbourIndex.build(data, AnnSettings(exact_below=10**6))
    hnsw = NeighbourIndex.build(data, AnnSettings(exact_below=100, hnsw_m=8, ef_search=8))
    q = data[:40]
    ids_e, _ = exact.search(q, 64)
    ids_h, _ = hnsw.search(q, 64)
    recall = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(ids_e, ids_h, strict=True)])
    assert recall > 0.9


def test_estimator_settings_are_validated_and_reach_the_router_config():
    with pytest.raises(ValidationError):
        EstimatorSettings(temperature=0)
    with pytest.raises(ValidationError):
        EstimatorSettings(shrinkage=-1)
    with pytest.raises(ValidationError):
        EstimatorSettings.model_validate({"weighting": "median"})
    cfg = RouterConfig.model_validate(
        {
            "backends": [{"name": "a", "url": "http://a", "profile": "a"}],
            "estimator": {"weighting": "uniform", "shrinkage": 2, "priorK": 64, "chooseK": True},
        }
    )
    assert (cfg.estimator.weighting, cfg.estimator.shrinkage, cfg.estimator.prior_k) == ("uniform", 2, 64)
    assert cfg.estimator.choose_k
    defaults = RouterConfig.model_validate({"backends": [{"name": "a", "url": "http://a", "profile": "a"}]})
    assert (defaults.embedding.kind, defaults.embedding.dimensions, defaults.ann.k) == ("hashed", 256, 50)
    assert (defaults.estimator.weighting, defaults.estimator.shrinkage) == ("uniform", 0.0)
