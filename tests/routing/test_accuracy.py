import numpy as np
import pytest
from scipy.stats import spearmanr

from router_service.evaluation.accuracy import estimate_accuracy


def test_accuracy_metrics_on_a_hand_made_stream():
    models = ["a", "b", "c"]
    truth = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    est = np.array([[0.9, 0.2, 0.2], [0.8, 0.1, 0.6], [0.5, 0.5, 0.5]])
    cost, est_cost = np.full((3, 3), 2.0), np.full((3, 3), 3.0)
    acc = estimate_accuracy(models, est, truth, est_cost, cost)
    err = np.abs(est - truth)
    assert acc.mae == pytest.approx(err.mean())
    assert acc.mae_per_model == pytest.approx(dict(zip(models, err.mean(axis=0), strict=True)))
    assert acc.brier == pytest.approx(((est - truth) ** 2).mean())
    # Query 0: a is best and estimated best; query 1: estimated best a scored 0; query 2: all tie.
    assert acc.top1_agreement == pytest.approx(2 / 3)
    # Spearman over queries 0 and 1 only (query 2's truth is constant): 1 and -sqrt(3)/2.
    assert spearmanr(est[0], truth[0])[0] == pytest.approx(1.0)
    assert acc.rank_correlation == pytest.approx((1.0 + spearmanr(est[1], truth[1])[0]) / 2)
    assert acc.rank_correlation == pytest.approx((1 - np.sqrt(3) / 2) / 2)
    assert acc.cost_error == pytest.approx(0.5)
    with pytest.raises(ValueError):
        estimate_accuracy(models, est[:, :2], truth, est_cost, cost)
