"""The OpenAI-compatible HTTP surface of the router.

`create_app(config)` builds a FastAPI app:

- `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: `model: <servedModelName>`
  is routed (engine ranking -> budget and load filters -> pick), a backend's name pins it, anything
  else is 404. Streams pass through chunk by chunk.
- `GET /v1/models` (and `/v1/models/{id}`): the served name and every backend.
- `GET /healthz` (alive), `/readyz` (serving; 503 while draining), `/metrics` (Prometheus),
  `GET /v1/tollway/status` (budgets, load, dual prices as the router sees them).

Handlers read the body as bytes and parse it once; no pydantic request models on the hot path.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from opentelemetry import propagate, trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from router_service import openai_errors as errors
from router_service.config import RouterConfig, load_router_config
from router_service.dispatch import Decision, choose, choose_pinned, reservation_tokens
from router_service.ledger import BudgetLedger, Reservation
from router_service.load import DEFAULT_PRIORITY, PRIORITIES, LoadVerdict
from router_service.policy import Candidate
from router_service.reload import ConfigWatcher
from router_service.state import (
    Engine,
    EngineFactory,
    RouterState,
    Runtime,
    build_state,
    default_engine_factory,
    token_accepted,
)
from router_service.telemetry import configure_tracing, get_tracer
from router_service.upstream import (
    Backend,
    SseUsage,
    UpstreamFailure,
    Usage,
    estimate_prompt_tokens,
    open_upstream,
    response_headers,
    usage_from_body,
)

log = logging.getLogger("tollway.router")

PRIORITY_HEADER = "x-tollway-priority"
MODEL_HEADER = "x-tollway-model"
ROUTE_HEADER = "x-tollway-route"
ROUTING_TEXT_CHARS = 4096  # the routing decision reads at most this much of the prompt
MAX_ATTEMPTS = 2  # the first choice plus one retry on the next-best model

_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


# --- request parsing (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    raw: bytes
    payload: dict[str, Any]
    model: str
    stream: bool
    routing_text: str
    prompt_chars: int
    max_tokens: int | None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _encodable(payload: object) -> bool:
    """False when a JSON string escape left a lone surrogate that UTF-8 cannot carry upstream."""
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"Request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise errors.bad_request("Request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise errors.bad_request("Request body must be a JSON object.")
    if (b"\\ud" in body or b"\\uD" in body) and not _encodable(payload):
        raise errors.bad_request(
            "Request body contains an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF)."
        )
    return payload


def parse_request(body: bytes, capability: str) -> ParsedRequest:
    """Validate the few fields the router relies on; the backend validates the rest."""
    payload = parse_json_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("`model` is required and must be a non-empty string.", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.bad_request("`stream` must be a boolean.", param="stream")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise errors.bad_request("`max_tokens` must be a non-negative integer.", param="max_tokens")
    if capability == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.bad_request("`messages` must be a non-empty list.", param="messages")
        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [
            _text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
        ]
        routing = users[-1] if users else " ".join(texts)
        chars = sum(len(t) for t in texts)
    elif capability == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        if not isinstance(prompt, str):
            raise errors.bad_request("`prompt` must be a string or a list of strings.", param="prompt")
        routing, chars = prompt, len(prompt)
    else:  # embeddings
        inputs = payload.get("input")
        if isinstance(inputs, str):
            chars = len(inputs)
        elif isinstance(inputs, list):
            chars = sum(
                len(x) if isinstance(x, str) else 4 * len(x) if isinstance(x, list) else 4 for x in inputs
            )
        else:
            raise errors.bad_request("`input` must be a string or a list.", param="input")
        routing = ""
        stream = False
    return ParsedRequest(
        raw=body,
        payload=payload,
        model=model,
        stream=stream,
        routing_text=routing[:ROUTING_TEXT_CHARS],
        prompt_chars=chars,
        max_tokens=max_tokens,
    )


def parse_priority(value: str | None) -> str:
    if value is None or value == "":
        return DEFAULT_PRIORITY
    v = value.strip().lower()
    if v not in PRIORITIES:
        raise errors.bad_request(
            f"Header {PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)} (got {value!r}).",
            param=PRIORITY_HEADER,
        )
    return v


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.too_large(limit)
        except ValueError as exc:
            raise errors.bad_request("Invalid Content-Length header.") from exc
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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


# --- the proxy ------------------------------------------------------------------------------------


class RelayResponse(StreamingResponse):
    """A streamed response that always runs `on_close`, also when it never started sending."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


