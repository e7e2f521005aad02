"""Overload: a request rate ramping from below to 10x the strongest model's capacity.

    .venv/bin/python benchmarks/overload.py           # ~6 min on 2 cores
    .venv/bin/python benchmarks/overload.py --quick   # ~1.5 min smoke run

Three simulated models of different quality and capacity (`tollway simulate`, one process each):

| name   | history profile              | seqs | tokens/s per seq | capacity (8 tokens) |
|--------|------------------------------|------|------------------|---------------------|
| strong | gpt-4-1106-preview           | 2    | 16               | ~4 req/s            |
| medium | mistralai/mixtral-8x7b-chat  | 8    | 20               | ~20 req/s           |
| weak   | mistralai/mistral-7b-chat    | 32   | 32               | ~128 req/s          |

The strong model's capacity is measured first (closed loop, twice its sequence slots); the ramp
is then 0.5x, 1x, 2x, 4x, 6x, 8x, 10x of it, an open loop (arrivals evenly spaced, sent whether
or not earlier requests ended), streamed, prompts drawn from the shipped history. Three arms,
each on freshly started simulators:

- static:          every request straight to the strong model (what a fixed route does);
- static+shedding: every request pinned to the strong model through tollway's router, which
                   answers 429 when the strong model is saturated (admission control alone);
- tollway:         `model: auto` through tollway's router, degrade mode: the best-ranked model
                   with room serves, 429 only when none has room.

Per step: share of offered requests answered within the SLO (complete stream, time to first
token <= --slo-ttft), quality served (the shipped history's score of the serving model on that
prompt; mean over answered requests, and summed over within-SLO answers per offered request),
sheds (429), other errors, and the serving-model mix.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    ManagedProcess,
    Outcome,
    Step,
    closed_loop,
    fmt,
    make_client,
    markdown_table,
    new_figure,
    open_loop,
    send_chat,
    start_router,
    start_simulator,
    write_report,
)

MAX_TOKENS = 8
MODELS: dict[str, dict[str, Any]] = {
    "strong": {
        "profile": "gpt-4-1106-preview",
        "flags": {"max-num-seqs": 2, "decode-tokens-per-second": 16, "max-decode-throughput": 32},
    },
    "medium": {
        "profile": "mistralai/mixtral-8x7b-chat",
        "flags": {"max-num-seqs": 8, "decode-tokens-per-second": 20, "max-decode-throughput": 160},
    },
    "weak": {
        "profile": "mistralai/mistral-7b-chat",
        "flags": {"max-num-seqs": 32, "decode-tokens-per-second": 32, "max-decode-throughput": 1024},
    },
}
COMMON_FLAGS = {"ttft-ms": 20, "prefill-tokens-per-second": 50000, "seed": 7}
IN_FLIGHT_PER_SLOT_PAIR = 3
"""Router in-flight limit per 2 sequence slots (2 running + 1 queued): see router_config()."""
MULTIPLES = (0.5, 1, 2, 4, 6, 8, 10)
ARMS = ("static", "static+shedding", "tollway")


def router_config(sims: dict[str, str]) -> dict[str, Any]:
    """The router's in-flight limit is maxInFlightPerReplica x replicas, so `replicas` is set to the
    simulator's sequence slots / 2: a pool of identical 2-slot replicas behind one URL."""
    return {
        "backends": [
            {
                "name": name,
                "url": url,
                "profile": MODELS[name]["profile"],
                "replicas": max(1, MODELS[name]["flags"]["max-num-seqs"] // 2),
            }
            for name, url in sims.items()
        ],
        "degradation": {
            "mode": "degrade",
            "maxInFlightPerReplica": IN_FLIGHT_PER_SLOT_PAIR,
            "maxWaitingPerReplica": 1,
            "scrapeIntervalSeconds": 0.25,
            "staleAfterSeconds": 2,
            "retryAfterSeconds": 1,
        },
    }


class Workload:
    """History prompts with their per-model quality scores."""

    def __init__(self, n: int, seed: int = 0) -> None:
        from router_service.routing.history import load_builtin_history

        history = load_builtin_history("history")
        rows = list(range(len(history)))
        random.Random(seed).shuffle(rows)
        self.rows = rows[:n]
        self.prompts = [history.prompts[r][:6000] for r in self.rows]
        self.scores = {
            name: [float(history.scores[r, history.model_index(spec["profile"])]) for r in self.rows]
            for name, spec in MODELS.items()
        }

    def __len__(self) -> int:
        return len(self.rows)


def start_sims(log_dir: Path) -> tuple[list[ManagedProcess], dict[str, str]]:
    procs, urls = [], {}
    for name, spec in MODELS.items():
        proc, url = start_simulator(name, log_dir, flags={**COMMON_FLAGS, **spec["flags"]})
        procs.append(proc)
        urls[name] = url
    return procs, urls


async def measure_capacity(url: str, work: Workload, seconds: float) -> float:
    """Completed requests/s of the strong model under a closed loop of 2x its slots."""
    conc = 2 * MODELS["strong"]["flags"]["max-num-seqs"]
    async with make_client(conc, timeout=60) as client:

        async def one(i: int, t0: float) -> Outcome:
            return await send_chat(
                client,
                url,
                model="strong",
                prompt=work.prompts[i % len(work)],
                max_tokens=MAX_TOKENS,
                stream=False,
                t0=t0,
            )

        await closed_loop(one, concurrency=conc, total=conc * 2, max_seconds=10)
        outcomes, wall = await closed_loop(one, concurrency=conc, total=100_000, max_seconds=seconds)
    return sum(o.ok for o in outcomes) / wall


async def run_arm(arm: str, url: str, work: Workload, steps: list[Step], deadline: float) -> list[Outcome]:
    model = "auto" if arm == "tollway" else "strong"
    async with make_client(2000, timeout=deadline) as client:

        async def one(i: int, t0: float) -> Outcome:
            k = i % len(work)
            out = await send_chat(
                client,
                url,
                model=model,
                prompt=work.prompts[k],
                max_tokens=MAX_TOKENS,
                stream=True,
                t0=t0,
                deadline=deadline,
            )
            out.meta["row"] = k
            return out

        return await open_loop(one, steps, max_in_flight=2000, drain_seconds=deadline + 5)


def step_stats(outcomes: list[Outcome], work: Workload, slo: float, step: Step) -> dict[str, Any]:
    offered = len(outcomes)
    answered = [o for o in outcomes if o.ok]
    within = [o for o in answered if o.ttft is not None and o.ttft <= slo]
    served_by = Counter(o.headers.get("x-tollway-model") or "strong" for o in answered)

    def quality(o: Outcome) -> float:
        return work.scores[o.headers.get("x-tollway-model") or "strong"][o.meta["row"]]

    errors = Counter(o.error or str(o.status) for o in outcomes if not o.ok)
    return {
        "step": step.tag,
        "rate": step.rate,
        "offered": offered,
        "answered": len(answered),
        "within_slo": len(within),
        "within_slo_share": len(within) / offered if offered else float("nan"),
        "quality_answered": sum(map(quality, answered)) / len(answered) if answered else float("nan"),
        "quality_per_offered": sum(map(quality, within)) / offered if offered else float("nan"),
        "sheds": errors.get("429", 0),
        "errors": {k: v for k, v in errors.items() if k != "429"},
        "served_by": dict(served_by),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Workload(1500)
    base_dir = Path(tempfile.mkdtemp(prefix="tollway-bench-overload-"))
    procs, sims = start_sims(base_dir / "calibration")
    try:
        capacity = asyncio.run(measure_capacity(sims["strong"], work, args.calibrate_seconds))
    finally:
        for p in procs:
            p.stop()
    print(f"strong model capacity: {capacity:.2f} req/s", flush=True)
    steps = [Step(f"{m:g}x", m * capacity, args.step_seconds) for m in MULTIPLES]
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in args.arms:
        log_dir = base_dir / arm
        procs, sims = start_sims(log_dir)
        try:
            if arm == "static":
                url = sims["strong"]
            else:
                router, url = start_router(router_config(sims), log_dir)
                procs.append(router)
            outcomes = asyncio.run(run_arm(arm, url, work, steps, args.deadline))
        finally:
            for p in reversed(procs):
                p.stop()
        by_step = {s.tag: [o for o in outcomes if o.tag == s.tag] for s in steps}
        results[arm] = [step_stats(by_step[s.tag], work, args.slo_ttft, s) for s in steps]
        for row in results[arm]:
            print(
                f"{arm:16s} {row['step']:>4s} rate={row['rate']:6.1f} offered={row['offered']:4d} "
                f"within={row['within_slo_share']:.3f} q={row['quality_answered']:.3f} sheds={row['sheds']} "
                f"err={row['errors']} by={row['served_by']}",
                flush=True,
            )
    return {
        "capacity_strong_req_s": capacity,
        "steps": [{"tag": s.tag, "rate": s.rate, "seconds": s.seconds} for s in steps],
        "arms": results,
        "settings": {
            "slo_ttft_s": args.slo_ttft,
            "client_deadline_s": args.deadline,
            "max_tokens": MAX_TOKENS,
            "models": MODELS,
            "simulator_common_flags": COMMON_FLAGS,
            "router_degradation": router_config({n: "" for n in MODELS})["degradation"],
        },
    }


def report(data: dict[str, Any], out_dir: Path) -> Path:
    arms = data["arms"]
    s = data["settings"]
    rows = []
    for arm, steps in arms.items():
        for r in steps:
            rows.append(
                [
                    arm,
                    r["step"],
                    fmt(r["rate"], 1),
                    r["offered"],
                    f"{100 * r['within_slo_share']:.1f}%",
                    fmt(r["quality_answered"], 3),
                    fmt(r["quality_per_offered"], 3),
                    r["sheds"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "-",
                    ", ".join(f"{k}: {v}" for k, v in sorted(r["served_by"].items())),
                ]
            )
    table = markdown_table(
        [
            "arm",
            "step",
            "req/s",
            "offered",
            "within SLO",
            "quality (answered)",
            "quality per offered",
            "sheds (429)",
            "other errors",
            "served by",
        ],
        rows,
    )
    verdict = []
    for arm, steps in arms.items():
        low = [r for r in steps if r["within_slo_share"] < 0.95]
        worst = min(steps, key=lambda r: r["within_slo_share"])
        verdict.append(
            f"- {arm}: >= 95% within SLO at {len(steps) - len(low)} of {len(steps)} steps; worst "
            f"{100 * worst['within_slo_share']:.1f}% at {worst['step']}."
        )
    ramp = ", ".join(f"{st['tag']} ({st['rate']:.1f}/s)" for st in data["steps"])
    body = "\n".join(
        [
            "## Setup",
            "",
            f"- Strong model capacity measured first: **{data['capacity_strong_req_s']:.2f} req/s** "
            f"(closed loop, non-streamed, {s['max_tokens']} completion tokens).",
            f"- Ramp: {ramp}, "
            f"{data['steps'][0]['seconds']:g} s each, open loop, streamed; SLO: time to first token <= "
            f"{s['slo_ttft_s']:g} s and a complete stream; client gives up after {s['client_deadline_s']:g} s.",
            "- Models (`tollway simulate` flags): "
            + "; ".join(f"{n}: {m['profile']}, {m['flags']}" for n, m in s["models"].items())
            + f"; all with {s['simulator_common_flags']}.",
            f"- Router degradation settings: {s['router_degradation']}; `replicas` = sequence slots / 2, "
            "so the in-flight limit per backend is 1.5x its slots.",
            "- Quality is the shipped RouterBench history's score of the serving model on the prompt "
            "(gpt-4 0.88, mixtral 0.74, mistral-7b 0.58 on average). 'quality per offered' counts only "
            "answers within the SLO, so shed and late requests count 0.",
            "- Load generator, router and the three simulators share this machine's cores.",
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
    fig, axes = new_figure(3, 1, size=(5.0, 3.6))
    colors = {"static": "tab:red", "static+shedding": "tab:orange", "tollway": "tab:blue"}
    for arm, steps in arms.items():
        xs = [float(r["step"].rstrip("x")) for r in steps]
        axes[0][0].plot(
            xs, [100 * r["within_slo_share"] for r in steps], marker="o", color=colors[arm], label=arm
        )
        axes[0][1].plot(
            xs, [r["quality_per_offered"] for r in steps], marker="o", color=colors[arm], label=arm
        )
        axes[0][2].plot(
            xs,
            [100 * r["sheds"] / max(r["offered"], 1) for r in steps],
            marker="o",
            color=colors[arm],
            label=arm,
        )
    axes[0][0].axhline(95, color="gray", ls=":", lw=1)
    titles = ("% within TTFT SLO", "quality per offered request", "% shed (429)")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_xlabel("offered load / strong model capacity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    paths = write_report(
        "overload",
        title="Overload: static routing vs tollway best-effort",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )
    return paths["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/overload.py", description=__doc__.split("\n")[0])
    parser.add_argument("--step-seconds", type=float, default=12.0)
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="time-to-first-token SLO in seconds")
    parser.add_argument("--deadline", type=float, default=20.0, help="client timeout per request (s)")
    parser.add_argument("--calibrate-seconds", type=float, default=8.0)
    parser.add_argument("--arms", type=lambda v: v.split(","), default=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="short steps (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {ARMS}")
    if args.quick:
        args.step_seconds, args.calibrate_seconds, args.deadline = 4.0, 4.0, 10.0
    data = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
