"""POST /v1/tollway/calibration: a pushed calibration is stored and routed with, without a restart;
it survives restarts (state file) and reaches every replica (Redis)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import yaml
from router_helpers import router_config, wait_until
from test_shared_state import SYNC, history_size, shared, tiny_history

from router_service.proxy.server import BackgroundRouter

TRIVIA = [f"what is the capital of country number {c}" for c in range(30)]
QUERY = "what is the capital of country number 12"


def push_body(model: str, score: float, revision: str = "r1", prompts: list[str] = TRIVIA) -> dict:
    return {
        "model": model,
        "revision": revision,
        "dataset": "test",
        "rows": [
            {"prompt": p, "task": "trivia", "score": score, "promptTokens": 12, "completionTokens": 5}
            for p in prompts
        ],
    }


def push(router: BackgroundRouter, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(router.url + "/v1/tollway/calibration", json=body, headers=headers, timeout=60)


def routed(router: BackgroundRouter, token: str | None = None) -> str:
    body = {"model": "auto", "messages": [{"role": "user", "content": QUERY}], "max_tokens": 8}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    resp = httpx.post(router.base_url + "/chat/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-tollway-model"]


def calibrated(router: BackgroundRouter) -> dict:
    return httpx.get(router.url + "/v1/tollway/status", timeout=10).json()["engine"]["calibrated"]


@pytest.fixture
def local_config(urls, tmp_path, monkeypatch):
    """The in-process store with a state file; the history says only `large` knows trivia."""
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    return router_config(
        urls,
        history={"path": str(history), "learnFromTraffic": True},
        budgets={"stateFile": str(tmp_path / "state" / "ledger.json")},
    )


def test_a_pushed_calibration_changes_routing_at_once_and_survives_a_restart(local_config, start_router):
    router = start_router(local_config)
    assert routed(router) == "large"  # the borrowed column: gpt-4 knows trivia
    # Measured: large (whatever it borrowed) gets trivia wrong, small gets it right.
    assert push(router, push_body("large", 0.0)).json()["inUse"] is True
    answer = push(router, push_body("small", 1.0)).json()
    assert answer == {
        "accepted": True,
        "model": "small",
        "revision": "r1",
        "lines": len(TRIVIA),
        "inUse": True,
        "detail": "in use",
    }
    assert routed(router) == "small"  # without a restart
    info = calibrated(router)["small"]
    assert info["revision"] == "r1" and info["history_rows_replaced"] == len(TRIVIA)
    # Feedback is learned into the same store, next to the calibrations.
    feedback = {"prompt": "say hello to friend number 99", "model": "medium", "score": 1.0}
    assert httpx.post(router.base_url + "/feedback", json=feedback).json() == {"accepted": True}
    size = history_size(router)
    router.stop()
    again = start_router(local_config)
    assert set(calibrated(again)) == {"small", "large"}
    assert history_size(again) == size  # the learned entry came back too
    assert routed(again) == "small"


def test_a_revision_the_backend_does_not_expect_is_kept_but_not_used(
    urls, tmp_path, monkeypatch, start_router
):
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    wire = router_config(urls, history={"path": str(history)}).to_wire()
    for backend in wire["backends"]:
        backend["calibrationRevision"] = "new-weights"
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(wire))
    router = start_router(path, reload_interval_seconds=0.05)
    old = push(router, push_body("small", 1.0, revision="old-weights")).json()
    assert old["inUse"] is False and "expects calibration revision 'new-weights'" in old["detail"]
    assert push(router, push_body("large", 0.0, revision="new-weights")).json()["inUse"] is True
    assert routed(router) in {"small", "medium"}  # large measured 0; small's stale 1.0 unused
    assert set(calibrated(router)) == {"large"}
    # The operator rolls the expected revision back (a config reload): the stored one is used.
    for backend in wire["backends"]:
        if backend["name"] == "small":
            backend["calibrationRevision"] = "old-weights"
    path.write_text(yaml.safe_dump(wire))
    wait_until(lambda: set(calibrated(router)) == {"small", "large"}, timeout=30)
    assert routed(router) == "small"
    # New weights: back to the profile until a calibration of the new revision arrives, then that.
    for backend in wire["backends"]:
        if backend["name"] == "small":
            backend["calibrationRevision"] = "v3"
    path.write_text(yaml.safe_dump(wire))
    wait_until(lambda: set(calibrated(router)) == {"large"}, timeout=30)
    assert push(router, push_body("small", 1.0, revision="v3")).json()["inUse"] is True
    assert calibrated(router)["small"]["revision"] == "v3"


def test_a_calibration_for_a_model_the_config_lacks_waits_for_it(local_config, start_router):
    router = start_router(local_config)
    answer = push(router, push_body("tiny", 1.0)).json()
    assert answer["accepted"] is True and answer["inUse"] is False
    assert "no backend of that name" in answer["detail"]
    listed = httpx.get(router.url + "/v1/tollway/calibration").json()["calibrations"]
    assert listed["tiny"]["lines"] == len(TRIVIA) and listed["tiny"]["inUse"] is False


def test_bad_pushes_are_refused_in_openai_shape(local_config, start_router):
    router = start_router(local_config)
    bad = push_body("small", 1.0)
    bad["rows"][3]["score"] = 1.5
    resp = push(router, bad)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "rows.3.score" in error["message"] and error["type"] == "invalid_request_error"
    assert push(router, {"model": "small", "rows": []}).status_code == 400
    assert calibrated(router) == {}


def test_pushes_need_the_routers_bearer_token(urls, tmp_path, monkeypatch, start_router):
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    history = tiny_history(tmp_path / "history.jsonl")
    config = router_config(urls, history={"path": str(history)}, auth={"bearerTokensFile": str(tokens)})
    router = start_router(config)
    assert push(router, push_body("small", 1.0)).status_code == 401
    assert push(router, push_body("small", 1.0), token="wrong").status_code == 401
    assert router.runtime.state.engine.calibrated == {} and router.runtime.store.calibrations() == {}
    assert push(router, push_body("small", 1.0), token="s3cret").json()["inUse"] is True


def test_a_calibration_pushed_to_one_replica_is_used_by_every_replica(
    urls, redis_server, tmp_path, monkeypatch, start_router
):
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    history = tiny_history(tmp_path / "history.jsonl")
    config = shared(urls, redis_server.url(), f"test/{uuid.uuid4().hex[:8]}", history={"path": str(history)})
    a, b = start_router(config), start_router(config)
    assert routed(b) == "large"
    assert push(a, push_body("large", 0.0)).json()["inUse"] is True
    assert push(a, push_body("small", 1.0)).json()["inUse"] is True
    sent = time.monotonic()
    wait_until(lambda: set(calibrated(b)) == {"small", "large"}, timeout=30, interval=0.02)
    took = time.monotonic() - sent
    assert took < 2 * SYNC + 10, f"the other replica routed with it after {took:.1f} s"
    assert routed(b) == "small"
    c = start_router(config)  # a replica started later is built with it
    assert set(calibrated(c)) == {"small", "large"} and routed(c) == "small"
