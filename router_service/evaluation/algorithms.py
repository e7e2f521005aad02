"""Routing algorithms replayed over one order of the stream.

Every algorithm sees the stream in the given order and per-model hard budgets held by a
`BudgetLedger`. A query is *served* when its chosen model's remaining budget pays the query's true
cost (then the true score counts as performance); otherwise it is dropped (PORT's accounting).

- ``port``: PORT as published: the first ceil(eps x N) queries are learning queries, each routed
  uniformly at random over the M models or dropped (M + 1 choices); gamma is then fitted once
  (exact LP by default; ``port-lbfgsb`` uses the reference code's L-BFGS-B) and every later
  query goes to argmax_i (alpha d_hat_i - gamma_i g_hat_i), served or dropped.
- ``tollway``: the online engine's logic: prices from the history prior, re-fitted on the
  observed queries against the remaining budget every ``refit_every`` queries; budget-aware
  admission (`policy.pick` with "remaining budget >= estimated cost") falls back to the next-best
  model; no learning-phase drops.
- ``greedy-perf``: the model with the highest estimated quality (ties broken at random).
- ``greedy-cost``: the model with the lowest estimated cost.
- ``knn-perf``: a kNN classifier: each of the query's k history neighbours votes for every model
  that scored best on it; most votes wins (ties at random).
- ``random``: a uniformly random model.
- ``approx-optimum`` / ``optimum``: the offline LP (on estimates / on true values) rounded to one
  model per query, then replayed in order against the budgets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from router_service.evaluation.offline import round_allocation, solve_allocation
from router_service.evaluation.scenario import Scenario
from router_service.routing.duals import DualController, FitMethod
from router_service.routing.ledger import BudgetLedger
from router_service.routing.policy import Candidate, pick, rank


@dataclass
class TollwayOptions:
    refit_every: int = 50
    reject_below: float | None = 0.0
    method: FitMethod = "lp"
    warmup_fraction: float = 0.025


@dataclass
class OrderResult:
    performance: float = 0.0
    cost: float = 0.0
    served: int = 0
    dropped: int = 0
    per_model: dict[str, int] = field(default_factory=dict)


class _Replay:
    """Budgets + tallies for one order."""

    def __init__(self, scn: Scenario) -> None:
        self.scn = scn
        self.ledger = BudgetLedger.from_amounts(dict(zip(scn.models, scn.budgets, strict=True)))
        self.result = OrderResult(per_model={m: 0 for m in scn.models})

    def serve(self, j: int, i: int | None) -> bool:
        if i is None or i < 0:
            self.result.dropped += 1
            return False
        model = self.scn.models[i]
        true_cost = float(self.scn.true_cost[j, i])
        if self.ledger.remaining(model) < true_cost:
            self.result.dropped += 1
            return False
        self.ledger.charge(model, true_cost)
        r = self.result
        r.performance += float(self.scn.true_quality[j, i])
        r.cost += true_cost
        r.served += 1
        r.per_model[model] += 1
        return True

    def remaining(self) -> np.ndarray:
        return np.array([self.ledger.remaining(m) for m in self.scn.models])


def _fixed(choice: np.ndarray) -> Callable[[Scenario, np.ndarray, np.random.Generator], OrderResult]:
    def run(scn: Scenario, order: np.ndarray, rng: np.random.Generator) -> OrderResult:
        replay = _Replay(scn)
        for j in order:
            replay.serve(int(j), int(choice[j]))
        return replay.result

    return run


def run_random(scn: Scenario, order: np.ndarray, rng: np.random.Generator) -> OrderResult:
    return _fixed(rng.integers(0, len(scn.models), size=scn.n))(scn, order, rng)


def _random_argmax(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row-wise argmax with ties broken uniformly at random (cost-blind baselines must not
    inherit a cost preference from the column order)."""
    noise = rng.random(values.shape)
    best = values >= values.max(axis=1, keepdims=True) - 1e-12
    return np.argmax(np.where(best, noise, -1.0), axis=1)


def greedy_perf_choice(scn: Scenario, rng: np.random.Generator) -> np.ndarray:
    return _random_argmax(scn.est_quality, rng)


def greedy_cost_choice(scn: Scenario) -> np.ndarray:
    return np.argmin(scn.est_cost, axis=1)


