"""Autoscaler reaction time and flapping, against a real Prometheus scraping `tollway simulate`.

A closed-loop "cluster": `--max-replicas` `tollway simulate` processes are started up front; the
model's Deployment (in memory) runs the first N of them. Scaling it to N changes which servers
take traffic (the load generator round-robins over the live ones) and which Prometheus scrapes
(file_sd, so Prometheus sees replicas come and go as it would pods). The autoscaler is the
operator's own loop (`run_pool` + `PoolAutoscaler`) against that Prometheus, with
`metric: num_requests_waiting`.

1. Reaction: a light load (no queue), then a step to `--clients` concurrent clients at a random
   phase of the evaluation cycle; the time from the step to the first scale-up patch, in seconds
   and in evaluation intervals (target: <= 2). Repeated `--trials` times from 1 replica.
2. Flapping: `--clients` clients held steady for `--steady-seconds` from 1 replica. A flap is a
   scale-up after a scale-down, i.e. the pool growing back after shrinking (target: 0). The same run is repeated
   without the queue forecast (the running requests withheld from the decision) for comparison.

Run: `.venv/bin/python benchmarks/autoscaling_reaction.py` (about 4 minutes on 2 cores).
Results: benchmarks/results/autoscaling.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "autoscaling"))  # the Prometheus harness the tests use

import common  # noqa: E402
from harness import (  # noqa: E402
    AutoscalerLoop,
    ClosedLoopLoad,
    Job,
    LocalPrometheus,
    MemoryScaler,
    host_port,
)

from tollway_operator import autoscaling as decision  # noqa: E402
from tollway_operator.api import ModelPoolSpec  # noqa: E402
from tollway_operator.autoscaler import PoolAutoscaler  # noqa: E402

MODEL = "m"
POOL = "bench"
DEPLOYMENT = f"{POOL}-{MODEL}"


class Cluster:
    """N live replicas out of the started simulators; Prometheus and the load follow N."""

    def __init__(self, urls: list[str], prom: LocalPrometheus) -> None:
        self.urls = urls
        self.prom = prom
        self.live = 1
        self.timeline: list[tuple[float, int]] = []

    def scale(self, _name: str, replicas: int) -> None:
        self.live = max(0, min(replicas, len(self.urls)))
        self.timeline.append((time.monotonic(), replicas))
        self.prom.set_targets("vllm", [host_port(u) for u in self.urls[: self.live]])

    def targets(self) -> list[str]:
        return self.urls[: self.live]


class NoForecastAutoscaler(PoolAutoscaler):
    """The same autoscaler with the running requests withheld (the ablation of the forecast)."""

    async def _observe(self, *args: Any, **kwargs: Any) -> decision.Observation | None:
        obs = await super()._observe(*args, **kwargs)
        return None if obs is None else replace(obs, running=None)


def pool_spec(args: argparse.Namespace, prom_url: str) -> ModelPoolSpec:
    return ModelPoolSpec.model_validate(
        {
            "models": [{"name": MODEL, "model": "org/m", "replicas": {"min": 1, "max": args.max_replicas}}],
            "autoscaling": {
                "prometheusUrl": prom_url,
                "metric": "num_requests_waiting",
                "target": args.target,
                "tolerance": 0.1,
                "intervalSeconds": args.interval,
                "scaleUpStabilizationSeconds": 0,
                "scaleDownStabilizationSeconds": args.down_window,
            },
        }
    )


def start_loop(spec: ModelPoolSpec, scaler: MemoryScaler, forecast: bool = True) -> AutoscalerLoop:
    cls = PoolAutoscaler if forecast else NoForecastAutoscaler
    return AutoscalerLoop.start(cls(POOL, "default", scaler, query_timeout=2.0), spec, max_evaluations=10_000)


async def wait_quiet(prom: LocalPrometheus, timeout: float = 30.0) -> None:
    """Until Prometheus sees no request waiting or running anywhere."""
    deadline = time.monotonic() + timeout
    query = f"sum({decision.vllm_selector('num_requests_(running|waiting)', MODEL)})"
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(prom.query, query)
        if result and float(result[0]["value"][1]) == 0:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the simulators never went quiet")


async def reaction_trials(
    args: argparse.Namespace, cluster: Cluster, prom: LocalPrometheus
) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    spec = pool_spec(args, prom.url)
    trials = []
    for i in range(args.trials):
        cluster.scale(DEPLOYMENT, 1)
        await wait_quiet(prom)
        scaler = MemoryScaler({DEPLOYMENT: 1}, on_scale=cluster.scale)
        loop = start_loop(spec, scaler)
        light = ClosedLoopLoad(cluster.targets, MODEL, concurrency=1)
        light_task = asyncio.create_task(light.run(duration=120))
        # A few evaluations of light load, then the step at a random phase of the cycle.
        await asyncio.sleep(2 * args.interval + rng.uniform(0, args.interval))
        assert not scaler.patches, f"scaled before the step: {scaler.patches}"
        heavy = ClosedLoopLoad(cluster.targets, MODEL, concurrency=args.clients - 1)
        step = time.monotonic()
        heavy_task = asyncio.create_task(heavy.run(duration=120))
        deadline = step + 10 * args.interval
        while not scaler.patches and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for load in (light, heavy):
            load.stop()
        await asyncio.gather(light_task, heavy_task)
        await loop.close()
        if not scaler.patches:
            trials.append({"trial": i, "reaction_s": None, "to_replicas": None})
            continue
        at, _, to = scaler.patches[0]
        seconds = at - step
        trials.append(
            {
                "trial": i,
                "reaction_s": seconds,
                "reaction_intervals": seconds / args.interval,
                "to_replicas": to,
            }
        )
        print(
            f"trial {i}: scale-up patch {seconds:.2f}s after the step ({seconds / args.interval:.2f} intervals) -> {to}"
        )
    cluster.scale(DEPLOYMENT, 1)
    return trials


def flaps(series: list[int]) -> tuple[int, int]:
    """(changes, flaps). A flap is a scale-up that comes after a scale-down: the pool grew back
    after shrinking. (Up to max, then stepping down to the level the load needs, is settling.)"""
    changes = count = 0
    shrunk = False
    for a, b in itertools.pairwise(series):
        if a == b:
            continue
        changes += 1
        if b < a:
            shrunk = True
        elif shrunk:
            count += 1
    return changes, count


async def steady_run(
    args: argparse.Namespace, cluster: Cluster, prom: LocalPrometheus, forecast: bool
) -> dict[str, Any]:
    cluster.scale(DEPLOYMENT, 1)
    await wait_quiet(prom)
    cluster.timeline.clear()
    scaler = MemoryScaler({DEPLOYMENT: 1}, on_scale=cluster.scale)
    loop = start_loop(pool_spec(args, prom.url), scaler, forecast=forecast)
    load = ClosedLoopLoad(cluster.targets, MODEL, concurrency=args.clients)
    start = time.monotonic()
    load_task = asyncio.create_task(load.run(duration=args.steady_seconds))
    samples: list[tuple[float, int, float]] = []
    query = decision.waiting_query(MODEL)
    while not load_task.done():
        result = await asyncio.to_thread(prom.query, query)
        waiting = float(result[0]["value"][1]) if result else float("nan")
        samples.append((time.monotonic() - start, scaler.replicas[DEPLOYMENT], waiting))
        await asyncio.sleep(1.0)
    await load_task
    await loop.close()
    series = [1] + [p[2] for p in scaler.patches]
    changes, n_flaps = flaps(series)
    settle = (scaler.patches[-1][0] - start) if scaler.patches else 0.0
    label = "with forecast" if forecast else "without forecast"
    print(
        f"steady ({label}): replicas {series}, {changes} changes, {n_flaps} flaps, last change at {settle:.0f}s"
    )
    return {
        "forecast": forecast,
        "replica_series": series,
        "patch_times_s": [round(p[0] - start, 2) for p in scaler.patches],
        "changes": changes,
        "flaps": n_flaps,
        "last_change_s": settle,
        "final_replicas": scaler.replicas[DEPLOYMENT],
        "completed_requests": load.completed,
        "errors": load.errors,
        "samples": samples,
    }


def report(args: argparse.Namespace, trials: list[dict[str, Any]], steady: list[dict[str, Any]]) -> None:
    ok = [t["reaction_s"] for t in trials if t["reaction_s"] is not None]
    in_intervals = [s / args.interval for s in ok]
    summary = {
        "trials": len(trials),
        "reacted": len(ok),
        "reaction_s_mean": statistics.fmean(ok) if ok else None,
        "reaction_s_max": max(ok) if ok else None,
        "reaction_intervals_mean": statistics.fmean(in_intervals) if ok else None,
        "reaction_intervals_max": max(in_intervals) if ok else None,
        "target_intervals": 2.0,
        "meets_target": bool(ok) and len(ok) == len(trials) and max(in_intervals) <= 2.0,
        "flaps_with_forecast": next((s["flaps"] for s in steady if s["forecast"]), None),
        "flaps_without_forecast": next((s["flaps"] for s in steady if not s["forecast"]), None),
    }
    fig, axes = common.new_figure(ncols=2, size=(6.0, 3.8))
    ax = axes[0][0]
    ax.bar(range(len(trials)), [t["reaction_s"] or 0 for t in trials], color="tab:blue")
    for k in (1, 2):
        ax.axhline(
            k * args.interval, color="grey" if k == 1 else "red", ls="--", lw=1, label=f"{k} interval(s)"
        )
    ax.set_xlabel("trial")
    ax.set_ylabel("load step -> replica patch (s)")
    ax.set_title(f"Reaction (interval {args.interval}s, 1s scrapes)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for run, color in zip(steady, ("tab:green", "tab:orange"), strict=False):
        t = [s[0] for s in run["samples"]]
        label = "with forecast" if run["forecast"] else "without forecast"
        ax.step(t, [s[1] for s in run["samples"]], where="post", color=color, label=f"replicas ({label})")
        ax.plot(t, [s[2] for s in run["samples"]], color=color, alpha=0.35, lw=1, label=f"waiting ({label})")
    ax.set_xlabel("seconds under steady load")
    ax.set_title(f"{args.clients} clients, {args.max_num_seqs} slots/replica")
    ax.legend(fontsize=7)
    rows = [
        [t["trial"], common.fmt(t["reaction_s"]), common.fmt(t.get("reaction_intervals")), t["to_replicas"]]
        for t in trials
    ]
    steady_rows = [
        [
            "on" if s["forecast"] else "off",
            " -> ".join(map(str, s["replica_series"])),
            s["changes"],
            s["flaps"],
            common.fmt(s["last_change_s"], 0),
            s["final_replicas"],
            s["errors"],
        ]
        for s in steady
    ]
    body = f"""
