"""How long a calibration takes to reach the router: push to in use, on one replica and on another.

A router (the built-in history, three backends borrowing RouterBench columns, the default hashed
embedder) takes the full built-in calibration set (1,892 lines) for each of its three models
through `POST /v1/tollway/calibration`, the way a calibration Job pushes it. Measured, in one run:

- **baseline**: the router's cold start (loading, embedding from the warm on-disk cache, index,
  prior dual-price fit: the same engine build a push triggers);
- **push -> in use**: the POST's latency, which returns once the receiving replica routes with the
  calibration (store write + a new engine generation), with the in-process store (state file)
  and with Redis;
- **other replica**: with two replicas sharing Redis, from the push to the first moment the other
  replica routes with it (its sync interval, 0.5 s by default, plus its own engine build);
- **restart**: a cold start with the three calibrations already in the store.

Rows are the built-in set's lines with RouterBench's own scores for the three profiles (what a
calibration against models that answer like them measures) and the history's token estimates.

    .venv/bin/python benchmarks/calibration_push.py [--repeats 3]

Writes benchmarks/results/calibration_push.{md,json,png}. Needs redis-server (.ci/setup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from common import markdown_table, write_report  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from router_service.calibration.dataset import load_dataset  # noqa: E402
from router_service.config import RouterConfig  # noqa: E402
from router_service.proxy.server import BackgroundRouter  # noqa: E402
from router_service.routing.history import CHARS_PER_TOKEN, load_builtin_history  # noqa: E402

POOL = {
    "small": "mistralai/mistral-7b-chat",
    "medium": "mistralai/mixtral-8x7b-chat",
    "large": "gpt-4-1106-preview",
}


def payloads() -> dict[str, dict[str, Any]]:
    """Per model, the push a calibration on the built-in set would send."""
    items = load_dataset("builtin").items
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    out = {}
    for name, profile in POOL.items():
        j = history.model_index(profile)
        rows = []
        for item in items:
            i = row[item.prompt]
            prompt_tokens = len(item.prompt) / CHARS_PER_TOKEN
            rows.append(
                {
                    "prompt": item.prompt,
                    "task": item.task,
                    "score": float(history.scores[i, j]),
                    "promptTokens": round(prompt_tokens),
                    "completionTokens": max(1.0, round(float(history.tokens[i, j]) - prompt_tokens)),
                }
            )
        out[name] = {"model": name, "revision": "bench", "dataset": "builtin", "rows": rows}
    return out


def config(tmp: Path, state: dict[str, Any] | None = None) -> RouterConfig:
    backends = [{"name": n, "url": f"http://127.0.0.1:9/{n}", "profile": p} for n, p in POOL.items()]
    doc: dict[str, Any] = {
        "backends": backends,
        "history": {"builtin": True},
        "budgets": {"stateFile": str(tmp / "ledger.json")},
        "degradation": {"scrapeIntervalSeconds": 60, "staleAfterSeconds": 120},
    }
    if state:
        doc["state"] = state
    return RouterConfig.model_validate(doc)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def start(cfg: RouterConfig) -> tuple[float, BackgroundRouter]:
    return timed(lambda: BackgroundRouter(cfg).start())


def push(router: BackgroundRouter, body: dict[str, Any]) -> float:
    seconds, resp = timed(lambda: httpx.post(router.url + "/v1/tollway/calibration", json=body, timeout=300))
    assert resp.status_code == 200 and resp.json()["inUse"], resp.text
    return seconds


def one_run(tmp: Path, bodies: dict[str, dict[str, Any]], redis: RedisServer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    local_dir = tmp / f"local-{uuid.uuid4().hex[:6]}"
    cold, router = start(config(local_dir))
    out["cold_start"] = cold
    try:
        out["push_local"] = [push(router, bodies[name]) for name in POOL]
    finally:
        router.stop(timeout=10)
    out["restart_with_calibrations"], router = start(config(local_dir))
    assert set(router.runtime.state.engine.calibrated) == set(POOL)
    router.stop(timeout=10)

    state = {"url": redis.url(), "key": f"bench/{uuid.uuid4().hex[:8]}", "syncIntervalSeconds": 0.5}
    _, a = start(config(tmp / f"a-{uuid.uuid4().hex[:6]}", state))
    _, b = start(config(tmp / f"b-{uuid.uuid4().hex[:6]}", state))
    try:
        out["push_redis"] = []
        out["other_replica"] = []
        for name in POOL:
            sent = time.perf_counter()
            out["push_redis"].append(push(a, bodies[name]))
            deadline = sent + 120
            while name not in b.runtime.state.engine.calibrated:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the other replica never routed with the calibration")
                time.sleep(0.01)
            out["other_replica"].append(time.perf_counter() - sent)
    finally:
        a.stop(timeout=10)
        b.stop(timeout=10)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bodies = payloads()
    push_bytes = {n: len(json.dumps(b).encode()) for n, b in bodies.items()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="tollway-push-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis").start()
        try:
            start(config(tmp / "warm"))[1].stop(timeout=10)  # warm the embedding cache once
            for i in range(args.repeats):
                runs.append(one_run(tmp, bodies, redis))
                print(f"run {i + 1}/{args.repeats}: {json.dumps(runs[-1])}", flush=True)
        finally:
            redis.stop()

    def median(key: str) -> float:
        values = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    base = median("cold_start")
    measures = [
        ("router cold start (baseline)", "cold_start"),
        ("push -> in use, in-process store", "push_local"),
        ("push -> in use, Redis", "push_redis"),
        ("push -> in use on the other replica (Redis)", "other_replica"),
        ("restart with 3 calibrations held", "restart_with_calibrations"),
    ]
    rows = [[label, f"{median(key):.2f}", f"{median(key) / base:.2f}x"] for label, key in measures]
    lines = len(bodies["small"]["rows"])
    body = "\n".join(
        [
            f"The built-in history ({len(load_builtin_history('history')):,} entries), 3 backends; each push is one "
            f"model's calibration on the built-in set: {lines:,} lines, "
            f"{statistics.mean(push_bytes.values()) / 1e6:.1f} MB of JSON (the prompts travel with the scores). "
            f"Medians of {args.repeats} runs x 3 models; ratios against the cold start in the same run.",
            "",
            markdown_table(["", "seconds (median)", "vs cold start"], rows),
            "",
            "A push returns once the receiving replica routes with the calibration: it parses the push, writes it "
            "to the store (the state file, or Redis) and builds a new engine generation off the request path (the "
            "cold start's engine build, plus the set's held-out lines, which the router's history lacks, embedded "
            "as entries). Another replica sharing Redis follows within its sync interval (0.5 s) plus its own "
            "build. A restart reads the held calibrations with the history. On this shared 2-core host the "
            "timings move with the load average above; the ratios less so.",
        ]
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [label for label, _ in measures]
    ax.barh(labels[::-1], [median(key) for _, key in measures][::-1], color="#4c72b0")
    ax.set_xlabel("seconds (median)")
    ax.set_title("calibration push: from POST to routed with")
    data = {
        "runs": runs,
        "push_bytes": push_bytes,
        "lines": lines,
        "medians": {k: median(k) for _, k in measures},
    }
    paths = write_report(
        "calibration_push",
        title="Calibration push: how fast results reach the router",
        body_md=body,
        data=data,
        figure=fig,
    )
    print(f"wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
