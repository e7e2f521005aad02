"""`tollway demo`: the whole stack on one machine, against "always the strongest model".

    tollway demo                       # ~2 minutes: replay, table, ./tollway-demo.png
    tollway demo --duration 40 --json summary.json
    tollway demo --serve --port 8080   # keep simulators + router up for any OpenAI client

What it does, per policy, on fresh processes: start one vLLM-compatible simulator per model of
the example ModelPool (manifests/examples/modelpool.yaml: small / medium / large with their
prices; the large one is the strongest and the most expensive, with the least capacity) and a
`tollway router` configured from the example RoutingPolicy, with the routing history shipped in
the package. Then it replays held-out prompts of the shipped RouterBench data (the "stream" split,
never seen by the router's history) through the official `openai` client at a request rate that
rises from `--start-rate` to `--end-rate`.

- tollway:   clients send `model: auto`: the router picks by estimated quality against priced
             budget, and degrades to the next-best model when one is saturated or out of budget.
- strongest: clients pin `model: large` through the same router with the same budgets (so
             budgets and load shedding are enforced alike; only the routing differs).

A request counts as served within SLO when it got an answer within `--slo` seconds; refused
requests (429/503) count as shed. Quality is the prompt's true RouterBench score for the model
that answered it (the data carries every model's graded answer); cost is the usage at the
ModelPool's prices. Every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "manifests" / "examples"

# Used when the example manifests are not next to the package (an installed wheel).
FALLBACK_MODELS = [
    {
        "name": "small",
        "profile": "mistralai/mistral-7b-chat",
        "cost": {"inputPerMillionTokens": 0.2, "outputPerMillionTokens": 0.2},
    },
    {
        "name": "medium",
        "profile": "mistralai/mixtral-8x7b-chat",
        "cost": {"inputPerMillionTokens": 0.6, "outputPerMillionTokens": 0.6},
    },
    {
        "name": "large",
        "profile": "gpt-4-1106-preview",
        "cost": {"inputPerMillionTokens": 10.0, "outputPerMillionTokens": 30.0},
    },
]

# Simulated capacity by size rank (cheapest first): the strongest model serves the fewest at once.
CAPACITY = [
    {"max_num_seqs": 48, "decode_tokens_per_second": 120.0, "prefill_tokens_per_second": 40000.0},
    {"max_num_seqs": 24, "decode_tokens_per_second": 70.0, "prefill_tokens_per_second": 20000.0},
    {"max_num_seqs": 4, "decode_tokens_per_second": 20.0, "prefill_tokens_per_second": 6000.0},
]
# Share of the replay's expected tokens each model may spend (cheapest first).
BUDGET_SHARE = [1.2, 0.6, 0.4]
PRIORITY_MIX = [("critical", 0.1), ("standard", 0.7), ("sheddable", 0.2)]


# --- the scenario -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    profile: str
    input_price: float
    output_price: float


def example_models() -> list[ModelSpec]:
    """The example ModelPool's models, cheapest first."""
    path = EXAMPLES / "modelpool.yaml"
    models = FALLBACK_MODELS
    if path.is_file():
        spec = yaml.safe_load(path.read_text()).get("spec", {})
        models = spec.get("models") or FALLBACK_MODELS
    out = [
        ModelSpec(
            name=m["name"],
            profile=m["profile"],
            input_price=float(m.get("cost", {}).get("inputPerMillionTokens", 0.0)),
            output_price=float(m.get("cost", {}).get("outputPerMillionTokens", 0.0)),
        )
        for m in models
    ]
    return sorted(out, key=lambda m: m.input_price + m.output_price)


def example_policy() -> dict[str, Any]:
    """The example RoutingPolicy's spec (objective, embedding, ann, learning, degradation)."""
    path = EXAMPLES / "routingpolicy.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()).get("spec", {})
    return {"objective": {"alpha": 1.0, "algorithm": "tollway"}, "embedding": {"kind": "hashed"}}


@dataclass(frozen=True)
class Job:
    """One request of the replay."""

    at: float  # seconds after the replay starts
    prompt_row: int
    max_tokens: int
    priority: str
    stream: bool