class Proxy:
    """Admission, upstream attempts and response shaping for one router."""

    def __init__(self, runtime: Runtime, tracer: trace.Tracer, tracing: bool) -> None:
        self.rt = runtime
        self.tracer = tracer
        self.tracing = tracing

    # -- admission -------------------------------------------------------------------------------

    def authorize(self, request: Request, state: RouterState) -> None:
        if state.tokens is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or not token_accepted(state.tokens, token.strip()):
            raise errors.unauthorized()

    def _candidates(self, state: RouterState, ranking: Any, capability: str) -> list[Candidate]:
        return [
            c
            for c in ranking.candidates
            if c.model in state.backends and capability in state.backends[c.model].capabilities
        ]

    @staticmethod
    def _embedding_candidates(state: RouterState, prompt_tokens: int) -> list[Candidate]:
        able = [b for b in state.backends.values() if "embeddings" in b.capabilities]
        able.sort(key=lambda b: b.config.price.input_per_million_tokens)
        return [
            Candidate(
                model=b.name,
                score=-b.config.price.input_per_million_tokens,
                quality=0.0,
                est_tokens=prompt_tokens,
            )
            for b in able
        ]

    # -- the request -----------------------------------------------------------------------------

    async def handle(self, request: Request, capability: str) -> Response:
        rt = self.rt
        state = rt.state
        self.authorize(request, state)
        if not rt.ready:
            raise errors.not_ready("The router is starting or shutting down.")
        body = await read_body(request, state.config.server.max_request_bytes)
        parsed = parse_request(body, capability)
        priority = parse_priority(request.headers.get(PRIORITY_HEADER))
        config = state.config
        prompt_tokens = estimate_prompt_tokens(parsed.prompt_chars)
        retry_after = config.degradation.retry_after_seconds

        def tokens_for(c: Candidate) -> int:
            return reservation_tokens(c.est_tokens, prompt_tokens, parsed.max_tokens)

        def verdict(model: str) -> LoadVerdict:
            return rt.load.verdict(model, priority)

        ranking_candidates: list[Candidate] = []
        phase = None
        rejected = False
        started = time.perf_counter()
        if parsed.model == config.served_model_name:
            if capability == "embeddings":
                ranking_candidates = self._embedding_candidates(state, prompt_tokens)
            else:
                ranking = await rt.rank(state, parsed.routing_text, priority)
                phase = getattr(ranking, "phase", None)
                ranking_candidates = self._candidates(state, ranking, capability)
                rejected = bool(getattr(ranking, "reject", False))
            decision = choose(
                ranking_candidates,
                verdict=verdict,
                can_afford=rt.ledger.can_afford,
                tokens=tokens_for,
                mode=config.degradation.mode,
                reject=rejected,
                what=f"{capability} requests",
            )
            decision_seconds = time.perf_counter() - started
            rt.metrics.decision_seconds.observe(decision_seconds)
        elif parsed.model in state.backends:
            backend = state.backends[parsed.model]
            if capability not in backend.capabilities:
                raise errors.bad_request(
                    f"Model `{parsed.model}` does not serve {_PATHS[capability]} "
                    f"(capabilities: {', '.join(sorted(backend.capabilities))}).",
                    param="model",
                )
            pinned_tokens = reservation_tokens(0.0, prompt_tokens, parsed.max_tokens)
            decision = choose_pinned(
                parsed.model,
                verdict=verdict(parsed.model),
                can_afford=rt.ledger.can_afford(parsed.model, pinned_tokens),
            )
            decision_seconds = time.perf_counter() - started
        else:
            rt.metrics.child(rt.metrics.requests, "none", "none", "unknown_model").inc()
            raise errors.model_not_found(parsed.model, [config.served_model_name, *state.backends])

        for model, why in decision.skipped:
            if why == "unavailable":
                rt.metrics.child(rt.metrics.demand, model).inc()
                rt.load.record_demand(model)
        if self.tracing:
            self._decision_span(decision, priority, phase, decision_seconds, started)
        if decision.refusal is not None:
            rt.metrics.child(rt.metrics.sheds, decision.refusal.kind, priority).inc()
            rt.metrics.child(rt.metrics.requests, "none", "none", decision.refusal.kind).inc()
            budget_retry = max(1, math.ceil(rt.ledger.snapshot()["window_resets_in_seconds"]))
            raise refusal_error(decision, retry_after, budget_retry)
        if decision.route == "degraded" and decision.skipped:
            from_model, why = decision.skipped[0]
            rt.metrics.child(rt.metrics.degradations, from_model, decision.model, why).inc()

        tried: list[str] = []
        failure: UpstreamFailure | None = None
        for attempt in range(MAX_ATTEMPTS):
            assert decision.model is not None and decision.route is not None
            model = decision.model
            backend = state.backends[model]
            tokens = (
                tokens_for(decision.candidate)
                if decision.candidate is not None
                else reservation_tokens(0.0, prompt_tokens, parsed.max_tokens)
            )
            reservation = rt.ledger.reserve(model, tokens)
            if reservation is None:  # cannot happen without an await in between; stay safe
                raise errors.budget_exhausted(f"The token budget of model {model!r} is spent.", retry_after)
            try:
                return await self._attempt(
                    request,
                    state,
                    backend,
                    decision,
                    parsed,
                    capability,
                    reservation,
                    prompt_tokens,
                    priority,
                )
            except UpstreamFailure as exc:
                failure = exc
                tried.append(model)
            if (
                parsed.model != config.served_model_name
                or not failure.retryable
                or attempt + 1 >= MAX_ATTEMPTS
            ):
                break
            nxt = choose(
                ranking_candidates,
                verdict=verdict,
                can_afford=rt.ledger.can_afford,
                tokens=tokens_for,
                mode="degrade",
                exclude=tried,
                fallback=True,
            )
            if nxt.model is None:
                break
            rt.metrics.child(rt.metrics.retries, model, failure.kind).inc()
            log.info("retrying on %s after %s", nxt.model, failure.message)
            decision = nxt
        assert failure is not None
        rt.metrics.child(rt.metrics.requests, tried[-1], decision.route or "none", "upstream_error").inc()
        raise failure_error(failure, retry_after)

    def _decision_span(
        self, decision: Decision, priority: str, phase: Any, seconds: float, started: float
    ) -> None:
        start_ns = time.time_ns() - int(seconds * 1e9)
        span = self.tracer.start_span("tollway.route", start_time=start_ns)
        span.set_attribute("tollway.priority", priority)
        span.set_attribute("tollway.model", decision.model or "")
        span.set_attribute("tollway.route", decision.route or "refused")
        if decision.refusal is not None:
            span.set_attribute("tollway.refusal", decision.refusal.kind)
        if phase is not None:
            span.set_attribute("tollway.phase", str(phase))
        span.set_attribute("tollway.skipped", [f"{m}:{w}" for m, w in decision.skipped])
        span.end()

    async def _attempt(
        self,
        request: Request,
        state: RouterState,
        backend: Backend,
        decision: Decision,
        parsed: ParsedRequest,
        capability: str,
        reservation: Reservation,
        prompt_tokens: int,
        priority: str,
    ) -> Response:
        """One upstream call. Raises UpstreamFailure before the client saw anything."""
        rt = self.rt
        model = backend.name
        if parsed.model == backend.upstream_model:
            upstream_body = parsed.raw  # pinned to its own name: forward the client's bytes untouched
        else:
            payload = {**parsed.payload, "model": backend.upstream_model}
            upstream_body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        extra: dict[str, str] = {}
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        extra["x-request-id"] = request_id
        span = None
        if self.tracing:
            span = self.tracer.start_span(
                "tollway.upstream",
                attributes={
                    "tollway.model": model,
                    "tollway.route": decision.route or "",
                    "http.route": _PATHS[capability],
                },
            )
            propagate.inject(extra, context=trace.set_span_in_context(span))
        out_headers = {MODEL_HEADER: model, ROUTE_HEADER: decision.route or "", "x-request-id": request_id}
        if decision.route == "degraded" and decision.skipped:
            out_headers["x-tollway-degraded-from"] = ",".join(f"{m}={w}" for m, w in decision.skipped)
        price = backend.config.price
        rt.load.acquire(model)
        started = time.perf_counter()
        settled = False

        def finish(usage: Usage | None, outcome: str) -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            rt.load.release(model)
            if usage is None:
                rt.ledger.release(reservation)
            else:
                rt.ledger.settle(reservation, usage.total)
                rt.metrics.child(rt.metrics.tokens, model, "prompt").inc(usage.prompt_tokens)
                rt.metrics.child(rt.metrics.tokens, model, "completion").inc(usage.completion_tokens)
                rt.metrics.child(rt.metrics.cost, model).inc(
                    price.usd(usage.prompt_tokens, usage.completion_tokens)
                )
            rt.metrics.child(rt.metrics.upstream_seconds, model, "total").observe(
                time.perf_counter() - started
            )
            rt.metrics.child(rt.metrics.requests, model, decision.route or "none", outcome).inc()
            if span is not None:
                span.set_attribute("tollway.outcome", outcome)
                if usage is not None:
                    span.set_attribute("tollway.tokens", usage.total)
                span.end()

        def abandon(kind: str) -> None:
            """The attempt failed before the client saw a byte: undo it, the caller may retry."""
            nonlocal settled
            settled = True
            rt.load.release(model)
            rt.ledger.release(reservation)
            if span is not None:
                span.set_attribute("tollway.outcome", f"failed:{kind}")
                span.end()

        try:
            response = await open_upstream(rt.http(), backend, _PATHS[capability], upstream_body, extra)
        except UpstreamFailure as exc:
            abandon(exc.kind)
            raise
        except BaseException:
            finish(None, "cancelled")
            raise
        rt.metrics.child(rt.metrics.upstream_seconds, model, "first_byte").observe(
            time.perf_counter() - started
        )
        headers = {**response_headers(response), **out_headers}
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")

        if not (parsed.stream and is_sse and response.status_code == 200):
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                abandon("protocol")
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "protocol"
                raise UpstreamFailure(kind, f"{model}: response body failed ({type(exc).__name__})") from exc
            except BaseException:
                finish(None, "cancelled")
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            if response.status_code >= 400:
                finish(None, "client_error")
            else:
                usage = usage_from_body(content) or Usage(prompt_tokens, 0, False)
                finish(usage, "ok")
            return Response(content=content, status_code=response.status_code, headers=headers)

        deadline = time.monotonic() + state.config.server.upstream_timeout_seconds
        watcher = SseUsage()

        async def relay() -> AsyncIterator[bytes]:
            outcome = "ok"
            try:
                async for chunk in response.aiter_raw():
                    watcher.feed(chunk)
                    yield chunk
                    if time.monotonic() > deadline:
                        outcome = "timeout"
                        yield errors.sse_error_event(
                            f"Upstream {model} exceeded the {state.config.server.upstream_timeout_seconds:g} s "
                            "limit; stream ended.",
                            "server_error",
                            "upstream_timeout",
                        )
                        return
                if watcher.errored:
                    outcome = "midstream_error"
                elif not watcher.done:
                    outcome = "midstream_error"
                    yield errors.sse_error_event(
                        f"Upstream {model} ended the stream early.", "server_error", "upstream_error"
                    )
            except httpx.HTTPError as exc:
                outcome = "midstream_error"
                yield errors.sse_error_event(
                    f"Upstream {model} failed mid-stream ({type(exc).__name__}).",
                    "server_error",
                    "upstream_error",
                )
            except BaseException:
                outcome = "cancelled"
                raise
            finally:
                finish(watcher.usage(prompt_tokens), outcome)
                with anyio.CancelScope(shield=True):
                    await response.aclose()

        async def close() -> None:
            # The client may leave before the body is ever iterated: the relay's own `finally`
            # then never runs, so the response settles here (both paths are idempotent).
            finish(watcher.usage(prompt_tokens), "cancelled")
            await response.aclose()

        headers.setdefault("cache-control", "no-cache")
        headers["x-accel-buffering"] = "no"
        return RelayResponse(relay(), close, status_code=200, headers=headers)


