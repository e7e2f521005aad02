"""Dual prices against a tiny LP solved by hand.

Model A: quality [1.0, 0.9, 0.6], cost 1 per query, budget 1.5 for the sample.
Model B: quality 0.5 everywhere, cost 1, budget 10 (never binding).
F(gA, 0) = 1.5 gA + sum_j max(dA_j - gA, 0.5) has slopes -1.5, -0.5, +0.5, +1.5 with breakpoints
0.1, 0.4, 0.5, so the unique minimiser is gA = 0.4 with F = 0.6 + 0.6 + 0.5 + 0.5 = 2.2, which is
the primal optimum too (A serves q1 and half of q2: 1.0 + 0.45 + 0.25 + 0.5 = 2.2).
"""

import math

import numpy as np
import pytest

from router_service.evaluation.offline import round_allocation, solve_allocation
from router_service.routing.duals import DualController, dual_objective, fit_duals

D = np.array([[1.0, 0.5], [0.9, 0.5], [0.6, 0.5]])
G = np.ones((3, 2))
B = np.array([1.5, 10.0])


@pytest.mark.parametrize("reject", [True, False])
def test_lp_fit_matches_hand_solution(reject):
    gamma = fit_duals(D, G, B, alpha=1.0, reject=reject, upper=1.0)
    np.testing.assert_allclose(gamma, [0.4, 0.0], atol=1e-7)
    assert dual_objective(gamma, D, G, B, 1.0, reject) == pytest.approx(2.2)


def test_primal_lp_has_the_same_value():
    x = solve_allocation(D, G, B)
    assert (D * x).sum() == pytest.approx(2.2)
    assert round_allocation(x).tolist() == [0, 0, 1]


def test_fit_is_invariant_to_cost_units_and_alpha():
    # Costs in "USD" (1e-3 per query), alpha 1e-4: gamma scales by alpha / unit.
    gamma = fit_duals(D, G * 1e-3, B * 1e-3, alpha=1e-4)
    np.testing.assert_allclose(gamma, [0.4 * 1e-4 / 1e-3, 0.0], rtol=1e-6)


def test_infinite_budget_means_free_and_lbfgsb_is_no_better_than_lp():
    b = np.array([1.5, math.inf])
    lp = fit_duals(D, G, b, alpha=1.0)
    assert lp[1] == 0.0 and lp[0] == pytest.approx(0.4)
    lb = fit_duals(D, G, b, alpha=1.0, method="lbfgsb", reject=False, upper=1.0)
    assert dual_objective(lp, D, G, b, 1.0, False) <= dual_objective(lb, D, G, b, 1.0, False) + 1e-9


def test_routing_rule_with_fitted_prices_reproduces_the_allocation():
    gamma = fit_duals(D, G, B, alpha=1.0)
    scores = D - gamma * G
    # q1 strictly prefers A, q3 strictly prefers B; q2 is the fractional (tied) query.
    assert np.argmax(scores[0]) == 0 and np.argmax(scores[2]) == 1
    assert scores[1, 0] == pytest.approx(scores[1, 1])


def test_unbounded_variant_is_refused():
    with pytest.raises(ValueError, match="upper bound"):
        fit_duals(D, G, B, alpha=1.0, reject=False, upper=None)


def test_controller_schedule_port_and_tollway():
    port = DualController(["a", "b"], 1.0, algorithm="port", expected_queries=100, warmup_fraction=0.03)
    assert port.warmup_queries == 3
    due = [port.observe(D[i % 3], G[i % 3]) for i in range(10)]
    assert due == [False, False, True] + [False] * 7  # PORT fits once
    assert port.phase == "warmup"  # not fitted yet
    port.fit(B, full_budgets=B / 0.03)  # port uses full x eps = B
    assert port.phase == "routed"
    np.testing.assert_allclose(port.gamma, [0.4, 0.0], atol=1e-7)

    tw = DualController(
        ["a", "b"], 1.0, algorithm="tollway", expected_queries=100, warmup_fraction=0.03, refit_every=4,
        prior_quality=D, prior_cost=G, min_sample=3,
    )  # fmt: skip
    tw.fit_prior(B * 100 / 3)  # the prior sample (3 rows) gets 3/100 of the window budget = B
    np.testing.assert_allclose(tw.gamma, [0.4, 0.0], atol=1e-7)
    due = [tw.observe(D[i % 3], G[i % 3]) for i in range(11)]
    assert [i + 1 for i, d in enumerate(due) if d] == [3, 7, 11]
    # Re-fit on the remaining budget spread over the remaining queries: with plenty left, A is free.
    tw.fit(np.array([1000.0, 1000.0]), remaining_queries=10)
    np.testing.assert_allclose(tw.gamma, [0.0, 0.0], atol=1e-9)
