"""The OpenAI-compatible HTTP surface of the router.

`create_app(config)` builds a FastAPI app:

- `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: `model: <servedModelName>`
  is routed, a backend's name pins it, anything else is 404 (the steps are in `pipeline.py`).
  Streams pass through chunk by chunk.
- `GET /v1/models` (and `/v1/models/{id}`): the served name and every backend.
- `POST /v1/feedback`: the observed quality of a served answer, for the routing history.
- `POST /v1/tollway/calibration`: a model's calibration (`tollway calibrate --push`), routed with
  instead of its profile's columns; `GET` lists the calibrations held (`proxy/calibration.py`).
- `GET /healthz` (alive), `/readyz` (serving; 503 while draining; its `state` detail says whether
  the shared state store answers: a router on its local budget share is still ready),
  `/metrics` (Prometheus), `GET /v1/tollway/status` (budgets, load, circuit breakers, dual prices,
  state store).

Handlers read the body as bytes and parse it once; no pydantic request models on the hot path.
The inference routes do not even pass FastAPI's middleware stack (`RouterApp`): the request goes
straight to the request path, errors become OpenAI-shaped answers there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route

from router_service.config import RouterConfig, load_router_config
from router_service.proxy import calibration as calibration_push
from router_service.proxy import openai_errors as errors
from router_service.proxy.discovery import KubeAccess
from router_service.proxy.pipeline import Proxy
from router_service.proxy.reload import ConfigWatcher
from router_service.proxy.request import PATHS, parse_json_object, read_body
from router_service.proxy.state import Engine, EngineFactory, Runtime, build_state, default_engine_factory
from router_service.proxy.telemetry import configure_tracing, get_tracer
from router_service.routing.ledger import BudgetLedger
from router_service.store.base import StoreUnavailable, open_store

log = logging.getLogger("tollway.router")


# --- the app --------------------------------------------------------------------------------------

INFERENCE_ROUTES = {path: capability for capability, path in PATHS.items()}


class RouterApp(FastAPI):
    """FastAPI, with the inference routes served first-hand: a POST to one of them goes to the
    request path (`Proxy.handle`) without the five middleware layers and the route matching that
    every other route passes (they cost about a tenth of the router's CPU per proxied request)."""

    proxy: Proxy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        capability = INFERENCE_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if capability is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        try:
            response = await self.proxy.handle(Request(scope, receive, send), capability)
        except errors.ApiError as exc:
            response = exc.response()
        except Exception:
            log.exception("unexpected error")
            response = errors.ApiError(
                500, "Internal router error.", "server_error", "internal_error"
            ).response()
        await response(scope, receive, send)


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
    kube: KubeAccess | Literal["in-cluster"] | None = "in-cluster",
    tracer_provider: trace.TracerProvider | None = None,
    watch: bool | None = None,
    reload_interval_seconds: float = 1.0,
    clock: Any = time.monotonic,
    state_url: str | None = None,
) -> FastAPI:
    """The router app for a config object or file.

    With a file, the app watches it (and the tokens file) and reloads on change unless
    `watch=False`. `engine` / `engine_factory` replace the routing engine (tests), `kube` the
    Kubernetes API that EndpointSlices are read from (default: the pod's ServiceAccount when in a
    cluster), `tracer_provider` the global OpenTelemetry provider.
    `state_url` (`--state-url`) selects the Redis state store over $TOLLWAY_STATE_URL and
    `state.url` in the config; none of them: the in-process store.
    """
    path: Path | None = None
    if isinstance(config, str | Path):
        path = Path(config)
        config = load_router_config(path)
    factory = engine_factory or default_engine_factory
    store = open_store(config, url=state_url, clock=clock)
    ledger = BudgetLedger(config.budgets, clock=clock, store=store)
    if engine is not None and callable(getattr(engine, "attach_ledger", None)):
        engine.attach_ledger(ledger)  # type: ignore[attr-defined]
    runtime = Runtime(
        build_state(config, factory, ledger, engine=engine),
        ledger,
        clock=clock,
        kube=KubeAccess.in_cluster() if kube == "in-cluster" else kube,
        state_url_override=state_url,
        engine_factory=factory,
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

    app = RouterApp(
        title="tollway router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.proxy = proxy
    app.state.runtime = runtime
    app.state.watcher = watcher
    _error_handlers(app)

    # The inference routes are also registered as plain routes, so that their other methods answer
    # 405 (`RouterApp` serves their POSTs before routing).
    for capability, route_path in PATHS.items():

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
        server = state.config.server
        body = await read_body(request, server.max_request_bytes, server.request_body_timeout_seconds)
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
        make_learned = getattr(state.engine, "make_learned", None)
        if make_learned is None or not state.config.history.learn_from_traffic:
            raise errors.bad_request(
                "Feedback is not accepted: history.learnFromTraffic is off in the router config.",
                code="feedback_disabled",
            )
        entry = make_learned(prompt, model, float(score), None if tokens is None else float(tokens))
        await runtime.learn(entry)  # in this replica's history now, in the others' within the sync bound
        return Response(json.dumps({"accepted": True}), media_type="application/json")

    @app.post("/v1/tollway/calibration")
    async def calibration(request: Request) -> Response:
        """A model's calibration: stored, and routed with before the answer when the config has it."""
        state = runtime.state
        proxy.authorize(request, state)
        body = await read_body(
            request, calibration_push.MAX_BODY_BYTES, state.config.server.request_body_timeout_seconds
        )
        pushed = calibration_push.parse_calibration(body)
        try:
            in_use = await runtime.ingest_calibration(pushed)
        except StoreUnavailable as exc:
            retry = state.config.degradation.retry_after_seconds
            raise errors.unavailable(f"The calibration could not be stored: {exc}", retry) from exc
        held = runtime.calibrations().get(pushed.model, {})
        answer = {
            "accepted": True,
            "model": pushed.model,
            "revision": pushed.revision,
            "lines": len(pushed.rows),
            "inUse": in_use,
            "detail": held.get("detail", ""),
        }
        return Response(json.dumps(answer), media_type="application/json")

    @app.get("/v1/tollway/calibration")
    async def calibrations(request: Request) -> Response:
        proxy.authorize(request, runtime.state)
        return Response(json.dumps({"calibrations": runtime.calibrations()}), media_type="application/json")

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
            body = {"status": "ready", "state": runtime.store.health().to_json()}
            return Response(json.dumps(body), media_type="application/json")
        return errors.not_ready("draining" if runtime.draining else "starting").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
