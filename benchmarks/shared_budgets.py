"""Shared budgets: three router replicas spending one budget through Redis (issue 14).

    .venv/bin/python benchmarks/shared_budgets.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/shared_budgets.py --quick    # ~1.5 min smoke run

One `tollway simulate` backend (model `m`), three `tollway router` processes in front of it, and
(for the shared runs) one `redis-server` with its append-only file on. Model `m` has a budget of
B tokens for the (one-hour) window. An open-loop client sends N requests (600) spread 80/10/10
over the three routers (a keep-alive-heavy client, a late replica), whose demand is about 2 B
(B is computed from the prompts' token counts as the simulator counts them plus max_tokens; every
request names `m`, so the router reserves the request's own cap, prompt + max_tokens). A request
whose router is down goes to the next router, as a Service would send it. Scenarios:

- static: each router enforces its static third of B in-process (`replicaShare` 1/3, the old way);
- shared: the three routers reserve and settle in Redis (`--state-url`);
- restart: shared, and the busiest router is stopped (SIGTERM, drain) and started again mid-run;
- redis-outage: shared, and Redis is stopped for 10 s mid-run (then started again on its files).

Measured per scenario: tokens settled in the store against B; the tokens the clients were told
they used (every 200's `usage.total_tokens`), which must equal what was settled (nothing lost,
nothing counted twice); every request's final status (no 5xx, none lost). Also the latency the
shared store adds to a request: end to end (sequential requests to one router, static vs shared)
and on the request path itself (`BudgetLedger.reserve` + `settle` in-process, local vs Redis).
Results: results/shared_budgets.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from common import (
    ROOT,
    TOLLWAY,
    ManagedProcess,
    Step,
    fmt,
    free_port,
    markdown_table,
    new_figure,
    open_loop,
    percentile,
    start_simulator,
    write_report,
)
from rich.console import Console
from tqdm import tqdm

from router_service.config import BudgetConfig
from router_service.routing.history import load_builtin_history
from router_service.routing.ledger import BudgetLedger
from router_service.simulator.textgen import (
    CHAT_GENERATION_PROMPT_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    count_tokens,
)
from router_service.store.redis_store import RedisStateStore

sys.path.insert(0, str(ROOT / "tests"))  # the redis-server harness the tests use
from redis_server import RedisServer

console = Console()
PROFILE = "mistralai/mistral-7b-chat"
SIM_FLAGS = {"speedup": 20, "max-num-seqs": 128, "ttft-ms": 5}
MAX_TOKENS = 48
SYNC_INTERVAL = 0.5
SPLIT = (0.8, 0.1, 0.1)
ROUTERS = ("a", "b", "c")

# ---------------------------------------------------------------------------------------------
# workload


def prompts(n: int) -> list[str]:
    """Held-out RouterBench prompts (the shipped history's stream part), cut to 800 characters."""
    stream = load_builtin_history("stream").prompts
    return [stream[i % len(stream)][:800] for i in range(n)]


def simulator_usage(prompt: str) -> int:
    """Tokens one request uses, as the simulator counts them: chat template + prompt + max_tokens."""
    return CHAT_GENERATION_PROMPT_TOKENS + CHAT_TOKENS_PER_MESSAGE + count_tokens(prompt) + MAX_TOKENS


def router_of(i: int) -> int:
    """80/10/10: request i goes to router 0 eight times in ten, to 1 and 2 once each."""
    slot = i % 10
    return 0 if slot < round(SPLIT[0] * 10) else (1 if slot < round((SPLIT[0] + SPLIT[1]) * 10) else 2)


# ---------------------------------------------------------------------------------------------
# the stack


def ledger_totals(server: RedisServer, key: str) -> tuple[float, float]:
    """(used, settled) of model m summed over the windows of policy key `key`."""
    client = server.client()
    used = settled = 0.0
    for name in client.scan_iter(match=f"tollway:{{{key}}}:*:budget:m"):
        u, s = client.hmget(name, ["used", "settled"])
        used += float(u or 0)
        settled += float(s or 0)
    return used, settled


@dataclass
class Router:
    name: str
    config: Path
    log_dir: Path
    state_url: str | None
    port: int = field(default_factory=free_port)
    proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Router:
        args: list[Any] = [TOLLWAY, "router", "--config", self.config, "--port", self.port]
        args += ["--log-level", "warning", "--no-reload"]
        if self.state_url:
            args += ["--state-url", self.state_url]
        self.proc = ManagedProcess(f"router-{self.name}", args, log_dir=self.log_dir).start()
        self.proc.wait_http(f"{self.url}/readyz", timeout=180)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=15)

    def status(self) -> dict[str, Any] | None:
        try:
            return httpx.get(f"{self.url}/v1/tollway/status", timeout=2).json()
        except httpx.HTTPError:
            return None


