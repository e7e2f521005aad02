"""filter -> score -> pick: the dispatch rules with live state given as plain functions."""

from __future__ import annotations

import math

from router_service.proxy.dispatch import choose, choose_pinned, reservation_tokens
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
    d = run(exclude={"large"}, fallback=True, reject=True)
    assert (d.model, d.route) == ("medium", "fallback")
    assert run(exclude={"large", "medium", "small"}, fallback=True).refusal.kind == "unavailable"


def test_pinned_decisions() -> None:
    assert choose_pinned("small", verdict=OK, can_afford=True).route == "pinned"
    assert choose_pinned("small", verdict=ZERO, can_afford=True).refusal.kind == "unavailable"
    assert choose_pinned("small", verdict=FULL, can_afford=True).refusal.kind == "shed"
    assert choose_pinned("small", verdict=OK, can_afford=False).refusal.kind == "budget"


def test_reservation_tokens() -> None:
    assert reservation_tokens(300.0, prompt_tokens=20, max_tokens=50) == 70  # capped by the request
    assert reservation_tokens(60.4, prompt_tokens=20, max_tokens=None) == 60
    assert reservation_tokens(0.0, prompt_tokens=20, max_tokens=None) == 276  # default answer length
    assert reservation_tokens(0.0, prompt_tokens=0, max_tokens=0) == 1
