"""The router driven end to end with the official `openai` client against simulators."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from router_helpers import FixedEngine, async_wait_until, closed_port, router_config, wait_until

from router_service.proxy.server import BackgroundRouter
from router_service.simulator.server import SimulatorServer

MSG = [{"role": "user", "content": "Write a Python function that reverses a list."}]


def client(router: BackgroundRouter, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def aclient(router: BackgroundRouter, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=router.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw
    )


def metric(router: BackgroundRouter, line_prefix: str) -> float:
    text = httpx.get(router.url + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
    return sum(values)


# --- routing, pinning, unknown names ----------------------------------------------------------------


def test_auto_is_routed_by_the_engine_sync_and_streaming(urls, start_router) -> None:
    router = start_router(router_config(urls))  # the real engine over the shipped history
    c = client(router)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=12)
    completion = raw.parse()
    served = raw.headers["x-tollway-model"]
    assert served in urls
    assert raw.headers["x-tollway-route"] == "routed"
    assert completion.model == served
    assert completion.usage.completion_tokens == 12
    assert completion.choices[0].message.content

    with c.chat.completions.with_streaming_response.create(
        model="auto", messages=MSG, max_tokens=8, stream=True
    ) as response:
        assert response.headers["x-tollway-route"] == "routed"
        chunks = list(response.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) >= 6

    done = c.completions.create(model="auto", prompt="Once upon a time", max_tokens=5)
    assert done.usage.completion_tokens == 5
    # Every routed request paid into the served model's ledger.
    assert metric(router, 'tollway_requests_total{model="') >= 3
    assert metric(router, "tollway_routing_decision_seconds_count") == 3


async def test_auto_async_streaming_and_not(urls, start_router) -> None:
    router = start_router(router_config(urls), engine=FixedEngine(["medium", "small", "large"]))
    c = aclient(router)
    raw = await c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=5)
    assert raw.headers["x-tollway-model"] == "medium"
    assert (raw.parse()).usage.total_tokens > 5
    stream = await c.chat.completions.create(
        model="auto", messages=MSG, max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = [ch async for ch in stream]
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert usage and usage[-1].completion_tokens == 7
    # Reported usage settles the ledger: medium was charged both answers' true totals.
    used = router.runtime.ledger.snapshot()["models"]["medium"]["used"]
    assert used == (raw.parse()).usage.total_tokens + usage[-1].total_tokens
    await c.close()


def test_pinned_model_goes_there_and_is_charged(urls, start_router) -> None:
    router = start_router(
        router_config(urls, budgets={"tokens": {"large": 10_000}}),
        engine=FixedEngine(["small", "medium", "large"]),
    )
    raw = client(router).chat.completions.with_raw_response.create(model="large", messages=MSG, max_tokens=4)
    assert raw.headers["x-tollway-model"] == "large"
    assert raw.headers["x-tollway-route"] == "pinned"
    assert router.runtime.ledger.remaining("large") == 10_000 - raw.parse().usage.total_tokens


def test_unknown_model_is_404_in_openai_shape(urls, start_router) -> None:
    router = start_router(router_config(urls), engine=FixedEngine(["small", "medium", "large"]))
    with pytest.raises(openai.NotFoundError) as info:
        client(router).chat.completions.create(model="gpt-17", messages=MSG)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "gpt-17" in info.value.message


def test_models_lists_the_served_name_and_every_model(urls, start_router) -> None:
    router = start_router(router_config(urls), engine=FixedEngine(["small", "medium", "large"]))
    ids = [m.id for m in client(router).models.list()]
    assert ids == ["auto", "small", "medium", "large"]
    assert client(router).models.retrieve("medium").id == "medium"


# --- budgets --------------------------------------------------------------------------------------


def test_budget_exhaustion_degrades_then_refuses(urls, start_router) -> None:
    # Each request reserves its worst case: a prompt bound of 124 tokens plus max_tokens 30 = 154;
    # the simulator charges about 46 each. small pays 3, medium 1, then large serves.
    cfg = router_config(urls, budgets={"tokens": {"small": 250, "medium": 160}})
    router = start_router(cfg, engine=FixedEngine(["small", "medium", "large"], est_tokens=50))
    c = client(router)
    served = []
    for _ in range(8):
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=30)
        served.append((raw.headers["x-tollway-model"], raw.headers["x-tollway-route"]))
        if raw.headers["x-tollway-model"] == "large":
            assert raw.headers["x-tollway-degraded-from"].startswith("small=budget")
    assert served[0] == ("small", "routed")
    assert ("large", "degraded") in served
    assert router.runtime.ledger.remaining("small") < 154
    assert metric(router, 'tollway_degradations_total{from_model="small",reason="budget"') >= 1
    # Pinning a model whose budget is spent: 429 insufficient_quota with Retry-After.
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="small", messages=MSG, max_tokens=30)
    assert info.value.code == "insufficient_quota"
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_all_budgets_spent_gives_429(urls, start_router) -> None:
    cfg = router_config(urls, budgets={"tokens": {"small": 10, "medium": 10, "large": 10}})
    router = start_router(cfg, engine=FixedEngine(["small", "medium", "large"], est_tokens=50))
    with pytest.raises(openai.RateLimitError) as info:
        client(router).chat.completions.create(model="auto", messages=MSG, max_tokens=30)
    assert info.value.code == "insufficient_quota"
    assert metric(router, 'tollway_sheds_total{priority="standard",reason="budget"}') == 1


# --- load: degradation, shedding, priorities, zero replicas ---------------------------------------


async def test_saturated_backend_is_skipped_then_all_saturated_sheds_by_priority(
    clean_sims, start_router
) -> None:
    urls = {n: s.url for n, s in clean_sims.items()}
    cfg = router_config(
        urls,
        degradation={
            "maxInFlightPerReplica": 1,
            "priorityHeadroom": {"critical": 3.0, "standard": 2.0, "sheddable": 1.0},
            "retryAfterSeconds": 7,
            "scrapeIntervalSeconds": 0.1,
        },
    )
    router = start_router(cfg, engine=FixedEngine(["small", "medium", "large"]))
    rt = router.runtime
    for sim in clean_sims.values():
        sim.set_faults(hang=True)
    c = aclient(router)

    async def ask(priority: str) -> openai.types.chat.ChatCompletion:
        return await c.chat.completions.with_raw_response.create(
            model="auto", messages=MSG, max_tokens=3, extra_headers={"x-tollway-priority": priority}
        )

    held = [asyncio.create_task(ask("standard"))]
    await async_wait_until(lambda: rt.load.in_flight("small") == 1)
    # One request in flight on small: it is full for sheddable work (limit 1) but not for standard (2).
    held.append(asyncio.create_task(ask("sheddable")))
    await async_wait_until(lambda: rt.load.in_flight("medium") == 1)
    held.append(asyncio.create_task(ask("standard")))
    await async_wait_until(lambda: rt.load.in_flight("small") == 2)
    # Fill medium and large for standard work (2 each).
    for _ in range(3):
        held.append(asyncio.create_task(ask("standard")))
    await async_wait_until(lambda: rt.load.in_flight("medium") == 2 and rt.load.in_flight("large") == 2)
    with pytest.raises(openai.RateLimitError) as info:
        await ask("standard")
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        await ask("sheddable")
    held.append(asyncio.create_task(ask("critical")))  # critical still has room (limit 3)
    await async_wait_until(lambda: rt.load.in_flight("small") == 3)
    for sim in clean_sims.values():
        sim.clear_faults()
    answers = await asyncio.gather(*held)
    routes = [(a.headers["x-tollway-model"], a.headers["x-tollway-route"]) for a in answers]
    assert routes[0] == ("small", "routed")
    assert routes[1] == ("medium", "degraded")  # sheddable was degraded first
    assert routes[2] == ("small", "routed")  # standard still fit on small
    assert routes[-1] == ("small", "routed")  # critical
    assert answers[1].headers["x-tollway-degraded-from"] == "small=saturated"
    assert metric(router, 'tollway_sheds_total{priority="standard",reason="shed"}') == 1
    assert metric(router, 'tollway_sheds_total{priority="sheddable",reason="shed"}') == 1
    assert rt.load.in_flight("small") == rt.load.in_flight("medium") == rt.load.in_flight("large") == 0
    await c.close()


def test_scraped_queue_marks_a_backend_saturated(start_router) -> None:
    from router_service.simulator.profile import SimulatorProfile

    slow = SimulatorServer(
        SimulatorProfile(model="small", max_num_seqs=1, decode_tokens_per_second=20, speedup=5, ttft_ms=1)
    ).start()
    fast = SimulatorServer(SimulatorProfile(model="medium", speedup=50)).start()
    try:
        cfg = router_config(
            {"small": slow.url, "medium": fast.url},
            degradation={"maxWaitingPerReplica": 0, "scrapeIntervalSeconds": 0.05},
        )
        router = start_router(cfg, engine=FixedEngine(["small", "medium"]))
        c = client(router)
        import threading

        def long_request() -> None:
            c.chat.completions.create(model="small", messages=MSG, max_tokens=60)

        threads = [threading.Thread(target=long_request) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: (router.runtime.load.snapshot()["small"]["waiting"] or 0) > 0, timeout=10)
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=2)
        assert raw.headers["x-tollway-model"] == "medium"
        assert raw.headers["x-tollway-degraded-from"] == "small=saturated"
        assert metric(router, 'tollway_backend_load{model="small",signal="waiting"}') > 0
        for t in threads:
            t.join(timeout=30)
    finally:
        slow.stop()
        fast.stop()


def test_zero_replicas_degrade_records_demand_and_pinned_gets_503(urls, start_router) -> None:
    cfg = router_config(urls, replicas={"large": 0})
    router = start_router(cfg, engine=FixedEngine(["large", "small", "medium"]))
    c = client(router)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=2)
    assert raw.headers["x-tollway-model"] == "small"
    assert raw.headers["x-tollway-route"] == "degraded"
    assert raw.headers["x-tollway-degraded-from"] == "large=unavailable"
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="large", messages=MSG, max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "2"
    assert metric(router, 'tollway_model_demand_total{model="large"}') == 2
    assert metric(router, 'tollway_model_pending_demand{model="large"}') == 2
    assert metric(router, 'tollway_model_demand_total{model="small"}') == 0


# --- failures -----------------------------------------------------------------------------------------


def test_dead_backend_is_retried_on_the_next_best(urls, start_router) -> None:
    dead = {**urls, "small": f"http://127.0.0.1:{closed_port()}"}
    router = start_router(router_config(dead), engine=FixedEngine(["small", "medium", "large"]))
    raw = client(router).chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=3)
    assert raw.headers["x-tollway-model"] == "medium"
    assert raw.headers["x-tollway-route"] == "fallback"
    assert raw.parse().usage.completion_tokens == 3
    assert metric(router, 'tollway_upstream_retries_total{from_model="small",reason="connect"}') == 1
    assert router.runtime.ledger.snapshot()["models"].get("small", {}).get("used", 0) == 0
    # Pinned: no other model may answer, the client gets the upstream failure.
    with pytest.raises(openai.APIStatusError) as info:
        client(router).chat.completions.create(model="small", messages=MSG, max_tokens=3)
    assert info.value.status_code == 502
    assert router.runtime.load.in_flight("small") == 0


def test_5xx_and_timeout_before_first_byte_are_retried_once(clean_sims, start_router) -> None:
    urls = {n: s.url for n, s in clean_sims.items()}
    cfg = router_config(urls, server={"upstreamTimeoutSeconds": 0.5})
    router = start_router(cfg, engine=FixedEngine(["small", "medium", "large"]))
    c = client(router)
    clean_sims["small"].set_faults(error_rate=1.0, error_status=503)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=2)
    assert (raw.headers["x-tollway-model"], raw.headers["x-tollway-route"]) == ("medium", "fallback")
    clean_sims["small"].set_faults(error_rate=0.0, hang=True)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=2)
    assert (raw.headers["x-tollway-model"], raw.headers["x-tollway-route"]) == ("medium", "fallback")
    # Only one retry: with small and medium both failing, the answer is the failure (no third try).
    clean_sims["medium"].set_faults(error_rate=1.0)
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="auto", messages=MSG, max_tokens=2)
    assert info.value.status_code == 502
    assert metric(router, 'tollway_requests_total{model="large"') == 0
    assert metric(router, 'tollway_upstream_retries_total{from_model="small",reason="timeout"}') == 2
    assert metric(router, 'tollway_upstream_retries_total{from_model="small",reason="status"}') == 1


def test_mid_stream_failure_ends_the_stream_with_an_error_event(clean_sims, start_router) -> None:
    urls = {n: s.url for n, s in clean_sims.items()}
    router = start_router(router_config(urls), engine=FixedEngine(["small", "medium", "large"]))
    clean_sims["small"].set_faults(die_after_tokens=3)
    stream = client(router).chat.completions.create(model="auto", messages=MSG, max_tokens=50, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert "mid-stream" in info.value.message or "ended the stream" in info.value.message
    assert 1 <= len(received) <= 5
    wait_until(lambda: router.runtime.load.in_flight("small") == 0)
    # What was generated before the failure is charged (counted, the stream had no usage), and the
    # prompt at its bound (124 tokens for MSG: the router cannot know less without a usage report).
    assert 124 < router.runtime.ledger.snapshot()["models"]["small"]["used"] < 124 + 50
    assert metric(router, 'tollway_requests_total{model="small",outcome="midstream_error"') == 1


async def test_async_mid_stream_failure(clean_sims, start_router) -> None:
    urls = {n: s.url for n, s in clean_sims.items()}
    router = start_router(router_config(urls), engine=FixedEngine(["small", "medium", "large"]))
    clean_sims["small"].set_faults(die_after_tokens=2)
    c = aclient(router)
    stream = await c.completions.create(model="small", prompt="count", max_tokens=40, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await c.close()


# --- auth, limits, health ------------------------------------------------------------------------------


def test_bearer_auth(urls, start_router, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted keys\nsecret-one\nsecret-two\n")
    cfg = router_config(urls, auth={"bearerTokensFile": str(tokens)})
    router = start_router(cfg, engine=FixedEngine(["small", "medium", "large"]))
    with pytest.raises(openai.AuthenticationError) as info:
        client(router, api_key="wrong").chat.completions.create(model="auto", messages=MSG, max_tokens=2)
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(router, api_key="wrong").models.list()
    ok = client(router, api_key="secret-two").chat.completions.create(
        model="auto", messages=MSG, max_tokens=2
    )
    assert ok.usage.completion_tokens == 2
    assert httpx.get(router.url + "/healthz").status_code == 200
    assert httpx.get(router.url + "/readyz").status_code == 200
    assert httpx.get(router.url + "/metrics").status_code == 200


def test_request_size_limit_and_bad_requests(urls, start_router) -> None:
    router = start_router(
        router_config(urls, server={"maxRequestBytes": 2048}),
        engine=FixedEngine(["small", "medium", "large"]),
    )
    big = [{"role": "user", "content": "x" * 4000}]
    with pytest.raises(openai.APIStatusError) as info:
        client(router).chat.completions.create(model="auto", messages=big)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"
    # Chunked upload without Content-Length is cut off as well.
    r = httpx.post(
        router.base_url + "/chat/completions",
        content=iter([b'{"model":"auto","messages":[', b" " * 3000, b"]}"]),
    )
    assert r.status_code == 413
    r = httpx.post(router.base_url + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        router.base_url + "/chat/completions",
        json={"model": "auto", "messages": MSG},
        headers={"x-tollway-priority": "urgent"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tollway-priority"
    r = httpx.get(router.base_url + "/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_embeddings_go_to_a_model_that_serves_them(start_router) -> None:
    from router_service.config import RouterConfig
    from router_service.simulator.profile import SimulatorProfile

    chat = SimulatorServer(SimulatorProfile(model="small", speedup=50)).start()
    emb = SimulatorServer(SimulatorProfile(model="embed", task="embed", speedup=50)).start()
    try:
        cfg = RouterConfig.model_validate(
            {
                "backends": [
                    {"name": "small", "url": chat.url, "profile": "mistralai/mistral-7b-chat"},
                    {
                        "name": "embed",
                        "url": emb.url,
                        "profile": "mistralai/mistral-7b-chat",
                        "capabilities": ["embeddings"],
                    },
                ]
            }
        )
        router = start_router(cfg, engine=FixedEngine(["small", "embed"]))
        c = client(router)
        raw = c.embeddings.with_raw_response.create(model="auto", input=["hello world", "bye"])
        assert raw.headers["x-tollway-model"] == "embed"
        assert len(raw.parse().data) == 2
        # Chat never goes to the embedding-only backend, even when ranked.
        chat_raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=2)
        assert chat_raw.headers["x-tollway-model"] == "small"
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model="small", input="x")
    finally:
        chat.stop()
        emb.stop()


# --- reload and shutdown --------------------------------------------------------------------------------


def replace_file(path, text: str) -> None:
    """Atomic replace, as the kubelet updates a mounted ConfigMap."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_config_reload_keeps_budgets_and_in_flight_streams(urls, start_router, tmp_path) -> None:
    import yaml

    path = tmp_path / "router.yaml"
    cfg = router_config(urls, budgets={"tokens": {"small": 1000}})
    path.write_text(yaml.safe_dump(cfg.to_wire()))
    router = start_router(
        path, engine=FixedEngine(["small", "medium", "large"]), reload_interval_seconds=0.05
    )
    rt = router.runtime
    c = client(router)
    first = c.chat.completions.create(model="auto", messages=MSG, max_tokens=10)
    used = first.usage.total_tokens
    stream = c.chat.completions.create(model="small", messages=MSG, max_tokens=40, stream=True)
    chunks = [next(stream)]
    # New budgets and a new degradation mode; the stream in flight must not notice.
    cfg2 = router_config(
        urls, budgets={"tokens": {"small": 5000, "medium": 300}}, degradation={"mode": "shed"}
    )
    replace_file(path, yaml.safe_dump(cfg2.to_wire()))
    wait_until(lambda: rt.state.generation == 2, timeout=5)
    chunks.extend(stream)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 40
    assert rt.state.config.degradation.mode == "shed"
    # Spent budget stays spent across the reload: the new budget minus both answers.
    wait_until(lambda: rt.load.in_flight("small") == 0)
    spent = rt.ledger.snapshot()["models"]["small"]["used"]
    assert spent >= used + 40
    assert rt.ledger.remaining("small") == 5000 - spent
    assert rt.ledger.remaining("medium") == 300
    # A broken file is refused; the running config stays.
    replace_file(path, "backends: [oops")
    wait_until(lambda: metric(router, 'tollway_config_reloads_total{outcome="invalid"}') == 1, timeout=5)
    assert rt.state.generation == 2
    assert c.chat.completions.create(model="auto", messages=MSG, max_tokens=2).usage.completion_tokens == 2


