"""`tollway calibrate --push` hands each model's calibration to tollway routers; `--summary-file`
writes what a Kubernetes termination message can hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_calibrate import POOL, Start, backend_args, served, start_pool, write_set

from router_service.calibration.cli import main as calibrate
from router_service.calibration.dataset import CalibrationItem, load_dataset
from router_service.calibration.push import PushTarget, push
from router_service.calibration.report import SUMMARY_LIMIT_BYTES, compact_summary, fit_summary
from router_service.config import RouterConfig
from router_service.proxy.server import BackgroundRouter
from router_service.routing.history import History, load_builtin_history, write_jsonl


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def lines() -> tuple[list[CalibrationItem], History]:
    """24 lines of the built-in set and the true columns of the pool's models for them."""
    items = load_dataset("builtin").items[::80][:24]
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    return items, history.select([row[i.prompt] for i in items]).columns(list(POOL.values()))


@pytest.fixture
def pool_router(tmp_path: Path, lines: tuple[list[CalibrationItem], History], start_simulator: Start):
    """Three simulators answering like three RouterBench models, and a router over them whose
    history holds the same prompts with the pool's borrowed profile columns."""
    items, truth = lines
    sims = start_pool(start_simulator, tmp_path, items, truth)
    history = tmp_path / "history.jsonl"
    write_jsonl(truth, history)
    backends = [{"name": n, "url": s.url, "profile": POOL[n]} for n, s in sims.items()]
    tokens = tmp_path / "router-tokens"
    tokens.write_text("# the policy's client tokens\nt0ken\n")
    config = RouterConfig.model_validate(
        {
            "backends": backends,
            "history": {"path": str(history)},
            "auth": {"bearerTokensFile": str(tokens)},
            "budgets": {"stateFile": str(tmp_path / "state" / "ledger.json")},
        }
    )
    router = BackgroundRouter(config).start()
    yield items, truth, sims, router, tokens
    router.stop(timeout=10)


def test_each_models_calibration_reaches_the_router_and_the_summary_fits(tmp_path: Path, pool_router) -> None:
    items, truth, sims, router, tokens = pool_router
    summary_file = tmp_path / "termination-log"
    argv = ["--dataset", str(write_set(items, tmp_path / "set.jsonl")), *backend_args(sims)]
    argv += ["--out", str(tmp_path / "h.jsonl"), "--no-progress", "--revision", "small=abc123"]
    argv += ["--push", f"chat={router.url}", "--push-token-file", f"chat={tokens}"]
    assert calibrate([*argv, "--summary-file", str(summary_file)]) == 0

    engine = router.runtime.state.engine
    assert set(engine.calibrated) == set(POOL)
    assert engine.calibrated["small"]["revision"] == "abc123"
    assert all(info["history_rows_replaced"] == len(items) for info in engine.calibrated.values())
    stored = router.runtime.store.calibrations()
    for j, name in enumerate(POOL):  # every per-prompt score, as measured
        scores = {row.prompt: row.score for row in stored[name].rows}
        np.testing.assert_array_equal([scores[p] for p in truth.prompts], truth.scores[:, j])
        assert all(row.completion_tokens >= 1 and row.prompt_tokens > 0 for row in stored[name].rows)

    raw = summary_file.read_bytes()
    assert len(raw) <= SUMMARY_LIMIT_BYTES
    doc = json.loads(raw)
    assert doc["exit"] == 0
    small = doc["models"]["small"]
    assert small["revision"] == "abc123" and small["graded"] == small["lines"] == len(items)
    assert small["meanScore"] == pytest.approx(truth.scores[:, 0].mean(), abs=1e-4)
    for task, t in small["tasks"].items():
        rows = [k for k, i in enumerate(items) if i.task == task]
        assert t == {"graded": len(rows), "meanScore": pytest.approx(truth.scores[rows, 0].mean(), abs=1e-4)}
    assert sorted((p["model"], p["ok"], p["inUse"]) for p in doc["pushes"]) == [
        (m, True, True) for m in sorted(POOL)
    ]


