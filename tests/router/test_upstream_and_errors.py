"""Usage accounting on the wire, error shapes, request parsing, tracing switches."""

from __future__ import annotations

import json

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from router_helpers import FixedEngine, router_config

from router_service.proxy import openai_errors as errors
from router_service.proxy.app import create_app
from router_service.proxy.request import parse_priority, parse_request
from router_service.proxy.telemetry import tracing_requested
from router_service.proxy.upstream import SseEvents, SseUsage, Usage, usage_from_body, usage_from_obj


def chunk(content: str | None = None, usage: dict | None = None, text: str | None = None) -> bytes:
    obj: dict = {"id": "x", "object": "chat.completion.chunk", "choices": []}
    if content is not None:
        obj["choices"] = [{"index": 0, "delta": {"content": content}}]
    if text is not None:
        obj["choices"] = [{"index": 0, "text": text}]
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def watch(stream: bytes, piece: int = 7) -> tuple[SseUsage, list[bytes], SseEvents]:
    """Feed `stream` in pieces through SseEvents into SseUsage; the usage-only events it flagged."""
    events, w = SseEvents(), SseUsage()
    flagged = []
    for i in range(0, len(stream), piece):  # bytes arrive in arbitrary pieces
        for event in events.feed(stream[i : i + piece]):
            if w.event(event):
                flagged.append(event)
    return w, flagged, events


def test_sse_events_are_whole_whatever_the_pieces() -> None:
    stream = chunk("a") + b"data: [DONE]\r\n\r\n" + b'data: {"half'
    events = SseEvents()
    out = [e for i in range(0, len(stream), 5) for e in events.feed(stream[i : i + 5])]
    assert out == [chunk("a"), b"data: [DONE]\r\n\r\n"]  # \n\n and \r\n\r\n both end an event
    assert events.pending  # the unfinished event stays behind, never relayed half


def test_sse_counts_content_deltas_across_split_chunks() -> None:
    stream = chunk("") + chunk("Hello") + chunk(" world") + chunk(text="!") + b"data: [DONE]\n\n"
    w, flagged, events = watch(stream)
    assert w.done and not w.errored and not flagged and not events.pending
    assert w.usage(prompt_estimate=12) == Usage(12, 3, False)


