"""The request path, as small named steps (in the style of the Gateway API Inference Extension's
endpoint picker: filter -> score -> pick):

1. parse     `request.parse_request`: the body and the few fields the router relies on;
2. estimate  `estimate.estimate`: every model that can serve it, scored best first;
3. filter    `dispatch.choose`: drop models without budget for it or without room (load);
4. pick      `dispatch.choose`: the best that is left, or a refusal that says why;
5. reserve   `Attempt.reserve`: the estimated tokens from the budget, an in-flight slot;
6. forward   `forward.forward`: the request to the backend, the answer relayed to the client;
7. settle    `Attempt.settle`: the true usage charged, the slot freed, the outcome counted.

A failure before the client saw a byte is retried once on the next pick (steps 3-7 again, the
failed model excluded). `Proxy` only chains the steps and records what happened.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from opentelemetry import propagate, trace
from starlette.requests import Request
from starlette.responses import Response

from router_service.proxy import openai_errors as errors
from router_service.proxy.attempt import Attempt
from router_service.proxy.dispatch import Decision, choose, choose_pinned, reservation_tokens
from router_service.proxy.estimate import estimate
from router_service.proxy.forward import forward
from router_service.proxy.load import LoadVerdict
from router_service.proxy.request import (
    PATHS,
    PRIORITY_HEADER,
    ParsedRequest,
    parse_priority,
    parse_request,
    read_body,
)
from router_service.proxy.state import RouterState, Runtime, token_accepted
from router_service.proxy.upstream import UpstreamFailure, estimate_prompt_tokens
from router_service.routing.policy import Candidate

log = logging.getLogger("tollway.router")

MODEL_HEADER = "x-tollway-model"
ROUTE_HEADER = "x-tollway-route"
MAX_ATTEMPTS = 2  # the first choice plus one retry on the next-best model


def refusal_error(decision: Decision, retry_after: int, budget_retry_after: int) -> errors.ApiError:
    assert decision.refusal is not None
    kind, message = decision.refusal.kind, decision.refusal.message
    if kind == "shed" or kind == "rejected":
        return errors.shed(message, retry_after)
    if kind == "budget":
        return errors.budget_exhausted(message, budget_retry_after)
    return errors.unavailable(message, retry_after)


def failure_error(failure: UpstreamFailure, retry_after: int) -> errors.ApiError:
    if failure.kind == "timeout":
        return errors.upstream_timeout(f"Upstream timed out: {failure.message}")
    if failure.status == 429:
        return errors.shed(f"Upstream is overloaded: {failure.message}", retry_after)
    return errors.upstream_failed(f"Upstream failed: {failure.message}")


def route_headers(decision: Decision, request_id: str) -> dict[str, str]:
    """What the response tells the client about the route taken."""
    assert decision.model is not None
    headers = {MODEL_HEADER: decision.model, ROUTE_HEADER: decision.route or "", "x-request-id": request_id}
    if decision.route == "degraded" and decision.skipped:
        headers["x-tollway-degraded-from"] = ",".join(f"{m}={w}" for m, w in decision.skipped)
    return headers


@dataclass(frozen=True)
class Admitted:
    """One admitted request: what was parsed, for whom, and the state it is served under."""

    state: RouterState
    parsed: ParsedRequest
    capability: str
    priority: str
    prompt_tokens: int
    request_id: str

    @property
    def routed(self) -> bool:
        return self.parsed.model == self.state.config.served_model_name

    def tokens_for(self, candidate: Candidate | None) -> int:
        """Tokens to reserve for a pick (the engine's estimate, capped by the request's limit)."""
        est = candidate.est_tokens if candidate is not None else 0.0
        return reservation_tokens(est, self.prompt_tokens, self.parsed.max_tokens)


@dataclass
class Plan:
    """Steps 2-4 for one request: the pick (or refusal), and the estimate a retry picks from."""

    decision: Decision
    candidates: list[Candidate] = field(default_factory=list)  # empty when pinned
    phase: str | None = None
    seconds: float = 0.0


class Proxy:
    """Chains the steps for one router (its `Runtime`)."""

    def __init__(self, runtime: Runtime, tracer: trace.Tracer, tracing: bool) -> None:
        self.rt = runtime
        self.tracer = tracer
        self.tracing = tracing

    def authorize(self, request: Request, state: RouterState) -> None:
        if state.tokens is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or not token_accepted(state.tokens, token.strip()):
            raise errors.unauthorized()

    async def handle(self, request: Request, capability: str) -> Response:
        req = await self.admit(request, capability)  # 1. parse
        plan = await self.plan(req)  # 2-4. estimate -> filter -> pick
        self.record_plan(req, plan)
        return await self.serve(request, req, plan)  # 5-7. reserve -> forward -> settle

    # -- 1. parse --------------------------------------------------------------------------------

    async def admit(self, request: Request, capability: str) -> Admitted:
        rt = self.rt
        state = rt.state
        self.authorize(request, state)
        if not rt.ready:
            raise errors.not_ready("The router is starting or shutting down.")
        parsed = parse_request(await read_body(request, state.config.server.max_request_bytes), capability)
        return Admitted(
            state=state,
            parsed=parsed,
            capability=capability,
            priority=parse_priority(request.headers.get(PRIORITY_HEADER)),
            prompt_tokens=estimate_prompt_tokens(parsed.prompt_chars),
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
        )

    # -- 2-4. estimate -> filter -> pick --------------------------------------------------------

    def verdict(self, req: Admitted, model: str) -> LoadVerdict:
        return self.rt.load.verdict(model, req.priority)

    def pick(self, req: Admitted, candidates: list[Candidate], **options: object) -> Decision:
        """Steps 3-4: filter by budget and load, pick the best left."""
        return choose(
            candidates,
            verdict=functools.partial(self.verdict, req),
            can_afford=self.rt.ledger.can_afford,
            tokens=req.tokens_for,
            what=f"{req.capability} requests",
            **options,  # type: ignore[arg-type]
        )

    async def plan(self, req: Admitted) -> Plan:
        rt, state, parsed = self.rt, req.state, req.parsed
        started = time.perf_counter()
        if req.routed:
            est = await estimate(
                functools.partial(rt.rank, state),
                state.backends,
                parsed,
                req.capability,
                req.priority,
                req.prompt_tokens,
            )
            decision = self.pick(req, est.candidates, mode=state.config.degradation.mode, reject=est.reject)
            seconds = time.perf_counter() - started
            rt.metrics.decision_seconds.observe(seconds)
            return Plan(decision, est.candidates, est.phase, seconds)
        if parsed.model in state.backends:
            backend = state.backends[parsed.model]
            if req.capability not in backend.capabilities:
                raise errors.bad_request(
                    f"Model `{parsed.model}` does not serve {PATHS[req.capability]} "
                    f"(capabilities: {', '.join(sorted(backend.capabilities))}).",
                    param="model",
                )
            decision = choose_pinned(
                parsed.model,
                verdict=self.verdict(req, parsed.model),
                can_afford=rt.ledger.can_afford(parsed.model, req.tokens_for(None)),
            )
            return Plan(decision, seconds=time.perf_counter() - started)
        rt.metrics.child(rt.metrics.requests, "none", "none", "unknown_model").inc()
        raise errors.model_not_found(parsed.model, [state.config.served_model_name, *state.backends])

    def record_plan(self, req: Admitted, plan: Plan) -> None:
        """Count the decision (demand for models at zero, degradations, refusals); raise a refusal."""
        rt, decision = self.rt, plan.decision
        for model, why in decision.skipped:
            if why == "unavailable":
                rt.metrics.child(rt.metrics.demand, model).inc()
                rt.load.record_demand(model)
        if self.tracing:
            self._decision_span(decision, req.priority, plan)
        if decision.refusal is not None:
            rt.metrics.child(rt.metrics.sheds, decision.refusal.kind, req.priority).inc()
            rt.metrics.child(rt.metrics.requests, "none", "none", decision.refusal.kind).inc()
            budget_retry = max(1, math.ceil(rt.ledger.snapshot()["window_resets_in_seconds"]))
            raise refusal_error(decision, req.state.config.degradation.retry_after_seconds, budget_retry)
        if decision.route == "degraded" and decision.skipped:
            from_model, why = decision.skipped[0]
            rt.metrics.child(rt.metrics.degradations, from_model, decision.model, why).inc()

    def _decision_span(self, decision: Decision, priority: str, plan: Plan) -> None:
        start_ns = time.time_ns() - int(plan.seconds * 1e9)
        span = self.tracer.start_span("tollway.route", start_time=start_ns)
        span.set_attribute("tollway.priority", priority)
        span.set_attribute("tollway.model", decision.model or "")
        span.set_attribute("tollway.route", decision.route or "refused")
        if decision.refusal is not None:
            span.set_attribute("tollway.refusal", decision.refusal.kind)
        if plan.phase is not None:
            span.set_attribute("tollway.phase", str(plan.phase))
        span.set_attribute("tollway.skipped", [f"{m}:{w}" for m, w in decision.skipped])
        span.end()

    # -- 5-7. reserve -> forward -> settle, with one retry -------------------------------------

    async def serve(self, request: Request, req: Admitted, plan: Plan) -> Response:
        rt = self.rt
        retry_after = req.state.config.degradation.retry_after_seconds
        decision = plan.decision
        tried: list[str] = []
        failure: UpstreamFailure | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await self.attempt(req, decision, retry_after)
            except UpstreamFailure as exc:
                failure = exc
                tried.append(str(decision.model))
            if not req.routed or not failure.retryable or attempt + 1 >= MAX_ATTEMPTS:
                break
            nxt = self.pick(req, plan.candidates, mode="degrade", exclude=tried, fallback=True)
            if nxt.model is None:
                break
            rt.metrics.child(rt.metrics.retries, tried[-1], failure.kind).inc()
            log.info("retrying on %s after %s", nxt.model, failure.message)
            decision = nxt
        assert failure is not None
        rt.metrics.child(rt.metrics.requests, tried[-1], decision.route or "none", "upstream_error").inc()
        raise failure_error(failure, retry_after)

    async def attempt(self, req: Admitted, decision: Decision, retry_after: int) -> Response:
        """Steps 5-7 on one model. Raises UpstreamFailure before the client saw anything."""
        assert decision.model is not None and decision.route is not None
        backend = req.state.backends[decision.model]
        attempt = Attempt.reserve(
            self.rt, backend, decision.route, req.tokens_for(decision.candidate), retry_after
        )
        extra = {"x-request-id": req.request_id}
        if self.tracing:
            attempt.span = self.tracer.start_span(
                "tollway.upstream",
                attributes={
                    "tollway.model": backend.name,
                    "tollway.route": decision.route,
                    "http.route": PATHS[req.capability],
                },
            )
            propagate.inject(extra, context=trace.set_span_in_context(attempt.span))
        return await forward(
            self.rt.http(),
            backend,
            PATHS[req.capability],
            req.parsed,
            attempt,
            extra_headers=extra,
            out_headers=route_headers(decision, req.request_id),
            upstream_timeout=req.state.config.server.upstream_timeout_seconds,
            prompt_tokens=req.prompt_tokens,
        )