def router_config(sim_url: str, budget: int, state_file: Path, key: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backends": [
            {"name": "m", "url": sim_url, "profile": PROFILE},
            # Latency probe: the same simulator under a budget nobody exhausts.
            {"name": "probe", "url": sim_url, "profile": PROFILE, "upstreamModel": "m"},
        ],
        "budgets": {
            "windowSeconds": 3600,
            "tokens": {"m": budget, "probe": 10**12},
            "replicaShare": round(1 / len(ROUTERS), 6),
            "stateFile": str(state_file),
        },
        "degradation": {"scrapeIntervalSeconds": 1.0},
        "server": {"drainSeconds": 5},
    }
    if key is not None:
        config["state"] = {"key": key, "syncIntervalSeconds": SYNC_INTERVAL}
    return config


def start_routers(
    sim_url: str, budget: int, log_dir: Path, scenario: str, redis_server: RedisServer | None
) -> tuple[list[Router], str | None]:
    import yaml

    key = f"bench/{scenario}-{uuid.uuid4().hex[:6]}" if redis_server is not None else None
    routers = []
    for name in ROUTERS:
        config = log_dir / f"{scenario}-{name}.yaml"
        config.write_text(
            yaml.safe_dump(router_config(sim_url, budget, log_dir / f"{scenario}-{name}-ledger.json", key))
        )
        routers.append(Router(name, config, log_dir, redis_server.url() if redis_server else None))
    for router in routers:
        router.start()
    return routers, key


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class Answer:
    index: int
    sent_at: float
    router: str
    status: int | None = None
    tokens: int = 0
    latency: float = 0.0
    failovers: int = 0
    error: str | None = None
    tag: str = ""


async def ask(client: httpx.AsyncClient, routers: list[Router], i: int, prompt: str, t0: float) -> Answer:
    """One request to its router, or (connection refused: the router is down) the next one."""
    first = router_of(i)
    answer = Answer(i, time.perf_counter() - t0, routers[first].name)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    started = time.perf_counter()
    for hop in range(len(routers)):
        router = routers[(first + hop) % len(routers)]
        try:
            resp = await client.post(f"{router.url}/v1/chat/completions", json=body)
        except httpx.ConnectError:
            answer.failovers += 1
            continue
        except httpx.HTTPError as exc:
            answer.error = type(exc).__name__
            break
        answer.router, answer.status = router.name, resp.status_code
        if resp.status_code == 200:
            answer.tokens = int(resp.json()["usage"]["total_tokens"])
        break
    else:
        answer.error = "no-router"
    answer.latency = time.perf_counter() - started
    return answer


@dataclass
class Run:
    scenario: str
    budget: int
    answers: list[Answer]
    timeline: list[tuple[float, float]]
    events: list[tuple[float, str]]
    used: float
    settled: float
    router_views: dict[str, Any]
    duration: float
    restarted: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        statuses = Counter(
            str(a.status) if a.status is not None else (a.error or "none") for a in self.answers
        )
        served = sum(a.tokens for a in self.answers)
        ok = [a for a in self.answers if a.status == 200]
        per_router = {
            r: {
                "sent": sum(1 for a in self.answers if ROUTERS[router_of(a.index)] == r),
                "served": sum(1 for a in ok if a.router == r),
                "tokens": sum(a.tokens for a in ok if a.router == r),
            }
            for r in ROUTERS
        }
        return {
            "scenario": self.scenario,
            "requests": len(self.answers),
            "statuses": dict(sorted(statuses.items())),
            "five_xx": sum(1 for a in self.answers if a.status is not None and a.status >= 500),
            "lost": sum(1 for a in self.answers if a.status is None),
            "failovers": sum(a.failovers for a in self.answers),
            "served_tokens": served,
            "settled_tokens": self.settled,
            "used_tokens": self.used,
            "settled_over_budget": self.settled / self.budget,
            "served_equals_settled": math.isclose(served, self.settled, abs_tol=0.5),
            "per_router": per_router,
            "latency_ms": {
                "p50": percentile([a.latency * 1000 for a in ok], 50),
                "p99": percentile([a.latency * 1000 for a in ok], 99),
            },
            "events": self.events,
            "duration_s": self.duration,
            **({"restart": self.restarted} if self.restarted else {}),
        }


