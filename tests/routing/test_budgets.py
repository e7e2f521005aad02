import numpy as np
import pytest

from router_service.routing.budgets import cheapest_total, split_budget, split_weights, total_budget


def test_total_is_multiplier_times_cheapest_models_total():
    costs = np.array([[1.0, 3.0], [2.0, 1.0], [4.0, 1.0]])  # totals 7 and 5
    assert cheapest_total(costs) == 5.0
    assert total_budget(costs, 0.5) == 2.5


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("uniform", [0.5, 0.5]),
        ("perf", [0.8 / 1.2, 0.4 / 1.2]),
        ("cost", [np.sqrt(1 / 4) / (np.sqrt(1 / 4) + 1), 1 / (np.sqrt(1 / 4) + 1)]),
        (
            "weighted",
            [np.sqrt(0.2) / (np.sqrt(0.2) + np.sqrt(0.4)), np.sqrt(0.4) / (np.sqrt(0.2) + np.sqrt(0.4))],
        ),
    ],
)
def test_split_strategies(strategy, expected):
    perf, cost = np.array([0.8, 0.4]), np.array([4.0, 1.0])
    np.testing.assert_allclose(split_weights(perf, cost, strategy), expected)
    np.testing.assert_allclose(split_budget(10.0, perf, cost, strategy), 10 * np.array(expected))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown split strategy"):
        split_weights(np.ones(2), np.ones(2), "extreme")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean_cost"):
        split_weights(np.ones(2), np.array([1.0, 0.0]), "weighted")
    with pytest.raises(ValueError, match="multiplier"):
        total_budget(np.ones((2, 2)), 0)
