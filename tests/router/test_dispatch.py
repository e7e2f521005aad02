"""filter -> score -> pick: the dispatch rules with live state given as plain functions."""

from __future__ import annotations

import math

from router_service.proxy.dispatch import Need, choose, choose_pinned, token_need
from router_service.proxy.load import LoadVerdict
from router_service.routing.policy import Candidate

OK = LoadVerdict(available=True, saturated=False, reason=None, pressure=0.1)
FULL = LoadVerdict(available=True, saturated=True, reason="in_flight", pressure=1.0)
ZERO = LoadVerdict(available=False, saturated=True, reason="unavailable", pressure=math.inf)

RANKING = [
    Candidate("large", 3.0, 0.9, 100),
    Candidate("medium", 2.0, 0.7, 80),
    Candidate("small", 1.0, 0.5, 60),
]


def run(verdicts: dict[str, LoadVerdict] | None = None, budgets: dict[str, int] | None = None, **kw):
    verdicts = verdicts or {}
    budgets = budgets or {}
    return choose(
        RANKING,
        verdict=lambda m: verdicts.get(m, OK),
        can_afford=lambda m, t: budgets.get(m, 10**9) >= t,
        tokens=lambda c: int(c.est_tokens),
        **kw,
    )


def test_best_ranked_model_is_routed() -> None:
    d = run()
    assert (d.model, d.route, d.skipped, d.refusal) == ("large", "routed", (), None)
    assert d.degraded_reason is None


def test_saturated_model_degrades_to_next_best() -> None:
    d = run({"large": FULL})
    assert (d.model, d.route) == ("medium", "degraded")
    assert d.skipped == (("large", "saturated"),)
    assert d.degraded_reason == "saturated"


def test_budget_and_zero_replicas_are_skipped_with_reasons() -> None:
    d = run({"large": ZERO}, {"medium": 79})
    assert (d.model, d.route) == ("small", "degraded")
    assert d.skipped == (("large", "unavailable"), ("medium", "budget"))


def test_refusal_kinds() -> None:
    assert run({m: FULL for m in ("large", "medium", "small")}).refusal.kind == "shed"
    assert run(budgets={"large": 0, "medium": 0, "small": 0}).refusal.kind == "budget"
    assert run({m: ZERO for m in ("large", "medium", "small")}).refusal.kind == "unavailable"
    # Saturation anywhere makes it a shed (429, retry soon) rather than a budget refusal.
    mixed = run({"large": FULL}, {"medium": 0, "small": 0})
    assert mixed.refusal.kind == "shed"
    assert "large: saturated" in mixed.refusal.message and "small: budget" in mixed.refusal.message


def test_shed_mode_refuses_instead_of_degrading_but_passes_zero_replicas() -> None:
    assert run({"large": FULL}, mode="shed").refusal.kind == "shed"
    d = run({"large": ZERO}, mode="shed")
    assert (d.model, d.route) == ("medium", "degraded")


def test_reject_and_fallback() -> None:
    assert run(reject=True).refusal.kind == "rejected"
    d = run({"large": ZERO}, fallback=True, reject=True)
    assert (d.model, d.route) == ("medium", "fallback")
    assert run({m: ZERO for m in ("large", "medium", "small")}, fallback=True).refusal.kind == "unavailable"


def test_open_circuit_is_skipped_with_its_own_reason_and_refused_as_unavailable() -> None:
    broken = LoadVerdict(available=False, saturated=True, reason="circuit_open", pressure=math.inf)
    d = run({"large": broken})
    assert d.model == "medium" and d.skipped == (("large", "circuit_open"),) and d.route == "degraded"
    d = run({"large": broken, "medium": broken, "small": ZERO})
    assert d.refusal is not None and d.refusal.kind == "unavailable" and "failing" in d.refusal.message
    pinned = choose_pinned("large", verdict=broken, can_afford=True)
    assert pinned.refusal is not None and "circuit open" in pinned.refusal.message


def test_pinned_decisions() -> None:
    assert choose_pinned("small", verdict=OK, can_afford=True).route == "pinned"
    assert choose_pinned("small", verdict=ZERO, can_afford=True).refusal.kind == "unavailable"
    assert choose_pinned("small", verdict=FULL, can_afford=True).refusal.kind == "shed"
    assert choose_pinned("small", verdict=OK, can_afford=False).refusal.kind == "budget"


def need(**kw: object) -> Need:
    args: dict = {
        "prompt_bound": 20,
        "sequences": 1,
        "max_tokens": None,
        "budget": 5000.0,
        "remaining": 5000.0,
        "max_model_len": None,
        "max_request_fraction": 0.1,
        "min_completion_tokens": 16,
    }
    return token_need(**{**args, **kw})


def test_token_need_reserves_the_worst_case_of_every_sequence() -> None:
    assert need(max_tokens=50) == Need(70)  # the prompt once, the client's max_tokens per sequence
    assert need(max_tokens=50, sequences=8) == Need(20 + 8 * 50)
    # n: 128 is not one answer: 6,420 tokens at worst, more than the 5,000 budget: lowered to fit.
    assert need(max_tokens=50, sequences=128) == Need(20 + 128 * 38, ceiling=38)
    # No sequence outgrows the context window: never more than sequences x maxModelLen.
    big = {"budget": 10**6, "remaining": 10**6}
    assert need(max_tokens=10_000, sequences=2, max_model_len=4096, **big) == Need(2 * 4096)
    assert need(max_tokens=0, prompt_bound=0) == Need(1)
    # The budget left cannot pay max_tokens: the router lowers it to what it can pay, down to
    # minCompletionTokens per sequence (a shorter answer instead of a refusal at a window's end).
    assert need(max_tokens=50, sequences=8, remaining=300) == Need(20 + 8 * 35, ceiling=35)
    assert need(max_tokens=50, sequences=8, remaining=100) == Need(20 + 8 * 16, ceiling=16)  # > 100


def test_token_need_sets_a_ceiling_without_max_tokens_and_fits_it_to_the_budget_left() -> None:
    # A tenth of the budget per request at most: the worst case is known, so it can be reserved.
    assert need() == Need(20 + 500, ceiling=500)
    assert need(sequences=2) == Need(20 + 2 * 500, ceiling=500)
    assert need(max_model_len=220) == Need(20 + 200, ceiling=200)  # the window leaves 200
    # The budget left pays less than the ceiling: the ceiling shrinks to what it pays ...
    assert need(remaining=120) == Need(120, ceiling=100)
    # ... but not below minCompletionTokens: then the need exceeds what is left (wait or refuse).
    assert need(remaining=30) == Need(20 + 16, ceiling=16)
    # A prompt bound that fills the window: only the window bounds the request, no ceiling set.
    assert need(prompt_bound=5000, max_model_len=4096) == Need(4096)
    # No budget on the model: nothing to protect, no ceiling.
    assert need(budget=math.inf, remaining=math.inf).ceiling is None