Setup: {args.max_replicas} `tollway simulate` processes (max-num-seqs {args.max_num_seqs}, ~1 s per
{args.max_tokens}-token request), Prometheus 2.42 scraping every 1 s through file_sd (targets follow the
replica count), the operator's autoscaler loop (`run_pool`) with metric `num_requests_waiting`, target
{args.target:g}/replica, tolerance 0.1, interval {args.interval}s, up-window 0 s, down-window
{args.down_window}s, replicas 1..{args.max_replicas}. The in-memory Deployment decides which servers take
traffic and which Prometheus scrapes.

## Reaction: load step to the scale-up patch

1 client, then a step to {args.clients} at a random phase of the evaluation cycle (from 1 replica).
Target: within 2 evaluation intervals.

{common.markdown_table(["trial", "seconds", "intervals", "patched to"], rows)}

Mean {common.fmt(summary["reaction_s_mean"])} s = {common.fmt(summary["reaction_intervals_mean"])} intervals,
max {common.fmt(summary["reaction_s_max"])} s = {common.fmt(summary["reaction_intervals_max"])} intervals
(target <= 2: {"met" if summary["meets_target"] else "NOT met"}). The delay is at most one scrape (1 s), then
the wait for the next evaluation (up to one interval), plus the queries.

## Flapping under steady load

