"""The request path's steps one at a time: estimate, reserve/settle (Attempt), forward.

(parse is covered in test_upstream_and_errors.py, filter -> pick in test_dispatch.py, the whole
chain in test_router_openai.py.)
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from router_helpers import FixedEngine, router_config

from router_service.proxy import openai_errors as errors
from router_service.proxy.attempt import Attempt
from router_service.proxy.connections import new_session
from router_service.proxy.endpoints import Endpoint
from router_service.proxy.estimate import capable, embedding_candidates, estimate
from router_service.proxy.forward import Relay, Timeouts, forward, upstream_body
from router_service.proxy.request import parse_request
from router_service.proxy.state import Runtime, build_state, default_engine_factory
from router_service.proxy.upstream import UpstreamFailure, Usage
from router_service.routing.ledger import BudgetLedger
from router_service.routing.policy import Candidate


async def streamed(
    request: web.Request,
    data: bytes,
    *,
    status: int = 200,
    content_type: str = "text/event-stream",
    piece: int = 17,
) -> web.StreamResponse:
    """A response body sent in pieces, as over the network."""
    response = web.StreamResponse(status=status, headers={"content-type": content_type})
    await response.prepare(request)
    for i in range(0, len(data), piece):
        await response.write(data[i : i + piece])
        await asyncio.sleep(0)
    await response.write_eof()
    return response


URLS = {"small": "http://small", "medium": "http://medium", "large": "http://large"}


def runtime(budget: int = 1000, **overrides: object) -> Runtime:
    config = router_config(URLS, budgets={"tokens": {m: budget for m in URLS}}, **overrides)
    ledger = BudgetLedger(config.budgets)
    engine = FixedEngine(["large", "medium", "small"])
    return Runtime(build_state(config, default_engine_factory, ledger, engine=engine), ledger)


def chat(model: str = "auto", stream: bool = False, **extra: object) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    return json.dumps({**body, **extra}).encode()


# --- 2. estimate ------------------------------------------------------------------------------


def test_capable_keeps_order_and_drops_unknown_or_incapable_models() -> None:
    rt = runtime()
    backends = dict(rt.state.backends)
    ranking = [Candidate(m, 1.0, 0.5, 10) for m in ("ghost", "large", "small", "medium")]
    assert [c.model for c in capable(ranking, backends, "chat")] == ["large", "small", "medium"]
    assert capable(ranking, backends, "embeddings") == []


def test_embedding_candidates_rank_cheapest_input_first() -> None:
    rt = runtime()
    backends = {
        name: type(b)(b.name, b.upstream_model, frozenset({"embeddings"}), b.headers, b.config)
        for name, b in rt.state.backends.items()
    }
    cands = embedding_candidates(backends, prompt_tokens=7)
    assert [c.model for c in cands] == ["small", "medium", "large"]
    assert all(c.est_tokens == 7 for c in cands)


async def test_estimate_asks_the_engine_with_the_routing_text_and_priority() -> None:
    rt = runtime()
    seen: list[tuple[str, str]] = []

    async def rank(prompt: str, priority: str):
        seen.append((prompt, priority))
        return rt.state.engine.rank(prompt, priority)

    parsed = parse_request(chat(), "chat")
    est = await estimate(rank, rt.state.backends, parsed, "chat", "critical", 5)
    assert seen == [("hello there", "critical")]
    assert [c.model for c in est.candidates] == ["large", "medium", "small"]
    assert est.phase == "routed" and not est.reject


# --- 5 and 7. reserve and settle --------------------------------------------------------------


def test_reserve_holds_budget_and_a_slot_and_settle_charges_true_usage() -> None:
    rt = runtime(budget=1000)
    attempt = Attempt.reserve(
        rt, rt.state.backends["large"], URLS["large"], "routed", tokens=300, retry_after=1
    )
    assert rt.ledger.remaining("large") == 700 and rt.load.in_flight("large") == 1
    attempt.settle(Usage(40, 60, True), "ok")
    assert rt.ledger.remaining("large") == 900 and rt.load.in_flight("large") == 0
    attempt.settle(Usage(400, 600, True), "ok")  # a second end changes nothing
    assert rt.ledger.remaining("large") == 900 and rt.load.in_flight("large") == 0


def test_abandon_and_settle_without_usage_give_the_reservation_back() -> None:
    rt = runtime(budget=1000)
    a = Attempt.reserve(rt, rt.state.backends["small"], URLS["small"], "routed", tokens=250, retry_after=1)
    a.abandon("connect")
    b = Attempt.reserve(rt, rt.state.backends["small"], URLS["small"], "routed", tokens=250, retry_after=1)
    b.settle(None, "client_error", consumed=False)
    assert rt.ledger.remaining("small") == 1000 and rt.load.in_flight("small") == 0


def test_settle_without_reported_usage_charges_the_reserved_worst_case() -> None:
    rt = runtime(budget=1000)
    a = Attempt.reserve(rt, rt.state.backends["small"], URLS["small"], "routed", tokens=250, retry_after=1)
    a.settle(None, "ok")
    assert rt.ledger.remaining("small") == 750


def test_reserve_refuses_when_the_budget_cannot_pay() -> None:
    rt = runtime(budget=100)
    with pytest.raises(errors.ApiError) as caught:
        Attempt.reserve(rt, rt.state.backends["medium"], URLS["medium"], "routed", tokens=101, retry_after=7)
    assert caught.value.status == 429 and rt.load.in_flight("medium") == 0


# --- 6. forward -------------------------------------------------------------------------------


def test_upstream_body_keeps_the_clients_bytes_when_the_name_matches() -> None:
    rt = runtime()
    pinned = parse_request(chat("small"), "chat")
    assert upstream_body(pinned, rt.state.backends["small"]) is pinned.raw
    routed = parse_request(chat("auto"), "chat")
    assert json.loads(upstream_body(routed, rt.state.backends["small"]))["model"] == "small"


TIMEOUTS = Timeouts(first_byte=5.0, total=5.0, client_stall=5.0)


async def play(response) -> bytes:
    """Run an ASGI response against a client that reads everything and never leaves; its body."""
    sent: list[bytes] = []
    forever = asyncio.Event()

    async def receive():
        await forever.wait()

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    await response({"type": "http"}, receive, send)
    return b"".join(sent)


async def _forward(
    rt: Runtime, handler, body: bytes, model: str = "large", tokens: int = 500, timeouts: Timeouts = TIMEOUTS
):
    """`forward` one request to a replica served by `handler` (an aiohttp handler)."""
    parsed = parse_request(body, "chat")
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with TestServer(app, host="127.0.0.1") as server, new_session(2.0) as session:
        endpoint = str(server.make_url("")).rstrip("/")
        rt.load.set_endpoints(model, [Endpoint(endpoint, endpoint + "/metrics")], discovered=False)
        backend = rt.state.backends[model]
        attempt = Attempt.reserve(rt, backend, endpoint, "routed", tokens=tokens, retry_after=1)
        response = await forward(
            session,
            backend,
            endpoint,
            "/v1/chat/completions",
            parsed,
            attempt,
            extra_headers={"x-request-id": "r1"},
            out_headers={"x-tollway-model": model},
            timeouts=timeouts,
            prompt_tokens=3,
        )
        if isinstance(response, Relay):
            return response, await play(response), attempt
        return response, response.body, attempt


async def test_forward_settles_a_plain_answer_with_its_usage() -> None:
    rt = runtime(budget=1000)
    seen: dict = {}

    async def handler(request: web.Request) -> web.Response:
        seen["body"] = await request.json()
        seen["request_id"] = request.headers["x-request-id"]
        usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
        leaky = {"x-upstream": "1", "set-cookie": "s=1", "access-control-allow-origin": "*", "server": "v"}
        return web.json_response({"choices": [], "usage": usage}, headers=leaky)

    response, body, attempt = await _forward(rt, handler, chat())
    assert response.status_code == 200 and json.loads(body)["usage"]["total_tokens"] == 30
    assert response.headers["x-tollway-model"] == "large"
    # Only what an OpenAI client reads passes: no cookies, CORS grants or internal headers.
    assert response.headers["content-type"].startswith("application/json")
    leaked = {"x-upstream", "set-cookie", "access-control-allow-origin", "server"} & set(response.headers)
    assert not leaked
    assert seen == {"body": {**json.loads(chat()), "model": "large"}, "request_id": "r1"}
    assert attempt.ended and rt.ledger.remaining("large") == 970 and rt.load.in_flight("large") == 0


async def test_forward_raises_before_the_first_byte_and_gives_everything_back() -> None:
    rt = runtime(budget=1000)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = b'{"error": {"message": "overloaded"}}'
        return await streamed(request, body, status=503, content_type="application/json")

    with pytest.raises(UpstreamFailure) as caught:
        await _forward(rt, handler, chat())
    assert caught.value.retryable and caught.value.status == 503 and "overloaded" in caught.value.message
    assert rt.ledger.remaining("large") == 1000 and rt.load.in_flight("large") == 0


async def test_forward_relays_a_stream_and_settles_the_counted_tokens() -> None:
    rt = runtime(budget=1000)
    events = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", "b", "c")]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, stream)

    _, body, attempt = await _forward(rt, handler, chat(stream=True))
    assert body == stream  # passed through untouched
    assert attempt.ended and rt.ledger.remaining("large") == 1000 - (3 + 3)
    assert rt.load.in_flight("large") == 0


async def test_forward_ends_a_stream_cut_short_with_an_error_event() -> None:
    rt = runtime(budget=1000)
    cut = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, cut)

    _, body, attempt = await _forward(rt, handler, chat(stream=True))
    assert body.startswith(cut) and b'"code": "upstream_error"' in body[len(cut) :].replace(b'":"', b'": "')
    assert attempt.ended and rt.load.in_flight("large") == 0