def arrivals(duration: float, start_rate: float, end_rate: float, rng: np.random.Generator) -> list[float]:
    """Poisson arrivals whose rate rises linearly from start_rate to end_rate over `duration`."""
    times: list[float] = []
    t = 0.0
    peak = max(start_rate, end_rate)
    while True:  # thinning: draw at the peak rate, keep with probability rate(t)/peak
        t += float(rng.exponential(1.0 / peak))
        if t >= duration:
            return times
        if rng.random() <= (start_rate + (end_rate - start_rate) * t / duration) / peak:
            times.append(t)


def build_jobs(history: Any, duration: float, start_rate: float, end_rate: float, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    times = arrivals(duration, start_rate, end_rate, rng)
    rows = rng.permutation(len(history))
    completion = np.clip(history.completion_tokens, 8, 256).max(axis=1)
    names, weights = zip(*PRIORITY_MIX, strict=True)
    jobs = []
    for i, t in enumerate(times):
        row = int(rows[i % len(rows)])
        jobs.append(
            Job(
                at=t,
                prompt_row=row,
                max_tokens=int(completion[row]),
                priority=str(rng.choice(names, p=weights)),
                stream=bool(rng.random() < 0.25),
            )
        )
    return jobs


def router_config(
    models: list[ModelSpec],
    urls: Mapping[str, str | list[str]],
    policy: dict[str, Any],
    budgets: dict[str, int],
    window: float,
    expected: int,
) -> dict[str, Any]:
    learning = dict(policy.get("learning", {}))
    learning.update({"expectedQueries": max(1, expected), "refitEvery": max(20, expected // 10)})
    degradation = dict(policy.get("degradation", {}))
    degradation.update(
        {
            "scrapeIntervalSeconds": 0.25,
            "staleAfterSeconds": 2.0,
            "maxWaitingPerReplica": 3,
            "maxInFlightPerReplica": 64,
        }
    )
    return {
        "servedModelName": policy.get("servedModelName", "auto"),
        "backends": [
            {
                "name": m.name,
                **_addresses(urls[m.name]),
                "profile": m.profile,
                "price": {"inputPerMillionTokens": m.input_price, "outputPerMillionTokens": m.output_price},
                "maxNumSeqs": CAPACITY[min(rank, len(CAPACITY) - 1)]["max_num_seqs"],
            }
            for rank, m in enumerate(models)
        ],
        "objective": policy.get("objective", {}),
        "history": {"builtin": True},
        "embedding": policy.get("embedding", {"kind": "hashed"}),
        "ann": policy.get("ann", {}),
        "learning": learning,
        "degradation": degradation,
        "budgets": {"windowSeconds": window, "tokens": budgets},
        "server": {"upstreamTimeoutSeconds": 60, "drainSeconds": 2},
    }


def _addresses(urls: str | list[str]) -> dict[str, Any]:
    """A backend's `url`, or its `urls` when it runs several replicas (the router picks among them)."""
    if isinstance(urls, str):
        return {"url": urls}
    return {"urls": urls} if len(urls) > 1 else {"url": urls[0]}


# --- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """Simulators + one router as child processes; `close()` stops every one of them."""

    def __init__(self, models: list[ModelSpec], speedup: float, log_dir: Path) -> None:
        self.models = models
        self.speedup = speedup
        self.log_dir = log_dir
        self.sims: dict[tuple[str, int], Any] = {}  # by (model, replica)
        self.router: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self._router_log: Any = None

    def start_simulators(self, replicas: int = 1) -> dict[str, list[str]]:
        """`replicas` simulators per model; their URLs by model."""
        from router_service.simulator.profile import SimulatorProfile
        from router_service.simulator.server import SimulatorProcess

        errors: list[BaseException] = []

        def start(rank: int, m: ModelSpec, replica: int) -> None:
            cap = CAPACITY[min(rank, len(CAPACITY) - 1)]
            seed = rank + 100 * replica
            profile = SimulatorProfile(model=m.name, speedup=self.speedup, seed=seed, ttft_ms=20, **cap)
            try:
                self.sims[m.name, replica] = SimulatorProcess(profile).start()
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=start, args=(i, m, r))
            for i, m in enumerate(self.models)
            for r in range(replicas)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise RuntimeError(f"a simulator failed to start: {errors[0]}")
        return {m.name: [self.sims[m.name, r].url for r in range(replicas)] for m in self.models}

    def start_router(self, config: dict[str, Any], port: int | None = None, host: str = "127.0.0.1") -> str:
        import httpx

        path = self.log_dir / "router.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = port or free_port()
        self._router_log = (self.log_dir / "router.log").open("wb")
        self.router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router_service.proxy.server",
                "--config",
                str(path),
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=self._router_log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.router_url = f"http://{host}:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise RuntimeError(f"the router exited at start-up; see {self.log_dir / 'router.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.router_url + "/readyz", timeout=1).status_code == 200:
                    return self.router_url
            time.sleep(0.1)
        raise RuntimeError("the router did not become ready within 120 s")

    def close(self) -> None:
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(signal.SIGTERM)
            try:
                self.router.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.router.kill()
                self.router.wait(timeout=5)
        if self._router_log is not None:
            self._router_log.close()
        for sim in self.sims.values():
            with contextlib.suppress(Exception):
                sim.stop(timeout=5)
        self.sims.clear()


@contextlib.contextmanager
def running_stack(models: list[ModelSpec], speedup: float, log_dir: Path) -> Iterator[Stack]:
    stack = Stack(models, speedup, log_dir)
    try:
        yield stack
    finally:
        stack.close()


# --- the replay ------------------------------------------------------------------------------------


@dataclass
class Result:
    job: Job
    sent: float
    latency: float = math.nan
    status: int = 0
    code: str = ""
    model: str = ""
    route: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class PolicyRun:
    name: str
    results: list[Result] = field(default_factory=list)
    budget_samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    budgets: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


async def send(client: Any, job: Job, model: str, prompt: str, t0: float) -> Result:
    import openai

    res = Result(job=job, sent=time.monotonic() - t0)
    started = time.monotonic()
    headers = {"x-tollway-priority": job.priority}
    messages = [{"role": "user", "content": prompt}]
    try:
        if job.stream:
            async with client.chat.completions.with_streaming_response.create(
                model=model,
                messages=messages,
                max_tokens=job.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
            ) as response:
                res.model = response.headers.get("x-tollway-model", "")
                res.route = response.headers.get("x-tollway-route", "")
                async for chunk in await response.parse():
                    if chunk.usage is not None:
                        res.prompt_tokens = chunk.usage.prompt_tokens
                        res.completion_tokens = chunk.usage.completion_tokens
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=job.max_tokens, extra_headers=headers
            )
            res.model = raw.headers.get("x-tollway-model", "")
            res.route = raw.headers.get("x-tollway-route", "")
            completion = raw.parse()
            if completion.usage is not None:
                res.prompt_tokens = completion.usage.prompt_tokens
                res.completion_tokens = completion.usage.completion_tokens
        res.status = 200
    except openai.APIStatusError as exc:
        res.status = exc.status_code
        res.code = str(exc.code or "")
    except openai.APIError as exc:  # connection trouble, mid-stream error
        res.status = -1
        res.code = type(exc).__name__
    res.latency = time.monotonic() - started
    return res


async def replay(
    name: str, base_url: str, model: str, jobs: list[Job], prompts: list[str], progress: Any, task: Any
) -> PolicyRun:
    import httpx
    import openai

    run = PolicyRun(name)
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0, timeout=90.0)
    status_client = httpx.AsyncClient(timeout=2.0)
    t0 = time.monotonic()
    tasks: list[asyncio.Task[Result]] = []
    counts = {"served": 0, "degraded": 0, "shed": 0}

    def done(t: asyncio.Task[Result]) -> None:
        if t.cancelled():
            return
        if t.exception() is not None:
            progress.console.print(f"[red]request failed in the demo itself: {t.exception()!r}[/]")
            return
        r = t.result()
        if r.status == 200:
            counts["served"] += 1
            counts["degraded"] += r.route in {"degraded", "fallback"}
        elif r.status in (429, 503):
            counts["shed"] += 1
        progress.update(task, advance=1, **counts)

    async def sample_budgets() -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                status = (await status_client.get(base_url + "/v1/tollway/status")).json()
                models = status["budgets"]["models"]
                run.budget_samples.append((time.monotonic() - t0, {m: v["used"] for m, v in models.items()}))
                run.budgets = {m: v["budget"] for m, v in models.items() if v["budget"] is not None}
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_budgets())
    try:
        for job in jobs:
            delay = job.at - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(send(client, job, model, prompts[job.prompt_row], t0))
            t.add_done_callback(done)
            tasks.append(t)
        _, pending = await asyncio.wait(tasks, timeout=60) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        run.results = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for t in tasks:
            t.cancel()
        await client.close()
        await status_client.aclose()
    run.wall = time.monotonic() - t0
    return run


# --- results ----------------------------------------------------------------------------------------


def summarize(run: PolicyRun, history: Any, models: list[ModelSpec], slo: float) -> dict[str, Any]:
    col = {m.name: history.model_index(m.profile) for m in models}
    price = {m.name: (m.input_price, m.output_price) for m in models}
    served = [r for r in run.results if r.status == 200]
    within = [r for r in served if r.latency <= slo]
    quality = sum(float(history.scores[r.job.prompt_row, col[r.model]]) for r in within if r.model in col)
    cost = sum(
        (r.prompt_tokens * price[r.model][0] + r.completion_tokens * price[r.model][1]) / 1e6
        for r in served
        if r.model in price
    )
    per_model = {m.name: sum(1 for r in served if r.model == m.name) for m in models}
    final_used = run.budget_samples[-1][1] if run.budget_samples else {}
    return {
        "requests": len(run.results),
        "served": len(served),
        "within_slo": len(within),
        "quality": round(quality, 3),
        "quality_per_served": round(quality / len(within), 4) if within else 0.0,
        "cost": round(cost, 6),
        "degraded": sum(1 for r in served if r.route in {"degraded", "fallback"}),
        "shed": sum(1 for r in run.results if r.status in (429, 503)),
        "budget_refused": sum(1 for r in run.results if r.code == "insufficient_quota"),
        "errors": sum(1 for r in run.results if r.status not in (200, 429, 503)),
        "p50_latency_s": round(float(np.median([r.latency for r in served])), 3) if served else None,
        "served_by_model": per_model,
        "budget_used": {m: round(v) for m, v in final_used.items()},
        "budget": {m: round(v) for m, v in run.budgets.items()},
    }


def plot(runs: dict[str, PolicyRun], summaries: dict[str, dict], slo: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = {"tollway": "tab:green", "strongest": "tab:red"}
    bin_s = 2.0
    for name, run in runs.items():
        if not run.results:
            continue
        end = max(r.sent for r in run.results)
        edges = np.arange(0, end - bin_s / 2, bin_s)  # whole bins only: a cut-off last bin reads as a drop
        if len(edges) < 2:
            continue
        sent = np.histogram([r.sent for r in run.results], edges)[0] / bin_s
        ok = (
            np.histogram([r.sent for r in run.results if r.status == 200 and r.latency <= slo], edges)[0]
            / bin_s
        )
        shed = np.histogram([r.sent for r in run.results if r.status in (429, 503)], edges)[0] / bin_s
        degraded = (
            np.histogram(
                [r.sent for r in run.results if r.status == 200 and r.route in {"degraded", "fallback"}],
                edges,
            )[0]
            / bin_s
        )
        mid = edges[:-1] + bin_s / 2
        ax = axes[0][0]
        if name == "tollway":
            ax.plot(mid, sent, color="gray", linestyle=":", label="offered load")
        ax.plot(mid, ok, color=colors[name], label=f"{name}: served within SLO")
        ax = axes[1][0]
        ax.plot(mid, shed, color=colors[name], linestyle="--", label=f"{name}: shed (429/503)")
        if name == "tollway":
            ax.plot(mid, degraded, color=colors[name], label="tollway: degraded")
    axes[0][0].set(title=f"Requests/s served within {slo:g} s SLO as load rises", xlabel="s", ylabel="req/s")
    axes[1][0].set(title="Degradations and sheds over time", xlabel="s", ylabel="req/s")
    for ax in (axes[0][0], axes[1][0]):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0][1]
    for name, run in runs.items():
        if not run.budget_samples:
            continue
        times = [t for t, _ in run.budget_samples]
        for model, budget in run.budgets.items():
            if budget and (name == "tollway" or model == "large"):
                used = [100.0 * u.get(model, 0.0) / budget for _, u in run.budget_samples]
                ax.plot(
                    times,
                    used,
                    color=colors[name],
                    alpha=0.4 + 0.2 * list(run.budgets).index(model),
                    label=f"{name}: {model}",
                )
    ax.set(title="Budget used per model (% of window budget)", xlabel="s", ylabel="%")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    names = list(summaries)
    keys = [("served", "served"), ("within_slo", "within SLO"), ("shed", "shed")]
    width = 0.38
    for i, name in enumerate(names):
        ax.bar(
            [k + (i - 0.5) * width for k in range(len(keys))],
            [summaries[name][k] for k, _ in keys],
            width,
            color=colors.get(name),
            label=name,
        )
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    q = ", ".join(f"{n}: quality {summaries[n]['quality']:.1f}, \\${summaries[n]['cost']:.3f}" for n in names)
    ax.set(title=f"Totals ({q})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.suptitle("tollway demo: budget- and load-aware routing vs always the strongest model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(console: Any, summaries: dict[str, dict]) -> None:
    from rich.table import Table

    table = Table(title="tollway vs always the strongest model")
    table.add_column("")
    for name in summaries:
        table.add_column(name, justify="right")
    rows = [
        ("requests", "requests"),
        ("served", "served"),
        ("served within SLO", "within_slo"),
        ("quality served (sum of true scores)", "quality"),
        ("quality per request served", "quality_per_served"),
        ("cost (USD)", "cost"),
        ("degraded (served by a lower-ranked model)", "degraded"),
        ("shed (429/503)", "shed"),
        ("  of which: budget spent", "budget_refused"),
        ("p50 latency of served (s)", "p50_latency_s"),
    ]
    for label, key in rows:
        table.add_row(label, *(str(s[key]) for s in summaries.values()))
    models = list(next(iter(summaries.values()))["served_by_model"])
    for model in models:
        table.add_row(
            f"served by {model} / budget used",
            *(
                f"{s['served_by_model'].get(model, 0)} / "
                + (
                    f"{100 * s['budget_used'].get(model, 0) / s['budget'][model]:.0f}%"
                    if s["budget"].get(model)
                    else "-"
                )
                for s in summaries.values()
            ),
        )
    console.print(table)


# --- entry point ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tollway demo",
        description="Run simulators + router locally, replay real prompts at a rising rate, compare with "
        "always sending to the strongest model.",
    )
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of replay in total (half per policy)"
    )
    p.add_argument("--start-rate", type=float, default=2.0, help="requests/s at the start of each replay")
    p.add_argument("--end-rate", type=float, default=20.0, help="requests/s at the end of each replay")
    p.add_argument(
        "--slo", type=float, default=5.0, help="a served request counts within SLO under this many s"
    )
    p.add_argument("--speedup", type=float, default=2.0, help="simulated seconds per wall-clock second")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="simulators per model; the router picks the replica with the most room per request (default 1)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the summary JSON here")
    p.add_argument(
        "--plot", type=Path, default=Path("tollway-demo.png"), help="PNG path (default ./tollway-demo.png)"
    )
    p.add_argument("--serve", action="store_true", help="skip the replay; keep the stack up until Ctrl-C")
    p.add_argument("--port", type=int, default=8080, help="router port for --serve (default 8080)")
    return p


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.start_rate <= 0 or args.end_rate <= 0 or args.replicas < 1:
        print(
            "tollway demo: --duration, --start-rate, --end-rate and --replicas must be > 0", file=sys.stderr
        )
        return 2
    from rich.console import Console

    from router_service.routing.history import load_builtin_history

    console = Console()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on `kill` as on Ctrl-C
    models = example_models()
    policy = example_policy()
    strongest = models[-1].name
    stream = load_builtin_history("stream")
    prompts = list(stream.prompts)
    per_policy = args.duration / 2
    jobs = build_jobs(stream, per_policy, args.start_rate, args.end_rate, args.seed)
    mean_tokens = (
        float(np.mean([stream.prompt_tokens[j.prompt_row] + j.max_tokens for j in jobs])) if jobs else 1.0
    )
    expected_tokens = mean_tokens * max(1, len(jobs))
    budgets = {
        m.name: int(expected_tokens * BUDGET_SHARE[min(i, len(BUDGET_SHARE) - 1)])
        for i, m in enumerate(models)
    }
    window = per_policy + 120.0

    try:
        with tempfile.TemporaryDirectory(prefix="tollway-demo-") as tmp:
            if args.serve:
                return serve(console, models, policy, budgets, window, len(jobs), args, Path(tmp))
            console.print(
                f"[bold]tollway demo[/]: {len(models)} simulated models ({', '.join(m.name for m in models)}"
                f"{f', {args.replicas} replicas each' if args.replicas > 1 else ''}), "
                f"{len(jobs)} held-out RouterBench prompts per policy over {per_policy:g} s, "
                f"{args.start_rate:g} -> {args.end_rate:g} req/s; SLO {args.slo:g} s; budgets {budgets} tokens."
            )
            runs: dict[str, PolicyRun] = {}
            for name, model in (("tollway", "auto"), ("strongest", strongest)):
                log_dir = Path(tmp) / name
                log_dir.mkdir()
                runs[name] = run_policy(
                    console, name, model, models, policy, budgets, window, jobs, prompts, args, log_dir
                )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process started by the demo was stopped.[/]")
        return 130
    summaries = {name: summarize(run, stream, models, args.slo) for name, run in runs.items()}
    print_table(console, summaries)
    plot(runs, summaries, args.slo, args.plot)
    console.print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "policies": summaries,
                    "scenario": {
                        "duration_s": args.duration,
                        "start_rate": args.start_rate,
                        "end_rate": args.end_rate,
                        "slo_s": args.slo,
                        "budgets": budgets,
                        "models": [m.__dict__ for m in models],
                    },
                },
                indent=2,
            )
        )
        console.print(f"summary: {args.json}")
    t, s = summaries["tollway"], summaries["strongest"]
    console.print(
        f"tollway served {t['within_slo']} requests within SLO vs {s['within_slo']} for always-{strongest} "
        f"(quality {t['quality']:.1f} vs {s['quality']:.1f}, cost ${t['cost']:.3f} vs ${s['cost']:.3f})."
    )
    return 0