async def run_scenario(
    scenario: str,
    routers: list[Router],
    budget: int,
    texts: list[str],
    rate: float,
    settled_now: Any,
    events: list[tuple[float, str, Any]] = (),  # type: ignore[assignment]
) -> tuple[list[Answer], list[tuple[float, float]], list[tuple[float, str]], float]:
    """Send the requests at `rate`; run each event (at seconds, label, blocking callable) on time."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    happened: list[tuple[float, str]] = []
    timeline: list[tuple[float, float]] = []
    bar = tqdm(total=len(texts), desc=f"{scenario:>13}", unit="req", leave=False, mininterval=1.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=2), limits=limits) as client:
        t0 = time.perf_counter()

        async def request(i: int, start: float) -> Any:
            answer = await ask(client, routers, i, texts[i], t0)
            bar.update(1)
            return answer

        async def fire(at: float, label: str, action: Any) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            happened.append((time.perf_counter() - t0, label))
            await asyncio.to_thread(action)

        async def sample() -> None:
            while True:
                value = await asyncio.to_thread(settled_now)
                timeline.append((time.perf_counter() - t0, value / budget))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        firing = [asyncio.create_task(fire(at, label, action)) for at, label, action in events]
        answers = await open_loop(request, [Step(scenario, rate, len(texts) / rate)], drain_seconds=90)
        await asyncio.gather(*firing)
        duration = time.perf_counter() - t0
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    bar.close()
    # A request the client gave up on (open_loop's "abandoned"/"client-overflow") counts as lost.
    out = [a if isinstance(a, Answer) else Answer(-1, a.start, "?", error=a.error) for a in answers]
    return out, timeline, happened, duration


def wait_flushed(routers: list[Router], timeout: float = 20.0) -> None:
    """Until every router's store is reachable and has nothing left to write."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [r.status() for r in routers]
        if all(s and s["state"]["connected"] and s["state"]["pendingOperations"] == 0 for s in states):
            return
        time.sleep(0.2)
    raise RuntimeError("routers did not flush their pending operations in time")


# ---------------------------------------------------------------------------------------------
# latency