{args.clients} clients held for {args.steady_seconds}s from 1 replica. A flap is a scale-up after a
scale-down (the pool growing back after shrinking; going up to max and stepping down to what the load
needs is settling, not flapping). "forecast off" withholds the running requests from the decision (ablation of the
scale-down queue forecast).

{common.markdown_table(["forecast", "replicas", "changes", "flaps", "last change (s)", "final", "errors"], steady_rows)}
"""
    data = {"args": vars(args), "summary": summary, "trials": trials, "steady": steady}
    paths = common.write_report(
        "autoscaling", title="Autoscaler: reaction time and flapping", body_md=body, data=data, figure=fig
    )
    print(f"summary: {summary}")
    print("wrote", ", ".join(str(p) for p in paths.values()))


async def run(args: argparse.Namespace) -> None:
    flags = {
        "max-num-seqs": args.max_num_seqs,
        "decode-tokens-per-second": args.max_tokens,
        "max-decode-throughput": args.max_tokens * args.max_num_seqs,
        "metrics-format": "negotiate",
    }
    with tempfile.TemporaryDirectory(prefix="tollway-autoscaling-bench-") as tmp:
        procs = []
        urls = []
        try:
            for i in range(args.max_replicas):
                proc, url = common.start_simulator(MODEL, Path(tmp), flags={**flags, "seed": i})
                procs.append(proc)
                urls.append(url)
            prom = LocalPrometheus([Job("vllm", relabel=True)], workdir=Path(tmp))
            cluster = Cluster(urls, prom)
            with prom:
                cluster.scale(DEPLOYMENT, 1)
                await asyncio.to_thread(prom.wait_for, decision.waiting_query(MODEL), bool, 30.0)
                trials = await reaction_trials(args, cluster, prom)
                steady = [await steady_run(args, cluster, prom, forecast=True)]
                if not args.no_ablation:
                    steady.append(await steady_run(args, cluster, prom, forecast=False))
        finally:
            for proc in procs:
                proc.stop()
    report(args, trials, steady)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoscaling_reaction.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=2, help="autoscaling intervalSeconds")
    parser.add_argument("--down-window", type=int, default=10, help="scaleDownStabilizationSeconds")
    parser.add_argument("--target", type=float, default=2.0, help="waiting requests per replica")
    parser.add_argument("--max-replicas", type=int, default=6)
    parser.add_argument("--max-num-seqs", type=int, default=4, help="slots per simulated replica")
    parser.add_argument("--max-tokens", type=int, default=20, help="tokens per request (~1 s each)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients after the step")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steady-seconds", type=int, default=75)
    parser.add_argument("--no-ablation", action="store_true", help="skip the run without the forecast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
