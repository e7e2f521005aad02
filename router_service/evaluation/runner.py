"""Replay every algorithm over the same random orders and aggregate the metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from router_service.evaluation.algorithms import OrderResult, TollwayOptions, make_runner
from router_service.evaluation.scenario import Scenario


@dataclass
class AlgorithmSummary:
    performance: float
    cost: float
    served: float
    dropped: float
    performance_per_cost: float
    relative_performance: float | None
    """Performance / Approx-Optimum's (the LP on the same estimates): how well the policy uses them."""
    performance_std: float
    of_optimum: float | None = None
    """Performance / Optimum's (the LP on true values, the oracle): the quality served per budget."""

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def make_orders(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(count)]


def evaluate(
    scn: Scenario,
    algorithms: Sequence[str],
    orders: Sequence[np.ndarray],
    *,
    seed: int = 0,
    tollway: TollwayOptions | None = None,
    on_order: Callable[[], None] | None = None,
) -> dict[str, AlgorithmSummary]:
    """Mean metrics per algorithm over `orders` (every algorithm sees the same orders)."""
    runners = {name: make_runner(name, scn, tollway) for name in algorithms}
    results: dict[str, list[OrderResult]] = {name: [] for name in algorithms}
    for o, order in enumerate(orders):
        for a, (name, run) in enumerate(runners.items()):
            rng = np.random.default_rng([seed, o, a])
            results[name].append(run(scn, order, rng))
        if on_order is not None:
            on_order()
    return summarise(results)


def summarise(results: dict[str, list[OrderResult]]) -> dict[str, AlgorithmSummary]:
    means: dict[str, dict[str, float]] = {}
    for name, rs in results.items():
        perf = np.array([r.performance for r in rs])
        means[name] = {
            "performance": float(perf.mean()),
            "performance_std": float(perf.std()),
            "cost": float(np.mean([r.cost for r in rs])),
            "served": float(np.mean([r.served for r in rs])),
            "dropped": float(np.mean([r.dropped for r in rs])),
        }
    ref = means.get("approx-optimum", {}).get("performance")
    oracle = means.get("optimum", {}).get("performance")
    out = {}
    for name, mm in means.items():
        out[name] = AlgorithmSummary(
            performance=mm["performance"],
            cost=mm["cost"],
            served=mm["served"],
            dropped=mm["dropped"],
            performance_per_cost=mm["performance"] / mm["cost"] if mm["cost"] > 0 else 0.0,
            relative_performance=(mm["performance"] / ref) if ref else None,
            performance_std=mm["performance_std"],
            of_optimum=(mm["performance"] / oracle) if oracle else None,
        )
    return out
