"""Which model and replica serve a request: filter -> score -> pick, and why.

The scoring is the engine's (a `Ranking` best-first); the picking is `policy.pick` with two
filters built from the router's live state: the budget ledger (can the model pay the request's
worst case, `token_need`?) and the model's health and load, which is its best replica's (some
replica's circuit closed and not saturated for this priority? see `picker.py`, which also names
the replica that serves). This module turns the outcome into what the HTTP layer needs: a model,
a replica and a route label for the response headers, or a refusal (shed / budget / unavailable /
rejected) with the reason spelled out.

Everything here is pure: the live state comes in as callables, so each rule is testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from router_service.proxy.load import CIRCUIT_OPEN, LoadVerdict
from router_service.routing.policy import Candidate, pick

Route = Literal["routed", "degraded", "fallback", "pinned"]
SkipReason = Literal["budget", "saturated", "unavailable", "circuit_open"]
RefusalKind = Literal["shed", "budget", "unavailable", "rejected"]


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKind
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes (model and endpoint set) or why it is refused (refusal set)."""

    model: str | None
    candidate: Candidate | None
    route: Route | None
    skipped: tuple[tuple[str, SkipReason], ...]
    refusal: Refusal | None = None
    endpoint: str | None = None  # the model's replica that serves

    @property
    def degraded_reason(self) -> SkipReason | None:
        """Why the best-ranked model was passed over (None when it serves)."""
        return self.skipped[0][1] if self.skipped and self.model is not None else None


@dataclass(frozen=True, slots=True)
class Need:
    """What admission holds for one request on one model: the request's worst case in tokens, and
    the max_tokens the router sets upstream to make that worst case true (None: the client's own)."""

    tokens: int
    ceiling: int | None = None


def token_need(
    *,
    prompt_bound: int,
    sequences: int,
    max_tokens: int | None,
    budget: float,
    remaining: float,
    max_model_len: int | None,
    max_request_fraction: float,
    min_completion_tokens: int,
) -> Need:
    """The most tokens a request can cost on a model, which is what admission reserves.

    A request costs its prompt (at most `prompt_bound`, counted once, as vLLM reports it) plus up to
    `max_tokens` per generated sequence; and no sequence outgrows the context window, so never more
    than `sequences x max_model_len`. Reserving this worst case means a model's spend never exceeds
    its budget (as long as the backend honours max_tokens; what it overdraws anyway is charged and
    repaid, see `routing/ledger.py`).

    Without `max_tokens` the worst case is the context window, often more than a small budget: on a
    model with a budget the router sets a ceiling itself, at most `max_request_fraction` of the
    budget (and what the window leaves after the prompt). When the budget left cannot pay the
    ceiling (or the client's own max_tokens), the ceiling shrinks to what it can pay, down to
    `min_completion_tokens` per sequence, so the end of a window's budget is spent on shorter
    answers rather than refused. A model without a budget gets no ceiling.
    """
    sequences = max(1, sequences)
    window_cap = sequences * max_model_len if max_model_len is not None else math.inf
    if not math.isfinite(budget):
        completion = max_tokens if max_tokens is not None else (max_model_len or 0)
        return Need(max(1, int(min(prompt_bound + sequences * completion, window_cap))))
    room = (max_model_len - prompt_bound) if max_model_len is not None else math.inf
    if max_tokens is not None:
        wanted = max_tokens
    elif room < 1:  # the prompt bound fills the window: only the window bounds the request
        return Need(max(1, int(window_cap)))
    else:
        wanted = int(min(max(1.0, max_request_fraction * budget), room))
    affordable = math.floor((remaining - prompt_bound) / sequences)
    ceiling = wanted
    if affordable < wanted:
        ceiling = max(min(wanted, min_completion_tokens), affordable)
    tokens = max(1, int(min(prompt_bound + sequences * ceiling, window_cap)))
    if max_tokens is not None and ceiling >= max_tokens:
        return Need(tokens)  # the client's own limit stands
    return Need(tokens, ceiling)