# --- the app --------------------------------------------------------------------------------------


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ApiError)
    async def _api_error(_: Request, exc: errors.ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return errors.not_found(request.url.path).response()
        if exc.status_code == 405:
            return errors.method_not_allowed(request.method, request.url.path).response()
        return errors.ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return errors.ApiError(500, "Internal router error.", "server_error", "internal_error").response()


def create_app(
    config: RouterConfig | str | Path,
    *,
    engine: Engine | None = None,
    engine_factory: EngineFactory | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    watch: bool | None = None,
    reload_interval_seconds: float = 1.0,
    clock: Any = time.monotonic,
) -> FastAPI:
    """The router app for a config object or file.

    With a file, the app watches it (and the tokens file) and reloads on change unless
    `watch=False`. `engine` / `engine_factory` replace the routing engine (tests), `transport`
    the network to the backends, `tracer_provider` the global OpenTelemetry provider.
    """
    path: Path | None = None
    if isinstance(config, str | Path):
        path = Path(config)
        config = load_router_config(path)
    factory = engine_factory or default_engine_factory
    ledger = BudgetLedger(config.budgets, clock=clock)
    if engine is not None and callable(getattr(engine, "attach_ledger", None)):
        engine.attach_ledger(ledger)  # type: ignore[attr-defined]
    runtime = Runtime(
        build_state(config, factory, ledger, engine=engine), ledger, clock=clock, transport=transport
    )
    tracing = tracer_provider is not None or configure_tracing()
    proxy = Proxy(runtime, get_tracer(tracer_provider), tracing)
    watcher = (
        ConfigWatcher(path, runtime, factory, reload_interval_seconds)
        if path is not None and watch is not False
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            runtime.draining = True
            if watcher is not None:
                await watcher.stop()
            await runtime.stop()

    app = FastAPI(title="tollway router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.watcher = watcher
    _error_handlers(app)

    # The inference routes are plain Starlette routes: FastAPI's dependency resolution would
    # add tens of microseconds per request and gives nothing to a handler that reads raw bytes.
    for capability, route_path in _PATHS.items():

        async def endpoint(request: Request, capability: str = capability) -> Response:
            return await proxy.handle(request, capability)

        app.router.routes.append(Route(route_path, endpoint, methods=["POST"], name=capability))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        state = runtime.state
        proxy.authorize(request, state)
        return Response(state.models_body, media_type="application/json")

    @app.get("/v1/models/{model_id}")
    async def model(request: Request, model_id: str) -> Response:
        state = runtime.state
        proxy.authorize(request, state)
        for entry in json.loads(state.models_body)["data"]:
            if entry["id"] == model_id:
                return Response(json.dumps(entry), media_type="application/json")
        raise errors.model_not_found(model_id, [state.config.served_model_name, *state.backends])

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """Observed quality of a served answer: {"prompt", "model", "score" in [0, 1], "tokens"?}."""
        state = runtime.state
        proxy.authorize(request, state)
        body = await read_body(request, state.config.server.max_request_bytes)
        data = parse_json_object(body)
        prompt, model, score, tokens = (
            data.get("prompt"),
            data.get("model"),
            data.get("score"),
            data.get("tokens"),
        )
        if not isinstance(prompt, str) or not prompt:
            raise errors.bad_request("`prompt` is required (the prompt that was served).", param="prompt")
        if not isinstance(model, str) or model not in state.backends:
            raise errors.model_not_found(str(model), list(state.backends))
        if not isinstance(score, int | float) or isinstance(score, bool) or not 0 <= score <= 1:
            raise errors.bad_request("`score` must be a number within [0, 1].", param="score")
        if tokens is not None and (
            not isinstance(tokens, int | float) or isinstance(tokens, bool) or tokens < 0
        ):
            raise errors.bad_request("`tokens` must be a non-negative number.", param="tokens")
        record = getattr(state.engine, "record_feedback", None)
        if record is None or not state.config.history.learn_from_traffic:
            raise errors.bad_request(
                "Feedback is not accepted: history.learnFromTraffic is off in the router config.",
                code="feedback_disabled",
            )
        accepted = record(prompt, model, float(score), None if tokens is None else float(tokens))
        return Response(json.dumps({"accepted": bool(accepted)}), media_type="application/json")

    @app.get("/v1/tollway/status")
    async def status(request: Request) -> Response:
        proxy.authorize(request, runtime.state)
        return Response(json.dumps(runtime.status()), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        if runtime.ready and not runtime.draining:
            return Response(b'{"status":"ready"}', media_type="application/json")
        return errors.not_ready("draining" if runtime.draining else "starting").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
