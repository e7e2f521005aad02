"""Replica routing: tollway's replica choice against what a Kubernetes Service does, same run.

    .venv/bin/python benchmarks/replica_routing.py            # ~6 min on 2 cores
    .venv/bin/python benchmarks/replica_routing.py --quick    # ~2 min smoke run

One model served by three `tollway simulate` replicas, one of them slow (`--slowdown`: every
simulated duration takes that many times longer, a throttled or shared GPU). The pool's capacity
is measured first: each replica alone, saturated by a closed loop, in requests per second; their
sum is the pool's. Then an open-loop load of streamed chat requests rises in steps to 90% of that
capacity, once for each replica picker, each behind its own `tollway router` (the same router,
the same config but `endpointPicker.strategy`, so every request pays the same proxy hop):

- least-loaded (tollway): the replica with the most room (running, waiting, KV cache; replicas
  with a free sequence slot and fresh metrics first);
- round-robin: every replica in turn, load ignored (a Service in IPVS round-robin mode);
- random: a replica at random (a Service in iptables mode).

Saturation limits are set high, so no request is refused: what differs is where requests wait.
Reported per strategy and per load step: TTFT p50/p99, end-to-end p99, requests per replica (from
`x-tollway-endpoint`). The target: TTFT p99 at least 50% lower than round robin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from common import (
    RESULTS,
    ManagedProcess,
    Outcome,
    Step,
    closed_loop,
    fmt,
    history_prompts,
    make_client,
    markdown_table,
    new_figure,
    open_loop,
    percentile,
    send_chat,
    start_router,
    start_simulator,
    write_report,
)

MODEL = "m"
PROFILE = "mistralai/mistral-7b-chat"  # any history column: the requests name the model
STRATEGIES = ("least-loaded", "round-robin", "random")
LABELS = {"least-loaded": "tollway (least-loaded)", "round-robin": "round robin", "random": "random"}
# A small GPU: 8 sequences at once, 40 tokens/s each, 160 tokens/s over a full batch.
SIM_FLAGS = {
    "max-num-seqs": 8,
    "decode-tokens-per-second": 40,
    "max-decode-throughput": 160,
    "prefill-tokens-per-second": 4000,
    "ttft-ms": 20,
}
TARGET_TTFT_P99_CUT = 0.5  # tollway's TTFT p99 at most half of round robin's


async def replica_capacity(url: str, texts: list[str], args: argparse.Namespace) -> float:
    """Requests per second one replica completes when saturated (closed loop, 2 x its slots)."""
    async with make_client(16, timeout=120) as client:

        async def one(i: int, t0: float) -> Outcome:
            return await send_chat(
                client,
                url,
                model=MODEL,
                prompt=texts[i % len(texts)],
                max_tokens=args.max_tokens,
                stream=True,
                t0=t0,
            )

        await closed_loop(one, concurrency=16, total=16, max_seconds=30)  # fill the batch
        outcomes, wall = await closed_loop(
            one, concurrency=16, total=10_000, max_seconds=args.capacity_seconds
        )
    return sum(o.ok for o in outcomes) / wall


async def drained(urls: list[str], timeout: float = 120.0) -> None:
    """Wait until no replica runs or queues anything (the last strategy's load is gone)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            busy = 0.0
            for url in urls:
                text = (await client.get(url + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                        busy += float(line.rsplit(" ", 1)[1])
            if busy == 0:
                return
            await asyncio.sleep(0.5)


async def run_load(
    router_url: str, steps: list[Step], texts: list[str], args: argparse.Namespace
) -> list[Outcome]:
    async with make_client(2000, timeout=300) as client:

        async def one(i: int, t0: float) -> Outcome:
            return await send_chat(
                client,
                router_url,
                model=MODEL,
                prompt=texts[i % len(texts)],
                max_tokens=args.max_tokens,
                stream=True,
                t0=t0,
                deadline=240,
            )

        async def announce(step: Step) -> None:
            print(f"    step {step.tag}: {step.rate:.1f} req/s for {step.seconds:.0f} s", flush=True)

        return await open_loop(one, steps, max_in_flight=2000, drain_seconds=240, on_step=announce)


def summary(outcomes: list[Outcome], names: dict[str, str]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft * 1000 for o in ok if o.ttft is not None]
    e2e = [o.latency * 1000 for o in ok if o.latency is not None]
    per_replica = Counter(names.get(o.headers.get("x-tollway-endpoint", ""), "?") for o in ok)
    failed = Counter(o.error or str(o.status) for o in outcomes if not o.ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": dict(failed),
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "e2e_ms": {"p50": percentile(e2e, 50), "p99": percentile(e2e, 99)},
        "per_replica": dict(sorted(per_replica.items())),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="tollway-bench-replicas-"))
    texts = history_prompts(2000, seed=0, max_chars=600)
    procs: list[ManagedProcess] = []
    try:
        urls: list[str] = []
        names: dict[str, str] = {}
        for i in range(3):
            flags: dict[str, Any] = {**SIM_FLAGS, "seed": i}
            slow = i == 2
            if slow:
                flags["slowdown"] = args.slowdown
            proc, url = start_simulator(MODEL, log_dir, flags=flags)
            procs.append(proc)
            urls.append(url)
            names[url] = f"replica {i} (slow x{args.slowdown:g})" if slow else f"replica {i}"
        print("measuring each replica's capacity (saturated, alone) ...", flush=True)
        capacity = {}
        for url in urls:
            capacity[names[url]] = asyncio.run(replica_capacity(url, texts, args))
            asyncio.run(drained(urls))
            print(f"    {names[url]}: {capacity[names[url]]:.2f} req/s", flush=True)
        pool = sum(capacity.values())
        steps = [Step(f"{int(f * 100)}%", f * pool, args.step_seconds) for f in args.load_steps]
        results: dict[str, Any] = {}
        order = list(STRATEGIES)
        for strategy in order:
            config = {
                "backends": [
                    {"name": MODEL, "urls": urls, "profile": PROFILE, "maxNumSeqs": SIM_FLAGS["max-num-seqs"]}
                ],
                "degradation": {
                    "maxWaitingPerReplica": 100_000,
                    "maxInFlightPerReplica": 100_000,
                    "maxKvCacheUsage": 1.0,
                    "scrapeIntervalSeconds": args.scrape_interval,
                },
                "endpointPicker": {"strategy": strategy},
                "server": {"upstreamTimeoutSeconds": 600, "firstByteTimeoutSeconds": 600},
            }
            asyncio.run(drained(urls))
            print(
                f"{LABELS[strategy]}: load rising to {args.load_steps[-1]:.0%} of {pool:.1f} req/s",
                flush=True,
            )
            router, router_url = start_router(config, log_dir, name=f"router-{strategy}")
            try:
                started = time.monotonic()
                outcomes = asyncio.run(run_load(router_url, steps, texts, args))
                wall = time.monotonic() - started
            finally:
                router.stop()
            by_step = {s.tag: summary([o for o in outcomes if o.tag == s.tag], names) for s in steps}
            results[strategy] = {"all": summary(outcomes, names), "steps": by_step, "wall_s": wall}
            top = results[strategy]["all"]
            print(
                f"    TTFT p50 {fmt(top['ttft_ms']['p50'], 0)} ms p99 {fmt(top['ttft_ms']['p99'], 0)} ms, "
                f"e2e p99 {fmt(top['e2e_ms']['p99'], 0)} ms, per replica {top['per_replica']}",
                flush=True,
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return {
        "capacity_req_s": capacity,
        "pool_capacity_req_s": pool,
        "steps": [{"tag": s.tag, "rate": s.rate, "seconds": s.seconds} for s in steps],
        "results": results,
        "settings": {
            "simulator_flags": SIM_FLAGS,
            "slowdown": args.slowdown,
            "max_tokens": args.max_tokens,
            "step_seconds": args.step_seconds,
            "scrape_interval_seconds": args.scrape_interval,
            "order": order,
        },
    }


def report(data: dict[str, Any], out_dir: Path) -> Path:
    results = data["results"]
    steps = [s["tag"] for s in data["steps"]]
    rows = []
    for strategy in STRATEGIES:
        r = results[strategy]
        for tag, s in [*r["steps"].items(), ("all", r["all"])]:
            rows.append(
                [
                    LABELS[strategy],
                    tag,
                    s["ok"],
                    sum(s["failed"].values()),
                    fmt(s["ttft_ms"]["p50"], 0),
                    fmt(s["ttft_ms"]["p99"], 0),
                    fmt(s["e2e_ms"]["p99"], 0),
                    ", ".join(f"{k}: {v}" for k, v in s["per_replica"].items()),
                ]
            )
    table = markdown_table(
        [
            "strategy",
            "load",
            "ok",
            "failed",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "e2e p99 ms",
            "requests per replica",
        ],
        rows,
    )
    ours, rr = results["least-loaded"], results["round-robin"]
    verdict = []
    for scope, a, b in (
        ("whole run", ours["all"], rr["all"]),
        (f"{steps[-1]} step", ours["steps"][steps[-1]], rr["steps"][steps[-1]]),
    ):
        cut = 1 - a["ttft_ms"]["p99"] / b["ttft_ms"]["p99"]
        met = cut >= TARGET_TTFT_P99_CUT
        verdict.append(
            f"- TTFT p99, {scope}: tollway {fmt(a['ttft_ms']['p99'], 0)} ms vs round robin "
            f"{fmt(b['ttft_ms']['p99'], 0)} ms: {cut:.0%} lower (target >= {TARGET_TTFT_P99_CUT:.0%}: "
            + ("**met**)." if met else f"**missed** by {TARGET_TTFT_P99_CUT - cut:.0%} points).")
        )
    rnd = results["random"]["all"]
    verdict.append(
        f"- Against random: TTFT p99 {fmt(ours['all']['ttft_ms']['p99'], 0)} vs {fmt(rnd['ttft_ms']['p99'], 0)} ms, "
        f"e2e p99 {fmt(ours['all']['e2e_ms']['p99'], 0)} vs {fmt(rnd['e2e_ms']['p99'], 0)} ms."
    )
    cap = data["capacity_req_s"]
    settings = data["settings"]
    body = "\n".join(
        [
            "## Setup",
            "",
            f"- One model, three `tollway simulate` replicas, flags {settings['simulator_flags']}; replica 2 with "
            f"`--slowdown {settings['slowdown']:g}` (every simulated duration {settings['slowdown']:g}x longer).",
            "- Capacity, each replica alone under a saturating closed loop: "
            + ", ".join(f"{k} {v:.2f} req/s" for k, v in cap.items())
            + f"; pool {data['pool_capacity_req_s']:.2f} req/s.",
            "- Load: open loop, streamed chat requests (prompts from the shipped history, "
            f"{settings['max_tokens']} completion tokens), steps "
            + ", ".join(f"{s['tag']} ({s['rate']:.1f} req/s)" for s in data["steps"])
            + f" of the pool's capacity, {settings['step_seconds']:g} s each; the same schedule for every strategy, "
            "one after the other, each behind its own `tollway router` (only `endpointPicker.strategy` differs), "
            "replicas drained in between.",
            f"- Router: scrape interval {settings['scrape_interval_seconds']:g} s, `maxNumSeqs: 8`, saturation limits "
            "off (nothing refused), model pinned by name (the replica choice alone).",
            f"- 1-minute load average at the start: {data.get('load_average_1m_at_start')} (a shared 2-core "
            "machine; the simulators and the load generator share it with the router).",
            "",
            "## Results",
            "",
            table,
            "",
            "## Verdict",
            "",
            *verdict,
            "",
        ]
    )
    fig, axes = new_figure(3, 1, size=(5.0, 3.8))
    colors = {"least-loaded": "tab:green", "round-robin": "tab:red", "random": "tab:gray"}
    xs = list(range(len(steps)))
    for strategy in STRATEGIES:
        r = results[strategy]["steps"]
        axes[0][0].plot(
            xs,
            [r[t]["ttft_ms"]["p99"] for t in steps],
            marker="o",
            color=colors[strategy],
            label=LABELS[strategy],
        )
        axes[0][1].plot(
            xs,
            [r[t]["e2e_ms"]["p99"] for t in steps],
            marker="o",
            color=colors[strategy],
            label=LABELS[strategy],
        )
    for ax, title in ((axes[0][0], "TTFT p99 (ms)"), (axes[0][1], "end-to-end p99 (ms)")):
        ax.set_xticks(xs, steps)
        ax.set_xlabel("load (share of pool capacity)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    replicas = sorted({k for s in STRATEGIES for k in results[s]["all"]["per_replica"]})
    width = 0.8 / len(STRATEGIES)
    for j, strategy in enumerate(STRATEGIES):
        counts = results[strategy]["all"]["per_replica"]
        axes[0][2].bar(
            [i + j * width for i in range(len(replicas))],
            [counts.get(k, 0) for k in replicas],
            width,
            color=colors[strategy],
            label=LABELS[strategy],
        )
    axes[0][2].set_xticks(
        [i + width for i in range(len(replicas))],
        [k.split(" (")[0] + (" slow" if "slow" in k else "") for k in replicas],
    )
    axes[0][2].set_title("requests per replica (whole run)")
    paths = write_report(
        "replica_routing",
        title="Replica routing: tollway vs round robin vs random",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )
    return paths["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/replica_routing.py", description=__doc__.split("\n")[0])
    parser.add_argument("--slowdown", type=float, default=4.0, help="how much slower the slow replica is")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--step-seconds", type=float, default=25.0)
    parser.add_argument(
        "--load-steps", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5, 0.7, 0.9]
    )
    parser.add_argument("--capacity-seconds", type=float, default=15.0, help="closed loop per replica")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="short steps (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the report goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.step_seconds, args.capacity_seconds = 8.0, 6.0
    data: dict[str, Any] = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
