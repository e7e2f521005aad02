"""Which backend serves a request: filter -> score -> pick, and why.

The scoring is the engine's (a `Ranking` best-first); the picking is `policy.pick` with two
filters built from the router's live state: the budget ledger (can the model pay the estimated
tokens?) and the load tracker (is it available and not saturated for this priority?). This module
turns the outcome into what the HTTP layer needs: a model and a route label for the response
headers, or a refusal (shed / budget / unavailable / rejected) with the reason spelled out.

Everything here is pure: the live state comes in as callables, so each rule is testable alone.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Literal

from router_service.proxy.load import LoadVerdict
from router_service.routing.policy import Candidate, pick

Route = Literal["routed", "degraded", "fallback", "pinned"]
SkipReason = Literal["budget", "saturated", "unavailable"]
RefusalKind = Literal["shed", "budget", "unavailable", "rejected"]


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKind
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes (model set) or why it is refused (refusal set)."""

    model: str | None
    candidate: Candidate | None
    route: Route | None
    skipped: tuple[tuple[str, SkipReason], ...]
    refusal: Refusal | None = None

    @property
    def degraded_reason(self) -> SkipReason | None:
        """Why the best-ranked model was passed over (None when it serves)."""
        return self.skipped[0][1] if self.skipped and self.model is not None else None


def reservation_tokens(estimate: float, prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens to hold at admission: the engine's estimate, capped by what the request allows.

    A request cannot use more than its prompt plus `max_tokens`; without an estimate the cap (or
    the prompt plus a default answer length) is held.
    """
    cap = prompt_tokens + max_tokens if max_tokens is not None else None
    est = estimate if estimate > 0 else float(prompt_tokens + (max_tokens if max_tokens is not None else 256))
    if cap is not None:
        est = min(est, float(cap))
    return max(1, round(est))


def _refusal(skipped: Sequence[tuple[str, SkipReason]], what: str) -> Refusal:
    reasons = {why for _, why in skipped}
    detail = ", ".join(f"{m}: {why}" for m, why in skipped)
    if "saturated" in reasons:
        return Refusal("shed", f"All models that could serve {what} are saturated ({detail}); retry later.")
    if "budget" in reasons:
        return Refusal(
            "budget", f"The token budget of every model that could serve {what} is spent ({detail})."
        )
    if reasons == {"unavailable"}:
        return Refusal("unavailable", f"No model that could serve {what} has replicas right now ({detail}).")
    return Refusal("unavailable", f"No model can serve {what}.")


def choose(
    ranking: Sequence[Candidate],
    *,
    verdict: Callable[[str], LoadVerdict],
    can_afford: Callable[[str, int], bool],
    tokens: Callable[[Candidate], int],
    mode: Literal["degrade", "shed"] = "degrade",
    reject: bool = False,
    exclude: Container[str] = (),
    fallback: bool = False,
    what: str = "this request",
) -> Decision:
    """Pick the best-ranked model that has budget and room.

    `reject` is the engine's verdict that even the best score is below `objective.rejectBelow`
    (it never rejects priority critical): the request is refused with no model tried.

    `exclude` drops models already tried (a retry after an upstream failure; the route is then
    "fallback"). In mode "shed" a saturated better-ranked model means 429 at once instead of
    degrading; a model with no replicas is passed over in either mode (it cannot queue work).
    """
    considered = [c for c in ranking if c.model not in exclude]
    if not considered:
        return Decision(None, None, None, (), Refusal("unavailable", f"No other model can serve {what}."))
    verdicts: dict[str, LoadVerdict] = {}

    def has_room(c: Candidate) -> bool:
        v = verdicts[c.model] = verdict(c.model)
        return v.can_serve

    if reject and not fallback:
        best = considered[0]
        return Decision(
            None,
            None,
            None,
            (),
            Refusal(
                "rejected",
                f"Not worth serving: the best routing score ({best.score:.4g}, {best.model}) is below "
                "objective.rejectBelow.",
            ),
        )
    choice = pick(considered, can_afford=lambda c: can_afford(c.model, tokens(c)), has_room=has_room)
    skipped: list[tuple[str, SkipReason]] = []
    for model, why in choice.skipped:
        if why == "over-budget":
            skipped.append((model, "budget"))
        else:
            skipped.append((model, "unavailable" if not verdicts[model].available else "saturated"))
    if choice.model is None:
        return Decision(None, None, None, tuple(skipped), _refusal(skipped, what))
    if mode == "shed" and any(why == "saturated" for _, why in skipped):
        return Decision(
            None, None, None, tuple(skipped), _refusal([s for s in skipped if s[1] == "saturated"], what)
        )
    route: Route = "fallback" if fallback else ("routed" if not skipped else "degraded")
    return Decision(choice.model, choice.candidate, route, tuple(skipped))


def choose_pinned(
    model: str,
    *,
    verdict: LoadVerdict,
    can_afford: bool,
    what: str = "this request",
) -> Decision:
    """A request that names a concrete model: it goes there or is refused, never elsewhere."""
    if not verdict.available:
        return Decision(
            None,
            None,
            None,
            ((model, "unavailable"),),
            Refusal(
                "unavailable",
                f"Model {model!r} has no replicas right now; it is being scaled up, retry later.",
            ),
        )
    if verdict.saturated:
        return Decision(
            None,
            None,
            None,
            ((model, "saturated"),),
            Refusal("shed", f"Model {model!r} is saturated ({verdict.reason}); retry later."),
        )
    if not can_afford:
        return Decision(
            None,
            None,
            None,
            ((model, "budget"),),
            Refusal("budget", f"The token budget of model {model!r} is spent for this window."),
        )
    return Decision(model, None, "pinned", ())
