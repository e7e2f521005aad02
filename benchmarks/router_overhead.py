"""Router overhead: what one hop through `tollway router` adds to a request, and requests/s.

    .venv/bin/python benchmarks/router_overhead.py           # ~4 min on 2 cores
    .venv/bin/python benchmarks/router_overhead.py --quick   # ~30 s smoke run

Three simulators (`tollway simulate`, a fast profile: the backend itself answers in about a
millisecond) and one `tollway router` run as separate processes on this machine. The same httpx
client code (`common.send_chat`) drives three targets, interleaved round by round so that drift
hits all of them alike:

- direct: the simulators themselves (round-robin over the three);
- pinned: through the router, `model` naming a backend (the proxy hop: parse, budget, load,
  upstream call, usage accounting);
- auto:   through the router, `model: auto` (plus the routing decision: hashed embedding, kNN over
  the shipped history, scoring, filters).

At 1 and 64 concurrent clients, streamed and not, it reports p50/p99 latency per target and the
added latency (target percentile minus direct percentile), and the requests/s each target
sustained at 64 clients. Results: benchmarks/results/router_overhead.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    closed_loop,
    fmt,
    make_client,
    markdown_table,
    new_figure,
    send_chat,
    start_router,
    start_simulator,
    summarize,
    write_report,
)

MODELS = {
    "small": "mistralai/mistral-7b-chat",
    "medium": "mistralai/mixtral-8x7b-chat",
    "large": "gpt-4-1106-preview",
}
SIM_FLAGS = {"speedup": 2000, "ttft-ms": 0, "max-num-seqs": 512, "kv-cache-tokens": 4_000_000}
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Which of these is a renewable energy source: coal, wind, natural gas, or oil?",
    "The trophy does not fit in the suitcase because it is too big. What is too big?",
    "Explain in one sentence why the sky is blue.",
]
MAX_TOKENS = 16


async def measure(
    base_url: str, model_cycle: Any, *, concurrency: int, total: int, stream: bool, tag: str
) -> tuple[list[Any], float]:
    client = make_client(concurrency, timeout=30)
    try:

        async def one(i: int, t0: float) -> Any:
            return await send_chat(
                client,
                base_url,
                model=next(model_cycle),
                prompt=PROMPTS[i % len(PROMPTS)],
                max_tokens=MAX_TOKENS,
                stream=stream,
                tag=tag,
                t0=t0,
                deadline=30,
            )

        # Warm the pools (connections, caches) before measuring.
        await closed_loop(one, concurrency=concurrency, total=concurrency * 2, max_seconds=30)
        return await closed_loop(one, concurrency=concurrency, total=total, max_seconds=120)
    finally:
        await client.aclose()


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    sims: dict[str, str] = {}
    procs = []
    for name in MODELS:
        proc, url = start_simulator(name, log_dir, flags=SIM_FLAGS)
        procs.append(proc)
        sims[name] = url
    config = {
        "servedModelName": "auto",
        "backends": [
            {
                "name": n,
                "url": sims[n],
                "profile": p,
                "price": {"inputPerMillionTokens": 1, "outputPerMillionTokens": 1},
            }
            for n, p in MODELS.items()
        ],
        "history": {"builtin": True},
        "budgets": {"windowSeconds": 3600, "tokens": {n: 10**12 for n in MODELS}},
        "degradation": {"maxInFlightPerReplica": 4096},
    }
    router, router_url = start_router(config, log_dir)
    procs.append(router)
    names = list(MODELS)
    points = [(1, args.n1), (64, args.n64)]
    results: dict[str, Any] = {}
    try:
        for stream in (False, True):
            for concurrency, total in points:
                key = f"{'stream' if stream else 'json'}-c{concurrency}"
                per_target: dict[str, list[Any]] = {"direct": [], "pinned": [], "auto": []}
                walls: dict[str, float] = {"direct": 0.0, "pinned": 0.0, "auto": 0.0}
                for _ in range(args.rounds):
                    for target in ("direct", "pinned", "auto"):
                        if target == "direct":
                            # Round-robin over the simulators, each at its own URL.
                            outs: list[Any] = []
                            wall = 0.0
                            for name in names:
                                o, w = await measure(
                                    sims[name],
                                    itertools.repeat(name),
                                    concurrency=concurrency,
                                    total=total // (len(names) * args.rounds),
                                    stream=stream,
                                    tag=target,
                                )
                                outs += o
                                wall += w
                        else:
                            cycle = itertools.cycle(names) if target == "pinned" else itertools.repeat("auto")
                            outs, wall = await measure(
                                router_url,
                                cycle,
                                concurrency=concurrency,
                                total=total // args.rounds,
                                stream=stream,
                                tag=target,
                            )
                        per_target[target] += outs
                        walls[target] += wall
                results[key] = {t: summarize(per_target[t], walls[t]) for t in per_target}
                direct = results[key]["direct"]["latency_ms"]
                for t in ("pinned", "auto"):
                    lat = results[key][t]["latency_ms"]
                    results[key][t]["added_ms"] = {q: lat[q] - direct[q] for q in ("p50", "p99")}
                print(
                    f"{key}: direct p50 {fmt(direct['p50'])} ms; "
                    + "; ".join(
                        f"{t} +{fmt(results[key][t]['added_ms']['p50'])} ms p50, "
                        f"+{fmt(results[key][t]['added_ms']['p99'])} ms p99, "
                        f"{fmt(results[key][t].get('ok_per_s'), 0)} req/s"
                        for t in ("pinned", "auto")
                    ),
                    flush=True,
                )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return results


def report(results: dict[str, Any]) -> None:
    rows = []
    for key, r in results.items():
        for t in ("direct", "pinned", "auto"):
            s = r[t]
            added = s.get("added_ms", {})
            rows.append(
                [
                    key,
                    t,
                    f"{s['ok']}/{s['requests']}",
                    fmt(s["latency_ms"]["p50"]),
                    fmt(s["latency_ms"]["p99"]),
                    fmt(added.get("p50")),
                    fmt(added.get("p99")),
                    fmt(s.get("ok_per_s"), 0),
                ]
            )
    table = markdown_table(
        ["point", "target", "ok", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "req/s"], rows
    )
    body = (
        "Added latency = the target's percentile minus the direct percentile at the same point. "
        "All processes (3 simulators, the router, the load generator) share this machine's cores, so "
        "requests/s at 64 clients is bounded by the machine, not by the router alone.\n\n" + table + "\n"
    )
    fig, axes = new_figure(ncols=2, size=(5.5, 3.8))
    for ax, stat in zip(axes[0], ("p50", "p99"), strict=True):
        keys = list(results)
        width = 0.38
        for i, t in enumerate(("pinned", "auto")):
            ax.bar(
                [k + (i - 0.5) * width for k in range(len(keys))],
                [results[k][t]["added_ms"][stat] for k in keys],
                width,
                label=t,
            )
        ax.set_xticks(range(len(keys)), keys, rotation=20)
        ax.set_ylabel(f"added latency {stat} (ms)")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.legend()
    fig.suptitle("tollway router: latency added over direct calls")
    paths = write_report(
        "router_overhead", title="Router overhead", body_md=body, data={"results": results}, figure=fig
    )
    print(table)
    print(f"wrote {paths['md']}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point")
    args = parser.parse_args(argv)
    args.n1, args.n64 = (150, 1200) if args.quick else (600, 3000)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