def test_a_failed_push_exits_1_and_a_rerun_only_pushes(tmp_path: Path, pool_router, capsys) -> None:
    items, _, sims, router, tokens = pool_router
    argv = ["--dataset", str(write_set(items, tmp_path / "set.jsonl")), *backend_args(sims)]
    argv += ["--out", str(tmp_path / "h.jsonl"), "--no-progress", "--summary-file", str(tmp_path / "t.log")]
    # A wrong token is refused at once (retrying would not help).
    bad_token = tmp_path / "bad"
    bad_token.write_text("nope\n")
    assert calibrate([*argv, "--push", f"chat={router.url}", "--push-token-file", f"chat={bad_token}"]) == 1
    err = capsys.readouterr().err
    assert "pushed small (24 lines) to chat: FAILED: HTTP 401" in err and "rerun the same command" in err
    doc = json.loads((tmp_path / "t.log").read_text())
    assert doc["exit"] == 1 and not any(p["ok"] for p in doc["pushes"])
    assert router.runtime.store.calibrations() == {}

    before = {name: served(sim) for name, sim in sims.items()}
    assert calibrate([*argv, "--push", f"chat={router.url}", "--push-token-file", f"chat={tokens}"]) == 0
    assert {name: served(sim) for name, sim in sims.items()} == before  # nothing asked twice
    assert set(router.runtime.state.engine.calibrated) == set(POOL)


def test_an_unreachable_router_is_retried_then_reported() -> None:
    import httpx

    slept: list[float] = []
    payload = {"model": "small", "revision": "", "rows": [{"prompt": "p", "score": 1, "completionTokens": 1}]}
    with httpx.Client(timeout=2) as client:
        result = push(
            PushTarget("chat", closed_port_url()), payload, client=client, attempts=4, sleep=slept.append
        )
    assert not result.ok and "ConnectError" in result.detail and "after 4 attempts" in result.detail
    assert slept == [1.0, 2.0, 4.0]


def test_bad_push_arguments_and_bad_sets_leave_a_summary_saying_why(tmp_path: Path, capsys) -> None:
    summary_file = tmp_path / "t.log"
    argv = ["--dataset", str(tmp_path / "missing.jsonl"), "--backend", "small=http://127.0.0.1:1"]
    argv += ["--out", str(tmp_path / "h.jsonl"), "--summary-file", str(summary_file)]
    assert calibrate(argv) == 2
    doc = json.loads(summary_file.read_text())
    assert doc["exit"] == 2 and "missing.jsonl" in doc["error"]
    assert calibrate([*argv, "--push", "chat=ftp://x"]) == 2
    assert "expected an http(s) URL" in capsys.readouterr().err
    assert calibrate([*argv, "--push-token-file", "other=/x"]) == 2
    assert "which is no --push" in capsys.readouterr().err


def test_a_summary_with_many_tasks_is_cut_to_the_termination_message_limit() -> None:
    tasks = {
        f"task-{i:03d}-with-a-rather-long-name": {
            "lines": 1000 - i,
            "graded": 1000 - i,
            "failed_this_run": 0,
            "mean_score": 0.5,
        }
        for i in range(300)
    }
    model = {
        "revision": "r",
        "tasks": tasks,
        "graded": 1,
        "mean_score": 0.5,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "judge_tokens": 0,
    }
    doc = compact_summary({"models": {"small": model}, "run": {"seconds": 1.0}}, [], 0)
    assert len(json.dumps(doc, separators=(",", ":")).encode()) <= SUMMARY_LIMIT_BYTES
    kept = doc["models"]["small"]["tasks"]
    assert 0 < len(kept) < 300 and doc["models"]["small"]["tasksOmitted"] == 300 - len(kept)
    assert "task-000-with-a-rather-long-name" in kept  # the largest tasks are the ones kept
    assert fit_summary({"exit": 2, "error": "x" * 10_000})["error"] == "x" * 1000