def knn_perf_choice(scn: Scenario, rng: np.random.Generator) -> np.ndarray:
    """Each neighbour votes for every model that scored best on it; most votes wins."""
    hq = scn.history_quality
    best = hq >= hq.max(axis=1, keepdims=True) - 1e-12
    ids = scn.neighbour_ids
    votes = np.where((ids >= 0)[..., None], best[np.where(ids >= 0, ids, 0)], False).sum(axis=1)
    return _random_argmax(votes.astype(np.float64), rng)


def lp_choice(scn: Scenario, *, on_estimates: bool) -> np.ndarray:
    d, g = (scn.est_quality, scn.est_cost) if on_estimates else (scn.true_quality, scn.true_cost)
    return round_allocation(solve_allocation(d, g, scn.budgets))


def run_port(
    scn: Scenario,
    order: np.ndarray,
    rng: np.random.Generator,
    *,
    method: FitMethod = "lp",
    eps: float = 0.025,
) -> OrderResult:
    replay = _Replay(scn)
    m = len(scn.models)
    ctl = DualController(
        scn.models, scn.alpha, algorithm="port", expected_queries=scn.n, warmup_fraction=eps, method=method
    )
    for j in order:
        j = int(j)
        if ctl.phase == "warmup":
            pick_i = int(rng.integers(0, m + 1))  # M models or "drop"
            replay.serve(j, pick_i if pick_i < m else None)
            if ctl.observe(scn.est_quality[j], scn.est_cost[j]):
                ctl.fit(replay.remaining(), full_budgets=scn.budgets)
            continue
        s = scn.alpha * scn.est_quality[j] - ctl.gamma * scn.est_cost[j]
        replay.serve(j, int(np.argmax(s)))
    return replay.result


def run_tollway(
    scn: Scenario, order: np.ndarray, rng: np.random.Generator, *, options: TollwayOptions | None = None
) -> OrderResult:
    opts = options or TollwayOptions()
    replay = _Replay(scn)
    ctl = DualController(
        scn.models,
        scn.alpha,
        algorithm="tollway",
        expected_queries=scn.n,
        warmup_fraction=opts.warmup_fraction,
        refit_every=opts.refit_every,
        method=opts.method,
        prior_quality=scn.prior_quality,
        prior_cost=scn.prior_cost,
    )
    ctl.fit_prior(scn.budgets)
    ledger = replay.ledger

    def can_afford(c: Candidate) -> bool:
        return ledger.remaining(c.model) >= c.est_tokens

    index = {name: i for i, name in enumerate(scn.models)}
    for j in order:
        j = int(j)
        d, g = scn.est_quality[j], scn.est_cost[j]
        choice = pick(
            rank(scn.models, d, g, ctl.gamma, scn.alpha), can_afford, reject_below=opts.reject_below
        )
        replay.serve(j, None if choice.model is None else index[choice.model])
        if ctl.observe(d, g):
            ctl.fit(replay.remaining())
    return replay.result


Runner = Callable[[Scenario, np.ndarray, np.random.Generator], OrderResult]

ALGORITHMS: tuple[str, ...] = (
    "port",
    "port-lbfgsb",
    "tollway",
    "greedy-perf",
    "greedy-cost",
    "knn-perf",
    "random",
    "approx-optimum",
    "optimum",
)
DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "port",
    "tollway",
    "greedy-perf",
    "greedy-cost",
    "knn-perf",
    "random",
    "approx-optimum",
    "optimum",
)


def make_runner(name: str, scn: Scenario, tollway: TollwayOptions | None = None) -> Runner:
    """The replay function for one algorithm (order-independent work done once, here)."""
    eps = (tollway or TollwayOptions()).warmup_fraction
    if name == "port":
        return lambda s, o, r: run_port(s, o, r, method="lp", eps=eps)
    if name == "port-lbfgsb":
        return lambda s, o, r: run_port(s, o, r, method="lbfgsb", eps=eps)
    if name == "tollway":
        return lambda s, o, r: run_tollway(s, o, r, options=tollway)
    if name == "random":
        return run_random
    if name == "greedy-perf":
        return lambda s, o, r: _fixed(greedy_perf_choice(s, r))(s, o, r)
    if name == "greedy-cost":
        return _fixed(greedy_cost_choice(scn))
    if name == "knn-perf":
        return lambda s, o, r: _fixed(knn_perf_choice(s, r))(s, o, r)
    if name == "approx-optimum":
        return _fixed(lp_choice(scn, on_estimates=True))
    if name == "optimum":
        return _fixed(lp_choice(scn, on_estimates=False))
    raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