def probe_latency(sim_url: str, redis_server: RedisServer, log_dir: Path, n: int) -> dict[str, list[float]]:
    """Sequential one-token requests, alternating between a router on the in-process store and one
    on Redis (same config otherwise, same moment, so machine load hits both alike)."""
    import yaml

    routers = {}
    for kind in ("local", "redis"):
        config = log_dir / f"probe-{kind}.yaml"
        data = router_config(sim_url, 10**12, log_dir / f"probe-{kind}-ledger.json", None)
        if kind == "redis":
            data["state"] = {
                "key": f"bench/probe-{uuid.uuid4().hex[:6]}",
                "syncIntervalSeconds": SYNC_INTERVAL,
            }
        config.write_text(yaml.safe_dump(data))
        routers[kind] = Router(
            f"probe-{kind}", config, log_dir, redis_server.url() if kind == "redis" else None
        )
    body = {"model": "probe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    out: dict[str, list[float]] = {"local": [], "redis": []}
    try:
        for router in routers.values():
            router.start()
        with httpx.Client(timeout=10) as client:
            for i in range(n + 20):
                for kind, router in routers.items():
                    started = time.perf_counter()
                    client.post(f"{router.url}/v1/chat/completions", json=body).raise_for_status()
                    if i >= 20:  # warm-up dropped
                        out[kind].append((time.perf_counter() - started) * 1000)
    finally:
        for router in routers.values():
            router.stop()
    return out


def ledger_cost(redis_url: str, n: int) -> dict[str, float]:
    """Microseconds per request of BudgetLedger.reserve + settle, in-process vs Redis store
    (alternating calls, so both see the same machine load)."""
    config = BudgetConfig(window_seconds=3600, tokens={"m": 10**12})
    store = RedisStateStore(
        redis_url, key=f"bench/ledger-{uuid.uuid4().hex[:6]}", window_seconds=3600, budgets={"m": 10**12}
    )
    store.start()
    ledgers = {"local": BudgetLedger(config), "redis": BudgetLedger(config, store=store)}
    samples: dict[str, list[float]] = {f"{k}_{op}": [] for k in ledgers for op in ("reserve", "settle")}
    try:
        for i in range(n + 200):
            for kind, ledger in ledgers.items():
                started = time.perf_counter()
                reservation = ledger.reserve("m", 100)
                reserved = time.perf_counter()
                ledger.settle(reservation, 90)
                settled = time.perf_counter()
                if i >= 200:
                    samples[f"{kind}_reserve"].append((reserved - started) * 1e6)
                    samples[f"{kind}_settle"].append((settled - reserved) * 1e6)
    finally:
        store.close()
    out = {}
    for name, values in samples.items():
        out[f"{name}_p50_us"] = statistics.median(values)
        out[f"{name}_p99_us"] = percentile(values, 99)
    return out


# ---------------------------------------------------------------------------------------------
# main


def used_by(routers: list[Router]) -> float:
    """Tokens of model m used, summed over the routers' own ledgers (the in-process store)."""
    views = [r.status() for r in routers]
    return sum(v["budgets"]["models"]["m"]["used"] for v in views if v)


def run_one(
    scenario: str,
    args: argparse.Namespace,
    texts: list[str],
    budget: int,
    sim_url: str,
    redis_server: RedisServer,
    log_dir: Path,
) -> Run:
    """Start three routers for `scenario`, send the load with the scenario's events, read the totals."""
    shared = scenario != "static"
    run_seconds = args.requests / args.rate
    routers, key = start_routers(sim_url, budget, log_dir, scenario, redis_server if shared else None)
    restarted: dict[str, Any] = {}

    def settled_now() -> float:
        if key is None:
            return used_by(routers)
        try:
            return ledger_totals(redis_server, key)[1]
        except redis.RedisError:
            return math.nan  # Redis is down (the outage scenario)

    def restart_busiest() -> None:
        """SIGTERM (in-flight requests drain), start again on the same port; what it sees then."""
        router = routers[0]
        router.stop()
        router.start()
        view = (router.status() or {}).get("budgets", {}).get("models", {}).get("m", {})
        restarted.update(view_after_restart=view.get("used"), settled_at_restart=settled_now())

    events: list[tuple[float, str, Any]] = []
    if scenario == "restart":
        events.append((0.35 * run_seconds, "router a stopped (SIGTERM) and started again", restart_busiest))
    if scenario == "redis-outage":
        start = 0.3 * run_seconds
        events.append((start, "redis stopped", redis_server.stop))
        events.append((start + args.outage_seconds, "redis started again", redis_server.start))
    try:
        answers, timeline, happened, duration = asyncio.run(
            run_scenario(scenario, routers, budget, texts, args.rate, settled_now, events)
        )
        if shared:
            wait_flushed(routers)
            used, settled = ledger_totals(redis_server, key or "")
        else:
            used = settled = used_by(routers)
        views = {r.name: r.status() for r in routers}
    finally:
        for router in routers:
            router.stop()
    run = Run(scenario, budget, answers, timeline, happened, used, settled, views, duration, restarted)
    s = run.summary()
    console.print(
        f"  {scenario:>13}: settled {s['settled_over_budget']:.4f} B, served == settled: "
        f"{s['served_equals_settled']}, statuses {s['statuses']}, failovers {s['failovers']}"
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    parser.add_argument("--outage-seconds", type=float, default=10.0)
    parser.add_argument("--probes", type=int, default=200, help="sequential requests per latency probe")
    parser.add_argument("--quick", action="store_true", help="fewer requests and probes (smoke run)")
    parser.add_argument("--out", default="shared_budgets")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.probes, args.rate = 300, 60, 15.0
    texts = prompts(args.requests)
    demand = sum(simulator_usage(p) for p in texts)
    budget = demand // 2
    console.print(
        f"[bold]shared budgets[/]: {args.requests} requests at {args.rate:g}/s "
        f"(~{args.requests / args.rate:.0f} s), demand {demand} tokens, budget B = {budget}"
    )
    with tempfile.TemporaryDirectory(prefix="tollway-shared-") as tmp:
        log_dir = Path(tmp)
        sim, sim_url = start_simulator("m", log_dir, flags=SIM_FLAGS)
        redis_server = RedisServer(log_dir / "redis", appendonly=True).start()
        try:
            results = {
                scenario: run_one(scenario, args, texts, budget, sim_url, redis_server, log_dir)
                for scenario in ("static", "shared", "restart", "redis-outage")
            }
            latency = probe_latency(sim_url, redis_server, log_dir, args.probes)
            ledger = ledger_cost(redis_server.url(), 2000)
        finally:
            redis_server.stop()
            sim.stop()
    report(args, budget, demand, results, latency, ledger)


def outage_bound(run: Run, budget: int) -> dict[str, float]:
    """The stated bound for an outage: B plus what the fleet admitted in the last sync interval
    before Redis went away (the staleness of the views each replica's share is computed from)."""
    start = next(t for t, label in run.events if label == "redis stopped")
    recent = sum(
        a.tokens for a in run.answers if start - SYNC_INTERVAL <= a.sent_at < start and a.status == 200
    )
    return {"outage_start_s": start, "delta_tokens": recent, "bound_over_budget": (budget + recent) / budget}


def report(
    args: argparse.Namespace,
    budget: int,
    demand: int,
    results: dict[str, Run],
    latency: dict[str, list[float]],
    ledger: dict[str, float],
) -> None:
    summaries = {name: run.summary() for name, run in results.items()}
    bound = outage_bound(results["redis-outage"], budget)
    checks = {
        "shared: 0.97 B <= settled <= 1.01 B": 0.97 <= summaries["shared"]["settled_over_budget"] <= 1.01,
        "every shared run: settled == tokens the clients were told (nothing lost or counted twice)": all(
            summaries[s]["served_equals_settled"] for s in ("shared", "restart", "redis-outage")
        ),
        "every run: no 5xx, no request without an answer": all(
            s["five_xx"] == 0 and s["lost"] == 0 for s in summaries.values()
        ),
        "restart: the restarted router saw the window's spend so far (no reset)": (
            results["restart"].restarted.get("view_after_restart") or 0
        )
        >= 0.9 * (results["restart"].restarted.get("settled_at_restart") or math.inf),
        "restart: 0.97 B <= settled <= 1.01 B (the window's spend continued)": 0.97
        <= summaries["restart"]["settled_over_budget"]
        <= 1.01,
        "redis-outage: settled <= B + delta (the stated bound) and <= 1.01 B": summaries["redis-outage"][
            "settled_over_budget"
        ]
        <= min(bound["bound_over_budget"], 1.01),
        "redis-outage: recovered (every router back on the shared store, nothing pending)": all(
            v and v["state"]["connected"] and v["state"]["pendingOperations"] == 0
            for v in results["redis-outage"].router_views.values()
        ),
    }
    paired = [r - lo for lo, r in zip(latency["local"], latency["redis"], strict=True)]
    added = {
        "static_p50_ms": statistics.median(latency["local"]),
        "shared_p50_ms": statistics.median(latency["redis"]),
        "static_p90_ms": percentile(latency["local"], 90),
        "shared_p90_ms": percentile(latency["redis"], 90),
        "added_p50_ms": statistics.median(paired),
    }
    rows = []
    for name, s in summaries.items():
        pr = s["per_router"]
        rows.append(
            [
                name,
                f"{s['settled_over_budget']:.4f}",
                "yes" if s["served_equals_settled"] else "NO",
                " ".join(f"{k}:{v}" for k, v in s["statuses"].items()),
                s["five_xx"],
                s["failovers"],
                " / ".join(str(pr[r]["tokens"]) for r in ROUTERS),
                fmt(s["latency_ms"]["p50"], 0),
            ]
        )
    table = markdown_table(
        [
            "scenario",
            "settled / B",
            "settled == served",
            "statuses",
            "5xx",
            "failovers",
            "tokens a / b / c",
            "p50 ms",
        ],
        rows,
    )
    body = [
        f"{args.requests} requests at {args.rate:g}/s, 80/10/10 over routers a/b/c, one model with "
        f"budget B = {budget} tokens (demand {demand} = {demand / budget:.2f} B), max_tokens {MAX_TOKENS}, "
        f"state sync every {SYNC_INTERVAL} s.",
        "",
        table,
        "",
        "Checks:",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks.items()],
        "",
        f"Static split: router a (80% of the traffic) stops at its third of B while b and c strand "
        f"theirs: {summaries['static']['settled_over_budget']:.1%} of B spent. Shared: "
        f"{summaries['shared']['settled_over_budget']:.1%}.",
        "",
        f"Redis outage ({args.outage_seconds:g} s from t = {bound['outage_start_s']:.1f} s): each router spends "
        "at most its share (remaining it last saw / live replicas) until Redis answers, then writes its "
        f"queued settlements. Stated bound B + delta, delta = tokens the fleet admitted in the last sync "
        f"interval before the outage = {bound['delta_tokens']} tokens -> {bound['bound_over_budget']:.4f} B; "
        f"measured {summaries['redis-outage']['settled_over_budget']:.4f} B.",
        "",
        f"Restart: router a (80% of the traffic) got SIGTERM at t = {results['restart'].events[0][0]:.1f} s "
        "(a rollout or pod deletion: it stops accepting, drains, writes what is queued) and was started "
        f"again on the same port; its requests went to b and c meanwhile ({summaries['restart']['failovers']} "
        f"failovers). Back up, it saw {results['restart'].restarted.get('view_after_restart')} tokens used in "
        f"the window (Redis had settled {results['restart'].restarted.get('settled_at_restart')}): the "
        "spend continued, it did not start from zero. (A SIGKILLed router loses its in-flight requests "
        "to their clients; its holds are reclaimed by the others after upstreamTimeoutSeconds + 60 s.)",
        "",
        "Added latency of the shared store:",
        "",
        f"- end to end, {args.probes} sequential one-token requests alternating between a router on the "
        f"in-process store and one on Redis: p50 {added['static_p50_ms']:.2f} vs {added['shared_p50_ms']:.2f} ms, "
        f"median paired difference {added['added_p50_ms']:+.2f} ms; p90 {added['static_p90_ms']:.2f} vs "
        f"{added['shared_p90_ms']:.2f} ms.",
        f"- on the request path (in-process calls, alternating): `BudgetLedger.reserve` "
        f"{ledger['local_reserve_p50_us']:.1f} us in-process vs {ledger['redis_reserve_p50_us']:.1f} us with Redis "
        f"on localhost, one round trip (p99 {ledger['local_reserve_p99_us']:.1f} vs "
        f"{ledger['redis_reserve_p99_us']:.1f} us); `settle` {ledger['local_settle_p50_us']:.1f} vs "
        f"{ledger['redis_settle_p50_us']:.1f} us (queued: the store's thread writes it behind the request).",
    ]
    fig, axes = new_figure(ncols=2, size=(6.5, 4.2))
    ax = axes[0][0]
    styles = {"static": "-", "shared": "-", "restart": "--", "redis-outage": "-."}
    for name, run in results.items():
        # What the clients were told they used, by the time the answer arrived (continuous through
        # the outage, when the store cannot be read; equal to what was settled at the end).
        done = sorted((a.sent_at + a.latency, a.tokens) for a in run.answers if a.status == 200)
        xs, ys, total = [0.0], [0.0], 0
        for t, tokens in done:
            total += tokens
            xs.append(t)
            ys.append(total / budget)
        (line,) = ax.plot(xs, ys, styles.get(name, "-"), label=name)
        for t, label in run.events:
            ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(label.split(" (")[0], (t, 0.05), rotation=90, fontsize=7, color=line.get_color())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.01, color="red", linestyle="--", linewidth=0.8, label="1.01 B")
    ax.axhline(0.97, color="orange", linestyle="--", linewidth=0.8, label="0.97 B")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens served (clients' usage) / B")
    ax.set_title("spend of one budget by three routers")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    width = 0.2
    for k, name in enumerate(results):
        pr = summaries[name]["per_router"]
        ax.bar(
            [i + k * width for i in range(3)], [pr[r]["tokens"] / budget for r in ROUTERS], width, label=name
        )
    ax.set_xticks(
        [i + 1.5 * width for i in range(3)],
        [f"router {r}\n({int(p * 100)}% sent)" for r, p in zip(ROUTERS, SPLIT, strict=True)],
    )
    ax.set_ylabel("tokens served / B")
    ax.set_title("who spent the budget")
    ax.legend(fontsize=8)
    paths = write_report(
        args.out,
        title="Shared budgets across router replicas (Redis)",
        body_md="\n".join(body),
        data={
            "budget": budget,
            "demand": demand,
            "scenarios": summaries,
            "outage_bound": bound,
            "checks": checks,
            "latency_end_to_end": added,
            "latency_ledger": ledger,
            "timelines": {name: run.timeline for name, run in results.items()},
        },
        figure=fig,
    )
    console.print("\n".join(body))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
