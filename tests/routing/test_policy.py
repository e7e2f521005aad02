import numpy as np

from router_service.routing.policy import Candidate, pick, rank, scores


def test_scores_and_rank_best_first():
    q = np.array([0.9, 0.6, 0.6])
    g = np.array([10.0, 1.0, 2.0])
    gamma = np.array([0.05, 0.1, 0.0])
    np.testing.assert_allclose(scores(q, g, gamma, 1.0), [0.4, 0.5, 0.6])
    ranking = rank(["a", "b", "c"], q, g, gamma, 1.0)
    assert [c.model for c in ranking] == ["c", "b", "a"]
    assert ranking[0] == Candidate("c", 0.6, 0.6, 2.0)


def test_rank_ties_prefer_quality_then_listed_order():
    ranking = rank(["a", "b", "c"], np.array([0.5, 0.7, 0.7]), np.zeros(3), np.zeros(3), 1.0)
    assert [c.model for c in ranking] == ["b", "c", "a"]


RANKING = [Candidate("big", 0.9, 0.9, 100), Candidate("mid", 0.7, 0.8, 50), Candidate("small", 0.5, 0.6, 10)]


def test_pick_routed_when_best_is_fine():
    choice = pick(RANKING)
    assert (choice.model, choice.reason, choice.skipped) == ("big", "routed", ())


def test_pick_falls_back_over_budget():
    choice = pick(RANKING, can_afford=lambda c: c.est_tokens <= 60)
    assert (choice.model, choice.reason) == ("mid", "over-budget")
    assert choice.skipped == (("big", "over-budget"),)


def test_pick_degrades_when_saturated():
    choice = pick(RANKING, has_room=lambda c: c.model != "big")
    assert (choice.model, choice.reason) == ("mid", "degraded")


def test_pick_none_and_reject():
    nothing = pick(RANKING, can_afford=lambda c: False)
    assert nothing.model is None and nothing.reason == "none" and nothing.budget_exhausted
    saturated = pick(RANKING, has_room=lambda c: False)
    assert saturated.model is None and not saturated.budget_exhausted
    assert pick(RANKING, reject_below=0.95).reason == "rejected"
    assert pick(RANKING, reject_below=0.9).reason == "routed"
    assert pick([]).reason == "none"
