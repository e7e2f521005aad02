"""Step 2 of the request path, estimate: every model that can serve the request, best first.

A routed chat or completions request asks the routing engine: the prompt's nearest neighbours in
the history give each model's quality d and cost g, scored alpha*d - gamma*g (`routing/engine.py`).
A routed embeddings request ranks the models that serve embeddings by input price. Models that do
not serve the request's capability are dropped here. Pinned requests skip this step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router_service.proxy.request import ParsedRequest
from router_service.proxy.upstream import Backend
from router_service.routing.policy import Candidate

Rank = Callable[[str, str], Awaitable[Any]]
"""The engine's ranking of a prompt for a priority (a `routing.engine.Ranking`)."""


@dataclass(frozen=True)
class Estimate:
    candidates: list[Candidate] = field(default_factory=list)  # best first
    phase: str | None = None  # the engine's phase ("warmup" / "routed"), for traces
    reject: bool = False  # even the best score is below objective.rejectBelow


def capable(candidates: list[Candidate], backends: Mapping[str, Backend], capability: str) -> list[Candidate]:
    """The candidates whose backend exists and serves `capability`, in their order."""
    return [c for c in candidates if c.model in backends and capability in backends[c.model].capabilities]


def embedding_candidates(backends: Mapping[str, Backend], prompt_tokens: int) -> list[Candidate]:
    """Models that serve embeddings, cheapest input first (an embedding has no quality to trade)."""
    able = sorted(
        (b for b in backends.values() if "embeddings" in b.capabilities),
        key=lambda b: b.config.price.input_per_million_tokens,
    )
    return [
        Candidate(
            model=b.name,
            score=-b.config.price.input_per_million_tokens,
            quality=0.0,
            est_tokens=prompt_tokens,
        )
        for b in able
    ]


async def estimate(
    rank: Rank,
    backends: Mapping[str, Backend],
    parsed: ParsedRequest,
    capability: str,
    priority: str,
    prompt_tokens: int,
) -> Estimate:
    if capability == "embeddings":
        return Estimate(embedding_candidates(backends, prompt_tokens))
    ranking = await rank(parsed.routing_text, priority)
    return Estimate(
        capable(list(ranking.candidates), backends, capability),
        phase=getattr(ranking, "phase", None),
        reject=bool(getattr(ranking, "reject", False)),
    )
