"""The request path, as small named steps (in the style of the Gateway API Inference Extension's
endpoint picker: filter -> score -> pick):

1. parse     `request.parse_request`: the body and the few fields the router relies on;
2. estimate  `estimate.estimate`: every model that can serve it, scored best first;
3. filter    `dispatch.choose`: drop models without budget for its worst case (`token_need`),
             and models none of whose replicas can take it (`picker.choose_replica`: circuit
             breaker open, saturated; a model's verdict is its best replica's);
4. pick      `dispatch.choose`: the best model that is left and its replica with the most room
             (`picker.py`), or a refusal that says why; a refusal for budget while requests in
             flight still hold budget waits for them to settle first;
5. reserve   `Attempt.reserve`: the worst case from the budget, an in-flight slot on the replica;
6. forward   `forward.forward`: the request to the replica, the answer relayed to the client;
7. settle    `Attempt.settle`: the true usage charged, the slot freed, the outcome counted.

A failure before the client saw a byte is retried once on the next pick (steps 3-7 again, the
failed replica excluded: another replica of the same model if one has room, else the next-best
model), if the client is still there. A client that leaves while the backend has not answered yet
ends the attempt at once. `Proxy` only chains the steps and records what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Container
from dataclasses import dataclass, field, replace
from typing import TypeVar

from opentelemetry import propagate, trace
from starlette.requests import Request
from starlette.responses import Response

from router_service.proxy import openai_errors as errors
from router_service.proxy.attempt import Attempt
from router_service.proxy.dispatch import Decision, Need, choose, choose_pinned, token_need
from router_service.proxy.estimate import estimate
from router_service.proxy.forward import Timeouts, forward
from router_service.proxy.load import LoadVerdict
from router_service.proxy.picker import UNAVAILABLE, choose_replica
from router_service.proxy.request import (
    PATHS,
    PRIORITY_HEADER,
    ParsedRequest,
    parse_priority,
    parse_request,
    read_body,
)
from router_service.proxy.state import RouterState, Runtime, token_accepted
from router_service.proxy.upstream import UpstreamFailure
from router_service.routing.policy import Candidate

T = TypeVar("T")

log = logging.getLogger("tollway.router")

MODEL_HEADER = "x-tollway-model"
ROUTE_HEADER = "x-tollway-route"
ENDPOINT_HEADER = "x-tollway-endpoint"  # the replica that answered
MAX_TOKENS_HEADER = "x-tollway-max-tokens"  # the max_tokens the router set (none given, or budget short)
MAX_ATTEMPTS = 2  # the first choice plus one retry on the next-best model
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first" (nobody reads it)
BUDGET_POLL_SECONDS = 0.25  # a waiting request re-checks at least this often (other replicas settle too)


class ClientGone(Exception):
    """The client disconnected before the answer started."""


async def until_disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T], abort: asyncio.Event | None = None) -> T:
    """`work`'s result; or, with `work` cancelled, ClientGone when the client leaves first and
    UpstreamFailure when `abort` is set first (the endpoint's circuit opened while it waited)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    aborted = asyncio.ensure_future(abort.wait()) if abort is not None else None
    try:
        await asyncio.wait({t for t in (task, watcher, aborted) if t}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if aborted is not None:
            aborted.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamFailure, errors.ApiError):
                await task
            if watcher.done() and not watcher.cancelled():
                raise ClientGone
            raise UpstreamFailure("timeout", "circuit opened while the request waited for its answer")
    return task.result()


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
    headers = {
        MODEL_HEADER: decision.model,
        ROUTE_HEADER: decision.route or "",
        ENDPOINT_HEADER: decision.endpoint or "",
        "x-request-id": request_id,
    }
    if decision.route == "degraded" and decision.skipped:
        headers["x-tollway-degraded-from"] = ",".join(f"{m}={w}" for m, w in decision.skipped)
    return headers


@dataclass(frozen=True)
class Admitted:
    """One admitted request: what was parsed, for whom, and the state it is served under."""

    state: RouterState
    runtime: Runtime
    parsed: ParsedRequest
    capability: str
    priority: str
    request_id: str

    @property
    def routed(self) -> bool:
        return self.parsed.model == self.state.config.served_model_name

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens are at most this (see tokens.py)."""
        return self.parsed.prompt_bound

    def need(self, model: str, remaining: float | None = None) -> Need:
        """What admission holds for this request on `model` (its worst case, `dispatch.token_need`),
        with the model's budget left as the ledger says (or as `remaining` supposes)."""
        ledger, budgets = self.runtime.ledger, self.state.config.budgets
        backend = self.state.backends[model]
        return token_need(
            prompt_bound=self.parsed.prompt_bound,
            sequences=self.parsed.sequences,
            max_tokens=self.parsed.max_tokens,
            budget=ledger.budget(model),
            remaining=ledger.remaining(model) if remaining is None else remaining,
            max_model_len=backend.config.max_model_len,
            max_request_fraction=budgets.max_request_fraction,
            min_completion_tokens=budgets.min_completion_tokens,
        )

    def tokens_for(self, candidate: Candidate) -> int:
        return self.need(candidate.model).tokens


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
        self.rt.active += 1
        try:
            req = await self.admit(request, capability)  # 1. parse
            plan = await self.plan(req, request)  # 2-4. estimate -> filter -> pick
            self.record_plan(req, plan)
            return await self.serve(request, req, plan)  # 5-7. reserve -> forward -> settle
        except ClientGone:
            self.rt.metrics.child(self.rt.metrics.requests, "none", "none", "client_gone").inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            self.rt.active -= 1

    # -- 1. parse --------------------------------------------------------------------------------

    async def admit(self, request: Request, capability: str) -> Admitted:
        rt = self.rt
        state = rt.state
        self.authorize(request, state)
        if not rt.ready:
            raise errors.not_ready("The router is starting or shutting down.")
        server = state.config.server
        body = await read_body(request, server.max_request_bytes, server.request_body_timeout_seconds)
        parsed = parse_request(body, capability)
        return Admitted(
            state=state,
            runtime=rt,
            parsed=parsed,
            capability=capability,
            priority=parse_priority(request.headers.get(PRIORITY_HEADER)),
            request_id=request.headers.get("x-request-id") or os.urandom(16).hex(),
        )

    # -- 2-4. estimate -> filter -> pick --------------------------------------------------------

    def verdict(self, req: Admitted, model: str, exclude: Container[str] = ()) -> LoadVerdict:
        """The model's health and load as the filter sees them: its best replica's verdict, with the
        replica that would serve (`picker.choose_replica`); replicas in `exclude` are left out."""
        rt = self.rt
        load = rt.load.model(model)
        if load is None:
            return UNAVAILABLE
        replicas = load.ready if not exclude else [r for r in load.ready if r.endpoint.url not in exclude]
        return choose_replica(
            replicas,
            settings=rt.load.settings,
            picker=req.state.config.endpoint_picker,
            priority=req.priority,
            now=rt.load.now(),
            max_num_seqs=load.max_num_seqs,
            allows=rt.breakers.allows,
            rng=rt.rng,
        )

    def pick(
        self, req: Admitted, candidates: list[Candidate], exclude: Container[str] = (), **options: object
    ) -> Decision:
        """Steps 3-4: filter by budget and load, pick the best left. First among the models with a
        free sequence slot on some replica (where maxNumSeqs is known: a burst spills over to models
        with room instead of queueing on the best one); when none has one, queueing within the
        limits. `exclude`: replicas already tried."""
        verdicts: dict[str, LoadVerdict] = {}  # the second pass reuses the first one's

        def any_verdict(model: str) -> LoadVerdict:
            found = verdicts.get(model)
            if found is None:
                found = verdicts[model] = self.verdict(req, model, exclude)
            return found

        def with_free_slot(model: str) -> LoadVerdict:
            v = any_verdict(model)
            return replace(v, saturated=True, reason=v.reason or "waiting") if v.queues else v

        decision: Decision | None = None
        for verdict in (with_free_slot, any_verdict):
            decision = choose(
                candidates,
                verdict=verdict,
                can_afford=self.rt.ledger.can_afford,
                tokens=req.tokens_for,
                what=f"{req.capability} requests",
                **options,  # type: ignore[arg-type]
            )
            if decision.model is not None:
                return decision
        assert decision is not None
        return decision

    async def plan(self, req: Admitted, request: Request) -> Plan:
        """Steps 2-4; a refusal for budget waits (bounded) for budget held in flight to come back."""
        plan = await self._plan(req)
        wait = req.state.config.budgets.admission_wait_seconds
        deadline = time.monotonic() + wait
        while self._budget_may_free(plan.decision, req, deadline):
            await unless_disconnected(
                request, self.rt.wait_budget_change(min(BUDGET_POLL_SECONDS, deadline - time.monotonic()))
            )
            plan = self._repick(req, plan)
        return plan

    def _repick(self, req: Admitted, plan: Plan) -> Plan:
        if req.routed:
            decision = self.pick(req, plan.candidates, mode=req.state.config.degradation.mode)
        else:
            decision = self._pinned(req)
        return Plan(decision, plan.candidates, plan.phase, plan.seconds)

    def _budget_may_free(self, decision: Decision, req: Admitted, deadline: float) -> bool:
        """A budget refusal that waiting could turn into a pick: budget held by requests in flight
        (or a window that ends) could pay this request on some model it was refused for."""
        if decision.refusal is None or decision.refusal.kind != "budget" or time.monotonic() >= deadline:
            return False
        ledger, store = self.rt.ledger, self.rt.store
        if store.window().resets_in_seconds < deadline - time.monotonic():
            return True
        usage = store.usage()
        for model, why in decision.skipped:
            if why != "budget":
                continue
            held = usage[model].in_flight if model in usage else 0.0
            could_have = ledger.remaining(model) + held
            if held > 0 and could_have >= req.need(model, remaining=could_have).tokens:
                return True
        return False

    def _pinned(self, req: Admitted) -> Decision:
        model = req.parsed.model
        return choose_pinned(
            model,
            verdict=self.verdict(req, model),
            can_afford=self.rt.ledger.can_afford(model, req.need(model).tokens),
        )

    async def _plan(self, req: Admitted) -> Plan:
        rt, state, parsed = self.rt, req.state, req.parsed
        started = time.perf_counter()
        if req.routed:
            if not any(req.capability in b.capabilities for b in state.backends.values()):
                raise errors.not_served(
                    PATHS[req.capability], f"no model in the pool serves {req.capability}"
                )
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
            return Plan(self._pinned(req), seconds=time.perf_counter() - started)
        rt.metrics.child(rt.metrics.requests, "none", "none", "unknown_model").inc()
        raise errors.model_not_found(parsed.model, [state.config.served_model_name, *state.backends])

    def record_plan(self, req: Admitted, plan: Plan) -> None:
        """Count the decision (demand for models at zero, degradations, refusals); raise a refusal."""
        rt, decision = self.rt, plan.decision
        for model, why in decision.skipped:
            if why == "unavailable":  # no replicas (not a failing endpoint): demand to scale it up
                rt.metrics.child(rt.metrics.demand, model).inc()
                rt.load.record_demand(model)
        if self.tracing:
            self._decision_span(decision, req.priority, plan)
        if decision.refusal is not None:
            rt.metrics.child(rt.metrics.sheds, decision.refusal.kind, req.priority).inc()
            rt.metrics.child(rt.metrics.requests, "none", "none", decision.refusal.kind).inc()
            budget_retry = max(1, math.ceil(rt.store.window().resets_in_seconds))
            raise refusal_error(decision, req.state.config.degradation.retry_after_seconds, budget_retry)
        if decision.route == "degraded" and decision.skipped:
            from_model, why = decision.skipped[0]
            rt.metrics.child(rt.metrics.degradations, from_model, decision.model, why).inc()

    def _decision_span(self, decision: Decision, priority: str, plan: Plan) -> None:
        start_ns = time.time_ns() - int(plan.seconds * 1e9)
        span = self.tracer.start_span("tollway.route", start_time=start_ns)
        span.set_attribute("tollway.priority", priority)
        span.set_attribute("tollway.model", decision.model or "")
        span.set_attribute("tollway.endpoint", decision.endpoint or "")
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
        tried: list[str] = []  # endpoints
        failure: UpstreamFailure | None = None
        for attempt in range(MAX_ATTEMPTS):
            assert decision.endpoint is not None
            try:
                # A non-streamed answer has no first byte before it is complete (vLLM sends headers
                # then): if the endpoint's circuit opens meanwhile, the request goes elsewhere.
                abort = None if req.parsed.stream else self.rt.breakers.opened(decision.endpoint)
                work = self.attempt(req, decision, retry_after)
                return await unless_disconnected(request, work, abort)
            except UpstreamFailure as exc:
                failure = exc
                tried.append(decision.endpoint)
            if not req.routed or not failure.retryable or attempt + 1 >= MAX_ATTEMPTS:
                break
            if await request.is_disconnected():
                raise ClientGone
            nxt = self.pick(req, plan.candidates, exclude=tried, mode="degrade", fallback=True)
            if nxt.model is None:
                break
            rt.metrics.child(rt.metrics.retries, str(decision.model), failure.kind).inc()
            log.info("retrying on %s (%s) after %s", nxt.model, nxt.endpoint, failure.message)
            decision = nxt
        assert failure is not None
        rt.metrics.child(
            rt.metrics.requests, str(decision.model), decision.route or "none", "upstream_error"
        ).inc()
        raise failure_error(failure, retry_after)

    def attempt(self, req: Admitted, decision: Decision, retry_after: int) -> Awaitable[Response]:
        """Steps 5-7 on one model. Reserves at once (no await between the pick and its reservation,
        so concurrent requests see each other's holds); the awaitable forwards and raises
        UpstreamFailure before the client saw anything."""
        assert decision.model is not None and decision.route is not None and decision.endpoint is not None
        backend, endpoint = req.state.backends[decision.model], decision.endpoint
        need = req.need(backend.name)
        attempt = Attempt.reserve(self.rt, backend, endpoint, decision.route, need.tokens, retry_after)
        extra = {"x-request-id": req.request_id}
        if self.tracing:
            attempt.span = self.tracer.start_span(
                "tollway.upstream",
                attributes={
                    "tollway.model": backend.name,
                    "tollway.endpoint": endpoint,
                    "tollway.route": decision.route,
                    "http.route": PATHS[req.capability],
                },
            )
            propagate.inject(extra, context=trace.set_span_in_context(attempt.span))
        server = req.state.config.server
        out_headers = route_headers(decision, req.request_id)
        if need.ceiling is not None:
            out_headers[MAX_TOKENS_HEADER] = str(need.ceiling)
        return forward(
            self.rt.connections.session(endpoint),
            backend,
            endpoint,
            PATHS[req.capability],
            req.parsed,
            attempt,
            extra_headers=extra,
            out_headers=out_headers,
            timeouts=Timeouts(
                first_byte=server.first_byte_timeout_seconds,
                total=server.upstream_timeout_seconds,
                client_stall=server.client_stall_seconds,
            ),
            prompt_tokens=req.prompt_tokens,
            ceiling=need.ceiling,
            streams=self.rt.streams,
        )
