"""Router replicas sharing one Redis: one budget for all, learning seen by all, Redis outages
served without 5xx and shown in /readyz, metrics and status."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from router_helpers import PROFILES, FixedEngine, router_config, wait_until

from router_service.proxy.server import BackgroundRouter
from router_service.proxy.tokens import chat_prompt_bound
from router_service.routing.history import History, write_jsonl

SYNC = 0.2  # state.syncIntervalSeconds in these tests
BOUND = 2 * SYNC  # the stated propagation bound: two sync intervals


def shared(urls: dict[str, str], redis_url: str, key: str, **overrides: object):
    """A config whose state lives in `redis_url` under `key`."""
    state = {"url": redis_url, "key": key, "syncIntervalSeconds": SYNC, "timeoutSeconds": 0.3}
    return router_config(urls, state=state, **overrides)


CHAT_BODY = {
    "model": "small",
    "messages": [{"role": "user", "content": "Say something short."}],
    "max_tokens": 16,
}


def chat(router: BackgroundRouter, model: str = "small", max_tokens: int = 16) -> httpx.Response:
    body = {**CHAT_BODY, "model": model, "max_tokens": max_tokens}
    return httpx.post(router.base_url + "/chat/completions", json=body, timeout=30)


def test_two_routers_spend_one_budget_together(urls, start_router, redis_server) -> None:
    key = f"test/{uuid.uuid4().hex[:8]}"
    budget = 600
    config = shared(urls, redis_server.url(), key, budgets={"tokens": {"small": budget}, "replicaShare": 0.5})
    a = start_router(config, engine=FixedEngine(["small"]))
    b = start_router(config, engine=FixedEngine(["small"]))
    served: list[int] = []
    statuses: list[int] = []
    for i in range(80):  # 3 of 4 requests to a: uneven load, like keep-alive clients
        resp = chat(b if i % 4 == 3 else a)
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            served.append(resp.json()["usage"]["total_tokens"])
    assert set(statuses) <= {200, 429} and 429 in statuses  # demand > budget; never a 5xx
    assert sum(served) > budget / 2  # more than the static half a would have had alone
    for router in (a, b):
        wait_until(lambda router=router: router.runtime.store.health().pending_operations == 0)
    used = a.runtime.ledger.snapshot()["models"]["small"]
    assert used["budget"] == budget  # no per-replica split
    # Nothing lost or counted twice: what Redis settled is what the clients were told they used.
    settled = float(redis_server.client().hget(a.runtime.store.budget_key("small"), "settled"))
    assert settled == sum(served)
    # Spent to the end: admission reserves a request's worst case (the prompt's proven bound plus
    # max_tokens), so what is left unused is less than one such reservation.
    worst_case = chat_prompt_bound(CHAT_BODY) + CHAT_BODY["max_tokens"]
    assert budget - worst_case < settled <= budget


def test_redis_outage_is_served_without_5xx_and_shown_everywhere(urls, start_router, own_redis) -> None:
    server = own_redis()
    config = shared(urls, server.url(), "test/outage", budgets={"tokens": {"small": 100_000}})
    router = start_router(config, engine=FixedEngine(["small"]))
    assert chat(router).status_code == 200
    ready = httpx.get(router.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["state"]["mode"] == "shared"

    server.stop()
    statuses = [chat(router).status_code for _ in range(10)]
    assert statuses == [200] * 10
    ready = httpx.get(router.url + "/readyz")
    assert ready.status_code == 200  # still ready: serving on the local share
    state = ready.json()["state"]
    assert state["mode"] == "local-share" and not state["connected"] and state["localShare"]["small"] > 0
    metrics = httpx.get(router.url + "/metrics").text
    assert 'tollway_state_store_up{store="redis"} 0.0' in metrics
    assert "tollway_state_store_local_share_tokens" in metrics
    status = httpx.get(router.url + "/v1/tollway/status").json()
    assert status["state"]["pendingOperations"] > 0

    server.start()
    wait_until(lambda: httpx.get(router.url + "/readyz").json()["state"]["mode"] == "shared", timeout=10)
    wait_until(lambda: router.runtime.store.health().pending_operations == 0)
    assert 'tollway_state_store_up{store="redis"} 1.0' in httpx.get(router.url + "/metrics").text
    # This Redis kept nothing (no persistence): the router restored the usage it had seen and
    # wrote what it served meanwhile on top, so Redis holds every token served.
    used = float(server.client().hget(router.runtime.store.budget_key("small"), "used"))
    assert used == router.runtime.ledger.snapshot()["models"]["small"]["used"] > 0
    served = router.runtime.metrics.tokens
    assert used == sum(served.labels("small", kind)._value.get() for kind in ("prompt", "completion"))


# --- shared learning --------------------------------------------------------------------------------


def tiny_history(path: Path) -> Path:
    """Trivia that only `large` answers well, chit-chat that every model answers."""
    prompts, scores, tokens = [], [], []
    for c in range(30):
        prompts.append(f"what is the capital of country number {c}")
        scores.append([0.0, 0.0, 1.0])
        tokens.append([40.0, 40.0, 60.0])
        prompts.append(f"say hello to friend number {c}")
        scores.append([1.0, 1.0, 1.0])
        tokens.append([20.0, 20.0, 20.0])
    arr = np.array(tokens)
    history = History(
        prompts=prompts,
        models=list(PROFILES.values()),
        scores=np.array(scores),
        costs=arr * 1e-6,
        tokens=arr,
        eval_names=["t"] * len(prompts),
    )
    write_jsonl(history, path)
    return path


@pytest.fixture
def learning_config(urls, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    return shared(
        urls,
        redis_server.url(),
        f"test/{uuid.uuid4().hex[:8]}",
        history={"path": str(history), "learnFromTraffic": True},
        budgets={"tokens": {"large": 50_000, "medium": 50_000, "small": 50_000}},
    )


def history_size(router: BackgroundRouter) -> int:
    return httpx.get(router.url + "/v1/tollway/status").json()["engine"]["history_size"]


def test_feedback_on_one_router_is_in_every_routers_history_within_the_bound(
    learning_config, start_router
) -> None:
    a, b = start_router(learning_config), start_router(learning_config)
    before = history_size(b)
    body = {"prompt": "what is the capital of country number 99", "model": "small", "score": 1.0}
    resp = httpx.post(a.base_url + "/feedback", json=body)
    assert resp.status_code == 200 and resp.json() == {"accepted": True}
    sent = time.monotonic()
    assert history_size(a) == before + 1  # in this replica's history before the answer
    wait_until(lambda: history_size(b) == before + 1, timeout=5, interval=0.005)
    took = time.monotonic() - sent
    # Two sync intervals, plus scheduling slack for a busy CI machine.
    assert took <= BOUND + 0.5, f"feedback reached the other replica after {took:.2f} s"
    # A replica that starts later gets every learned entry before it serves.
    c = start_router(learning_config)
    assert history_size(c) == before + 1


def test_feedback_is_refused_when_learning_is_off(
    urls, redis_server, tmp_path, monkeypatch, start_router
) -> None:
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    config = shared(urls, redis_server.url(), f"test/{uuid.uuid4().hex[:8]}", history={"path": str(history)})
    router = start_router(config)
    before = history_size(router)
    body = {"prompt": "what is the capital of country number 99", "model": "small", "score": 1.0}
    resp = httpx.post(router.base_url + "/feedback", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "feedback_disabled", resp.text
    assert "learnFromTraffic" in resp.json()["error"]["message"]
    assert history_size(router) == before


def test_a_refit_on_one_router_is_adopted_by_the_others_within_the_bound(
    learning_config, start_router
) -> None:
    a, b = start_router(learning_config), start_router(learning_config)
    engine_a, engine_b = a.runtime.state.engine, b.runtime.state.engine
    fitted = engine_a.fit_duals({"large": 10.0, "medium": 1e6, "small": 1e6})  # large nearly spent
    assert fitted["large"] > 0 and fitted != engine_b.gamma
    started = time.monotonic()
    wait_until(lambda: engine_b.gamma == pytest.approx(fitted), timeout=5, interval=0.005)
    took = time.monotonic() - started
    assert took <= BOUND + 0.5, f"the re-fit reached the other replica after {took:.2f} s"
    status = httpx.get(b.url + "/v1/tollway/status").json()
    assert status["gamma"] == pytest.approx(fitted) and status["engine"]["gamma_adopted"] >= 1
    assert status["engine"]["fits"] == 0  # adopted, not fitted by b itself


def test_a_single_router_keeps_what_it_learned_across_a_restart(urls, start_router, tmp_path, monkeypatch):
    """The in-process store too: learned entries go to the state file and come back."""
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    config = router_config(
        urls,
        history={"path": str(history), "learnFromTraffic": True},
        budgets={"stateFile": str(tmp_path / "state" / "ledger.json")},
    )
    first = start_router(config)
    before = history_size(first)
    body = {"prompt": "say hello to friend number 99", "model": "large", "score": 0.0}
    assert httpx.post(first.base_url + "/feedback", json=body).json() == {"accepted": True}
    first.stop()
    second = start_router(config)
    assert history_size(second) == before + 1


def test_an_engine_rebuilt_by_a_reload_gets_the_learned_entries_before_it_serves(
    urls, start_router, tmp_path, monkeypatch
) -> None:
    import yaml

    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    config = router_config(urls, history={"path": str(history), "learnFromTraffic": True})
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config.to_wire()))
    router = start_router(path, reload_interval_seconds=0.05)
    before = history_size(router)
    body = {"prompt": "say hello to friend number 77", "model": "small", "score": 0.5}
    assert httpx.post(router.base_url + "/feedback", json=body).status_code == 200
    old_engine = router.runtime.state.engine
    wire = config.to_wire()
    wire["objective"] = {"alpha": 2.0}  # an engine input: the reload builds a new engine
    path.write_text(yaml.safe_dump(wire))
    wait_until(lambda: router.runtime.state.engine is not old_engine, timeout=30)
    assert history_size(router) == before + 1
