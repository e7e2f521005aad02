"""Steps 5 and 7 of the request path, reserve and settle: what one upstream attempt holds.

`Attempt.reserve` takes a budget reservation for the request's worst case (`dispatch.Need`) and an
in-flight slot on the endpoint (the replica) that will answer; `settle` ends the attempt once with the true usage
(charged to the ledger, counted in the metrics), with none reported (the worst case reserved is
charged: the router never charges less than it cannot rule out), or with nothing consumed (the
reservation released); `abandon` undoes an attempt that failed before the client saw a byte, so
the caller may retry elsewhere. Every path ends exactly once, tells the endpoint's circuit breaker
how the endpoint did, and wakes requests waiting for budget (`Runtime.budget_changed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router_service.config import Price
from router_service.proxy import openai_errors as errors
from router_service.proxy.breaker import Outcome as Health
from router_service.proxy.upstream import Backend, Usage
from router_service.routing.ledger import Reservation

if TYPE_CHECKING:
    from router_service.proxy.state import Runtime


@dataclass
class Attempt:
    rt: Runtime
    model: str
    endpoint: str
    route: str
    reservation: Reservation
    price: Price
    span: Any = None  # an OpenTelemetry span, ended with the attempt
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False

    @classmethod
    def reserve(
        cls, rt: Runtime, backend: Backend, endpoint: str, route: str, tokens: int, retry_after: int
    ) -> Attempt:
        """Hold `tokens` of the model's budget and one in-flight slot on `endpoint`, its replica."""
        model = backend.name
        reservation = rt.ledger.reserve(model, tokens)
        if reservation is None:  # the decision checked it; nothing awaited in between
            raise errors.budget_exhausted(f"The token budget of model {model!r} is spent.", retry_after)
        rt.load.acquire(model, endpoint)
        rt.breakers.get(endpoint).begin()
        return cls(rt, model, endpoint, route, reservation, backend.config.price)

    def settle(
        self, usage: Usage | None, outcome: str, health: Health = "success", *, consumed: bool = True
    ) -> None:
        """End the attempt: charge `usage` (None: none was reported, so the reserved worst case is
        charged; `consumed=False`: nothing was used, the reservation is released), count it, and
        tell the breaker how the endpoint did."""
        if self.ended:
            return
        self.ended = True
        rt, model = self.rt, self.model
        rt.load.release(model, self.endpoint)
        rt.breakers.record(self.endpoint, health)
        if not consumed:
            rt.ledger.release(self.reservation)
        elif usage is None:
            rt.ledger.settle(self.reservation, self.reservation.amount)
        else:
            rt.ledger.settle(self.reservation, usage.total)
            rt.metrics.child(rt.metrics.tokens, model, "prompt").inc(usage.prompt_tokens)
            rt.metrics.child(rt.metrics.tokens, model, "completion").inc(usage.completion_tokens)
            rt.metrics.child(rt.metrics.cost, model).inc(
                self.price.usd(usage.prompt_tokens, usage.completion_tokens)
            )
        rt.budget_changed()
        rt.metrics.child(rt.metrics.upstream_seconds, model, "total").observe(
            time.perf_counter() - self.started
        )
        rt.metrics.child(rt.metrics.requests, model, self.route or "none", outcome).inc()
        if self.span is not None:
            self.span.set_attribute("tollway.outcome", outcome)
            if usage is not None:
                self.span.set_attribute("tollway.tokens", usage.total)
            self.span.end()

    def abandon(self, kind: str, health: Health = "failure") -> None:
        """The attempt failed before the client saw a byte: undo it; the caller may retry."""
        if self.ended:
            return
        self.ended = True
        self.rt.load.release(self.model, self.endpoint)
        self.rt.breakers.record(self.endpoint, health)
        self.rt.ledger.release(self.reservation)
        self.rt.budget_changed()
        if self.span is not None:
            self.span.set_attribute("tollway.outcome", f"failed:{kind}")
            self.span.end()

    def first_byte(self) -> None:
        self.rt.metrics.child(self.rt.metrics.upstream_seconds, self.model, "first_byte").observe(
            time.perf_counter() - self.started
        )