def run_policy(
    console: Any,
    name: str,
    model: str,
    models: list[ModelSpec],
    policy: dict[str, Any],
    budgets: dict[str, int],
    window: float,
    jobs: list[Job],
    prompts: list[str],
    args: argparse.Namespace,
    log_dir: Path,
) -> PolicyRun:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with running_stack(models, args.speedup, log_dir) as stack:
        count = len(models) * args.replicas
        with console.status(f"[{name}] starting {count} simulators and the router ..."):
            urls = stack.start_simulators(args.replicas)
            cfg = router_config(models, urls, policy, budgets, window, len(jobs))
            base_url = stack.start_router(cfg)
        columns = (
            TextColumn(f"[bold]{name:<9}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "served {task.fields[served]}  degraded {task.fields[degraded]}  shed {task.fields[shed]}"
            ),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(name, total=len(jobs), served=0, degraded=0, shed=0)
            return asyncio.run(replay(name, base_url, model, jobs, prompts, progress, task))


def serve(
    console: Any,
    models: list[ModelSpec],
    policy: dict[str, Any],
    budgets: dict[str, int],
    window: float,
    expected: int,
    args: argparse.Namespace,
    log_dir: Path,
) -> int:
    with running_stack(models, args.speedup, log_dir) as stack:
        urls = stack.start_simulators(args.replicas)
        cfg = router_config(models, urls, policy, budgets, window, expected)
        cfg["budgets"]["windowSeconds"] = 3600
        base = stack.start_router(cfg, port=args.port)
        console.print(f"[bold]tollway is serving[/] at [cyan]{base}/v1[/] (models: auto, {', '.join(urls)}).")
        console.print(
            f"  curl {base}/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"model": "auto", "messages": [{"role": "user", "content": "Hello!"}]}\''
        )
        console.print(
            f"  metrics: {base}/metrics   status: {base}/v1/tollway/status   Ctrl-C stops everything."
        )
        try:
            while stack.router is not None and stack.router.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