def test_sse_prefers_reported_usage_and_flags_the_usage_only_event() -> None:
    final = chunk(usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
    w, flagged, _ = watch(chunk("a") + chunk("b") + final + b"data: [DONE]\n\n")
    assert w.usage(prompt_estimate=100) == Usage(9, 2, True)
    assert flagged == [final]  # the relay leaves it out when the client did not ask for usage


def test_sse_notices_error_events_and_missing_done() -> None:
    w, _, _ = watch(chunk("a") + b'data: {"error": {"message": "boom"}}\n\n')
    assert w.errored and not w.done


def test_usage_from_bodies() -> None:
    assert usage_from_body(b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}') == Usage(
        3, 4, True
    )
    assert usage_from_obj({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == Usage(
        5, 0, True
    )  # embeddings
    assert usage_from_body(b"not json") is None
    assert usage_from_obj({"usage": None}) is None


def test_error_shape_and_status() -> None:
    err = errors.shed("too busy", retry_after=3)
    response = err.response()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert json.loads(response.body) == {
        "error": {
            "message": "too busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert errors.model_not_found("x", ["auto"]).status == 404
    assert errors.too_large(10).status == 413
    assert errors.unauthorized().response().headers["www-authenticate"] == "Bearer"
    assert errors.unavailable("zero", 2).status == 503
    event = errors.sse_error_event("cut")
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "cut"


def test_parse_request_validates_fields_and_picks_routing_text() -> None:
    body = json.dumps(
        {
            "model": "auto",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
            ],
            "max_tokens": 5,
        }
    ).encode()
    p = parse_request(body, "chat")
    assert (p.model, p.routing_text, p.max_tokens, p.stream) == ("auto", "What is 2+2?", 5, False)
    # A bound on the prompt's tokens: template overheads plus the UTF-8 bytes of every text.
    assert (
        p.prompt_bound
        == 64 + 2 * 8 + len("Be brief.") + len("What is 2+2?") + len("system") + len("user") + 4
    )
    assert p.sequences == 1 and not p.usage_requested
    turns = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
        {"role": "tool", "content": "output"},
    ]
    routed = parse_request(json.dumps({"model": "auto", "messages": turns}).encode(), "chat")
    assert routed.routing_text == "second"  # the last user turn
    no_user = [{"role": "system", "content": "Be brief."}, "junk", {"role": "assistant", "content": "ok"}]
    routed = parse_request(json.dumps({"model": "auto", "messages": no_user}).encode(), "chat")
    assert routed.routing_text == "Be brief. ok"  # without one, every turn's text
    counted = parse_request(
        b'{"model": "a", "prompt": ["x", "y"], "n": 3, "best_of": 4, "stream": true, '
        b'"stream_options": {"include_usage": true}}',
        "completions",
    )
    assert counted.sequences == 2 * 4 and counted.usage_requested  # best_of sequences per prompt
    for bad in (b'"n": 0', b'"n": "2"', b'"best_of": true'):
        with pytest.raises(errors.ApiError):
            parse_request(b'{"model": "a", "prompt": "x", ' + bad + b"}", "completions")
    with pytest.raises(errors.ApiError) as info:
        parse_request(b'{"messages": []}', "chat")
    assert info.value.param == "model"
    with pytest.raises(errors.ApiError) as info:
        parse_request(b'{"model": "auto", "prompt": 3}', "completions")
    assert info.value.param == "prompt"
    with pytest.raises(errors.ApiError):
        parse_request(
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "chat"
        )
    assert parse_request(b'{"model": "e", "input": ["a", "bb"]}', "embeddings").prompt_bound == (
        1 + 1 + 2
    ) + (2 + 1 + 2)
    assert parse_priority(None) == "standard" and parse_priority(" Critical ") == "critical"
    with pytest.raises(errors.ApiError):
        parse_priority("urgent")


def test_tracing_switches_follow_otel_env() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


async def _asgi(app, method: str, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
        return await c.request(method, path, **kw)


async def test_spans_for_decision_and_upstream(urls) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(router_config(urls), engine=FixedEngine(["small", "medium"]), tracer_provider=provider)
    async with app.router.lifespan_context(app):
        r = await _asgi(
            app,
            "POST",
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["tollway.route"].attributes["tollway.model"] == "small"
    assert spans["tollway.upstream"].attributes["tollway.outcome"] == "ok"
    assert spans["tollway.upstream"].attributes["tollway.tokens"] > 2


async def test_readyz_and_metrics_exposure(urls) -> None:
    app = create_app(
        router_config(urls, budgets={"tokens": {"small": 500}}), engine=FixedEngine(["small", "medium"])
    )
    runtime = app.state.runtime
    assert (await _asgi(app, "GET", "/readyz")).status_code == 503  # not started
    async with app.router.lifespan_context(app):
        assert (await _asgi(app, "GET", "/readyz")).status_code == 200
        text = (await _asgi(app, "GET", "/metrics")).text
        for name in (
            'tollway_budget_remaining_tokens{model="small"} 500.0',
            'tollway_dual_price{model="small"}',
            'tollway_in_flight{model="medium"} 0.0',
            'tollway_backend_replicas{model="small"} 1.0',
            "tollway_ready 1.0",
            "# TYPE tollway_routing_decision_seconds histogram",
            "# TYPE tollway_requests_total counter",
            "# TYPE tollway_sheds_total counter",
            "# TYPE tollway_degradations_total counter",
            "# TYPE tollway_upstream_seconds histogram",
            "# TYPE tollway_model_demand_total counter",
        ):
            assert name in text, name
        assert 'tollway_budget_remaining_tokens{model="medium"}' not in text  # no budget: not a gauge
        runtime.draining = True
        r = await _asgi(app, "GET", "/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert (await _asgi(app, "GET", "/healthz")).status_code == 200