def _refusal(skipped: Sequence[tuple[str, SkipReason]], what: str) -> Refusal:
    reasons = {why for _, why in skipped}
    detail = ", ".join(f"{m}: {why}" for m, why in skipped)
    if "saturated" in reasons:
        return Refusal("shed", f"All models that could serve {what} are saturated ({detail}); retry later.")
    if "budget" in reasons:
        return Refusal(
            "budget", f"The token budget of every model that could serve {what} is spent ({detail})."
        )
    if reasons <= {"unavailable", "circuit_open"} and "circuit_open" in reasons:
        return Refusal(
            "unavailable",
            f"Every model that could serve {what} is failing or has no replicas right now ({detail}); "
            "retry later.",
        )
    if reasons == {"unavailable"}:
        return Refusal("unavailable", f"No model that could serve {what} has replicas right now ({detail}).")
    return Refusal("unavailable", f"No model can serve {what}.")


def _skip_reason(verdict: LoadVerdict) -> SkipReason:
    if verdict.reason == CIRCUIT_OPEN:
        return "circuit_open"
    return "unavailable" if not verdict.available else "saturated"


def choose(
    ranking: Sequence[Candidate],
    *,
    verdict: Callable[[str], LoadVerdict],
    can_afford: Callable[[str, int], bool],
    tokens: Callable[[Candidate], int],
    mode: Literal["degrade", "shed"] = "degrade",
    reject: bool = False,
    fallback: bool = False,
    what: str = "this request",
) -> Decision:
    """Pick the best-ranked model that has budget and room.

    `reject` is the engine's verdict that even the best score is below `objective.rejectBelow`
    (it never rejects priority critical): the request is refused with no model tried.

    `fallback` marks a retry after an upstream failure (the route is then "fallback"); the replicas
    already tried are left out by the caller's `verdict`. In mode "shed" a saturated better-ranked
    model means 429 at once instead of degrading; a model with no replicas is passed over in either
    mode (it cannot queue work).
    """
    if not ranking:
        return Decision(None, None, None, (), Refusal("unavailable", f"No other model can serve {what}."))
    verdicts: dict[str, LoadVerdict] = {}

    def has_room(c: Candidate) -> bool:
        v = verdicts[c.model] = verdict(c.model)
        return v.can_serve

    if reject and not fallback:
        best = ranking[0]
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
    choice = pick(ranking, can_afford=lambda c: can_afford(c.model, tokens(c)), has_room=has_room)
    skipped: list[tuple[str, SkipReason]] = []
    for model, why in choice.skipped:
        if why == "over-budget":
            skipped.append((model, "budget"))
        else:
            skipped.append((model, _skip_reason(verdicts[model])))
    if choice.model is None:
        return Decision(None, None, None, tuple(skipped), _refusal(skipped, what))
    if mode == "shed" and any(why == "saturated" for _, why in skipped):
        return Decision(
            None, None, None, tuple(skipped), _refusal([s for s in skipped if s[1] == "saturated"], what)
        )
    route: Route = "fallback" if fallback else ("routed" if not skipped else "degraded")
    return Decision(
        choice.model, choice.candidate, route, tuple(skipped), endpoint=verdicts[choice.model].endpoint
    )


def choose_pinned(
    model: str,
    *,
    verdict: LoadVerdict,
    can_afford: bool,
    what: str = "this request",
) -> Decision:
    """A request that names a concrete model: it goes there or is refused, never elsewhere."""
    if verdict.reason == CIRCUIT_OPEN:
        return Decision(
            None,
            None,
            None,
            ((model, "circuit_open"),),
            Refusal("unavailable", f"Model {model!r} is failing (circuit open); retry later."),
        )
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
    return Decision(model, None, "pinned", (), endpoint=verdict.endpoint)