def test_graceful_shutdown_drains_streams(clean_sims) -> None:
    urls = {n: s.url for n, s in clean_sims.items()}
    router = BackgroundRouter(router_config(urls), engine=FixedEngine(["small", "medium", "large"])).start()
    try:
        stream = client(router).chat.completions.create(
            model="auto", messages=MSG, max_tokens=60, stream=True
        )
        first = next(stream)
        import threading

        stopper = threading.Thread(target=router.stop)
        stopper.start()
        wait_until(lambda: router.runtime.draining)
        rest = list(stream)
        stopper.join(timeout=15)
        assert not stopper.is_alive()
        tokens = [ch for ch in [first, *rest] if ch.choices and ch.choices[0].delta.content]
        assert len(tokens) == 60
    finally:
        router.stop()


def test_client_leaving_mid_stream_frees_everything(urls, start_router) -> None:
    router = start_router(router_config(urls), engine=FixedEngine(["small", "medium", "large"]))
    body = {"model": "auto", "messages": MSG, "max_tokens": 200, "stream": True}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", router.base_url + "/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        next(r.iter_raw())
    wait_until(lambda: router.runtime.load.in_flight("small") == 0)
    used = router.runtime.ledger.snapshot()["models"]["small"]
    assert used["in_flight"] == 0 and 0 < used["used"] < 200  # charged what was generated, hold released
    assert metric(router, 'tollway_requests_total{model="small",outcome="cancelled"') == 1
