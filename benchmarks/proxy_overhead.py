"""Proxy overhead: tollway's router against direct calls and against LiteLLM's proxy.

    bash benchmarks/setup_litellm.sh                       # once: LiteLLM in .venv-litellm
    .venv/bin/python benchmarks/proxy_overhead.py          # ~6 min on 2 cores
    .venv/bin/python benchmarks/proxy_overhead.py --quick  # ~1 min smoke run

Three simulators (`tollway simulate`, fast profile so the backend itself costs little) serve
the same model names to four targets, all driven by the same httpx client code
(`common.send_chat`) in this process, in the same run, interleaved per measurement point:

- direct:          the simulators themselves, round-robin over the three (the baseline);
- direct-mix:      the simulators themselves, each request to the model routing would pick for its
                   prompt (computed in-process first): the same load per backend as
                   tollway-routed, whose throughput is otherwise capped by the one simulator that
                   ~90% of the prompts go to (no budgets: the best model wins);
- tollway:         `tollway router`, model pinned by name (a pure proxy hop);
- tollway-routed:  `tollway router`, model "auto" (the full decision: embed, kNN, score, load);
- litellm:         LiteLLM's proxy (`litellm --config`, model_list `openai/<name>` + api_base, a
                   master key that every request sends, as LiteLLM >= 1.10x requires).

Pinned and LiteLLM requests go round-robin over the three names, like the direct ones. For every
(streaming, concurrency) point the added latency is the target's percentile minus the direct
percentile; max requests/s is the best successful rate over the concurrencies. The routing
decision's own time comes from the router's `tollway_routing_decision_seconds` histogram
(between scrapes) and from timing `RoutingEngine.rank` in-process on the same prompts.

All processes share this machine's cores with the load generator; the results say how many.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import (
    RESULTS,
    ROOT,
    ManagedProcess,
    Outcome,
    closed_loop,
    fmt,
    free_port,
    histogram_from_metrics,
    histogram_quantile,
    history_prompts,
    make_client,
    markdown_table,
    new_figure,
    percentile,
    send_chat,
    start_router,
    start_simulator,
    summarize,
    write_report,
)

MODELS = {  # simulator name -> history profile (any three; the decision cost does not depend on it)
    "gpt4": "gpt-4-1106-preview",
    "mixtral": "mistralai/mixtral-8x7b-chat",
    "mistral": "mistralai/mistral-7b-chat",
}
# A fast backend: 16 tokens take ~0.3 ms of simulated time, so latency is mostly the HTTP hops.
SIM_FLAGS = {"speedup": 1000, "max-num-seqs": 256, "kv-cache-tokens": 2_000_000}
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
LITELLM_KEY = "sk-tollway-bench-0123456789abcdef"  # LiteLLM >= 1.10x starts only with a master key
DECISION_METRIC = "tollway_routing_decision_seconds"
LITELLM_LOG_CONFIG = """{
  "version": 1,
  "disable_existing_loggers": false,
  "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
  "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
  "root": {"level": "WARNING", "handlers": ["stderr"]},
  "loggers": {"uvicorn.access": {"level": "WARNING"}, "LiteLLM": {"level": "WARNING"}}
}
"""


def litellm_config(sims: dict[str, str]) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "model_list": [
                {
                    "model_name": name,
                    "litellm_params": {"model": f"openai/{name}", "api_base": f"{url}/v1", "api_key": "none"},
                }
                for name, url in sims.items()
            ],
            "litellm_settings": {"drop_params": True, "telemetry": False},
            "general_settings": {"master_key": LITELLM_KEY},
        },
        sort_keys=False,
    )


def start_litellm(sims: dict[str, str], log_dir: Path) -> tuple[ManagedProcess, str]:
    if not LITELLM.exists():
        raise SystemExit("LiteLLM is not installed: run `bash benchmarks/setup_litellm.sh` first")
    cfg = log_dir / "litellm.yaml"
    cfg.write_text(litellm_config(sims))
    log_cfg = log_dir / "litellm-logging.json"
    log_cfg.write_text(LITELLM_LOG_CONFIG)
    port = free_port()
    args = [LITELLM, "--config", cfg, "--host", "127.0.0.1", "--port", port, "--num_workers", "1"]
    args += ["--log_config", log_cfg, "--telemetry", "False"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"}
    proc = ManagedProcess("litellm", args, log_dir=log_dir, env=env).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health/liveliness", timeout=180)
    return proc, url


def litellm_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {LITELLM_KEY}"}


async def measure_point(
    url: str,
    *,
    model_for: Any,
    prompts: list[str],
    concurrency: int,
    stream: bool,
    total: int,
    max_seconds: float,
    max_tokens: int,
    warmup: int,
    headers: dict[str, str] | None = None,
) -> tuple[list[Outcome], float]:
    async with make_client(concurrency, timeout=60) as client:

        async def one(i: int, t0: float) -> Outcome:
            return await send_chat(
                client,
                url,
                model=model_for(i),
                prompt=prompts[i % len(prompts)],
                max_tokens=max_tokens,
                stream=stream,
                t0=t0,
                headers=headers,
            )

        await closed_loop(one, concurrency=concurrency, total=warmup, max_seconds=30)
        return await closed_loop(one, concurrency=concurrency, total=total, max_seconds=max_seconds)


def routing_picks(config: dict[str, Any], prompts: list[str]) -> list[str]:
    """The model the router picks for each prompt (its engine, in-process, same config; without
    budgets the dual prices stay 0, so the pick is the same in the router)."""
    from router_service.config import RouterConfig
    from router_service.proxy.request import ROUTING_TEXT_CHARS
    from router_service.routing.engine import RoutingEngine

    engine = RoutingEngine.from_config(RouterConfig.model_validate(config))
    picks = [engine.rank(p[:ROUTING_TEXT_CHARS]).candidates[0].model for p in prompts]
    engine.close()
    return picks


def decision_in_process(config: dict[str, Any], prompts: list[str]) -> dict[str, float]:
    """Time RoutingEngine.rank alone (embed + kNN + estimate + score + sort) on each prompt,
    cut to the router's routing-text length, with dual-price fits on a background thread as in
    the router."""
    from router_service.config import RouterConfig
    from router_service.proxy.request import ROUTING_TEXT_CHARS
    from router_service.routing.engine import RoutingEngine

    engine = RoutingEngine.from_config(RouterConfig.model_validate(config), background_fits=True)
    texts = [p[:ROUTING_TEXT_CHARS] for p in prompts]
    for p in texts[:50]:
        engine.rank(p)
    times = []
    for p in texts:
        t = time.perf_counter()
        engine.rank(p)
        times.append((time.perf_counter() - t) * 1000)
    engine.close()
    return {"n": len(times), "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="tollway-bench-overhead-"))
    prompts = history_prompts(2000, seed=0)
    procs: list[ManagedProcess] = []
    try:
        sims: dict[str, str] = {}
        for name in MODELS:
            proc, url = start_simulator(name, log_dir, flags=SIM_FLAGS)
            procs.append(proc)
            sims[name] = url
        router_cfg = {
            "backends": [{"name": n, "url": u, "profile": MODELS[n], "replicas": 1} for n, u in sims.items()],
            "degradation": {"maxInFlightPerReplica": 4096, "maxWaitingPerReplica": 1000},
        }
        router, router_url = start_router(router_cfg, log_dir)
        procs.append(router)
        targets: dict[str, tuple[str, Any]] = {}
        names = list(MODELS)
        direct_urls = [sims[n] for n in names]
        routed_mix = routing_picks(router_cfg, prompts)
        targets["direct"] = ("", None)
        targets["direct-mix"] = ("", None)
        targets["tollway"] = (router_url, lambda i: names[i % 3])
        targets["tollway-routed"] = (router_url, lambda i: "auto")
        if not args.no_litellm:
            litellm, litellm_url = start_litellm(sims, log_dir)
            procs.append(litellm)
            targets["litellm"] = (litellm_url, lambda i: names[i % 3])

        points: list[dict[str, Any]] = []
        for stream, conc in itertools.product((False, True), args.concurrency):
            total = args.requests if conc == 1 else args.requests * 4
            for target, (url, model_for) in targets.items():
                before = ""
                if target == "tollway-routed":
                    before = httpx.get(f"{router_url}/metrics").text
                if target == "direct":
                    outcomes, wall = asyncio.run(
                        direct_point(direct_urls, names, prompts, conc, stream, total, args)
                    )
                elif target == "direct-mix":
                    mix_urls = [sims[m] for m in routed_mix]
                    outcomes, wall = asyncio.run(
                        direct_point(
                            mix_urls, routed_mix, prompts, conc, stream, total, args, per_prompt=True
                        )
                    )
                else:
                    outcomes, wall = asyncio.run(
                        measure_point(
                            url,
                            model_for=model_for,
                            prompts=prompts,
                            concurrency=conc,
                            stream=stream,
                            total=total,
                            max_seconds=args.max_seconds,
                            max_tokens=args.max_tokens,
                            warmup=min(50, total // 5),
                            headers=litellm_headers() if target == "litellm" else None,
                        )
                    )
                row = {"target": target, "stream": stream, "concurrency": conc, **summarize(outcomes, wall)}
                if target == "tollway-routed":
                    after = httpx.get(f"{router_url}/metrics").text
                    b = histogram_from_metrics(before, DECISION_METRIC)
                    a = histogram_from_metrics(after, DECISION_METRIC)
                    row["decision_ms"] = {
                        "p50": histogram_quantile(b, a, 0.50) * 1000,
                        "p99": histogram_quantile(b, a, 0.99) * 1000,
                    }
                points.append(row)
                print(
                    f"{target:15s} stream={stream!s:5s} c={conc:3d} n={row['requests']:5d} ok={row['ok']:5d} "
                    f"p50={row['latency_ms']['p50']:7.2f} p99={row['latency_ms']['p99']:7.2f} "
                    f"rps={row['ok_per_s']:7.1f} {row['outcomes']}",
                    flush=True,
                )
        router_rss = router.rss_bytes()
        litellm_rss = procs[-1].rss_bytes() if "litellm" in targets else None
    finally:
        for proc in reversed(procs):
            proc.stop()
    decision = decision_in_process(router_cfg, prompts)
    return {
        "points": points,
        "routed_mix": {m: routed_mix.count(m) for m in MODELS},
        "decision_in_process": decision,
        "rss_bytes": {"tollway": router_rss, "litellm": litellm_rss},
        "settings": {
            "concurrency": args.concurrency,
            "requests_per_point_1_client": args.requests,
            "requests_per_point_more_clients": args.requests * 4,
            "max_seconds_per_point": args.max_seconds,
            "max_tokens": args.max_tokens,
            "simulator_flags": SIM_FLAGS,
            "litellm_version": litellm_version(),
        },
    }


async def direct_point(
    urls: list[str],
    names: list[str],
    prompts: list[str],
    conc: int,
    stream: bool,
    total: int,
    args: Any,
    per_prompt: bool = False,
) -> tuple[list[Outcome], float]:
    """Straight to the simulators: request i to urls[i % 3] (round robin), or with `per_prompt` to
    urls[i % len(prompts)] (the model chosen for that prompt)."""
    async with make_client(conc * len(set(urls)), timeout=60) as client:

        async def one(i: int, t0: float) -> Outcome:
            k = i % len(prompts) if per_prompt else i % len(urls)
            return await send_chat(
                client,
                urls[k],
                model=names[k],
                prompt=prompts[i % len(prompts)],
                max_tokens=args.max_tokens,
                stream=stream,
                t0=t0,
            )

        await closed_loop(one, concurrency=conc, total=min(50, total // 5), max_seconds=30)
        return await closed_loop(one, concurrency=conc, total=total, max_seconds=args.max_seconds)


def litellm_version() -> str | None:
    meta = list((ROOT / ".venv-litellm" / "lib").glob("python*/site-packages/litellm-*.dist-info"))
    return meta[0].name.removeprefix("litellm-").removesuffix(".dist-info") if meta else None


TARGET_THROUGHPUT = 0.70  # routed max req/s over direct max req/s
TARGET_ADDED_P50_MS = {"tollway": 2.0, "tollway-routed": 3.0}  # at 1 client, not streamed and streamed


def targets_met(points: list[dict[str, Any]], max_rps: dict[str, float]) -> list[str]:
    """The issue's targets, each met or with its measured distance."""
    out = []
    for base, what in (("direct", "direct"), ("direct-mix", "direct-mix (the same load per backend)")):
        if "tollway-routed" not in max_rps or base not in max_rps:
            continue
        ratio = max_rps["tollway-routed"] / max_rps[base]
        out.append(
            f"- Target routed max throughput >= {TARGET_THROUGHPUT:.0%} of {what}: {ratio:.0%} "
            f"({max_rps['tollway-routed']:.0f} / {max_rps[base]:.0f} req/s) "
            + (
                "**met**."
                if ratio >= TARGET_THROUGHPUT
                else f"**missed** by {TARGET_THROUGHPUT - ratio:.0%} points."
            )
        )
    for target, limit in TARGET_ADDED_P50_MS.items():
        for p in points:
            if p["target"] == target and p["concurrency"] == 1:
                added = p["added_ms"]["p50"]
                mode = "streamed" if p["stream"] else "plain"
                out.append(
                    f"- Target {target} added p50 at 1 client ({mode}) < {limit:g} ms: {added:.2f} ms "
                    + ("**met**." if added < limit else f"**missed** by {added - limit:.2f} ms.")
                )
    return out


def throughput_ratios(points: list[dict[str, Any]]) -> str:
    """req/s of each proxy over direct and over direct-mix, at every point."""
    at = {(p["target"], p["stream"], p["concurrency"]): p["ok_per_s"] for p in points}
    rows = []
    for stream, conc in sorted({(p["stream"], p["concurrency"]) for p in points}):
        direct, mix = at.get(("direct", stream, conc)), at.get(("direct-mix", stream, conc))
        row: list[Any] = ["yes" if stream else "no", conc]
        for target in ("tollway", "tollway-routed", "litellm"):
            value = at.get((target, stream, conc))
            row.append("-" if value is None or not direct else f"{value / direct:.0%}")
        routed = at.get(("tollway-routed", stream, conc))
        row.append("-" if routed is None or not mix else f"{routed / mix:.0%}")
        rows.append(row)
    return markdown_table(
        [
            "stream",
            "clients",
            "tollway / direct",
            "routed / direct",
            "litellm / direct",
            "routed / direct-mix",
        ],
        rows,
    )


def report(data: dict[str, Any], out_dir: Path) -> Path:
    points = data["points"]
    base = {(p["stream"], p["concurrency"]): p for p in points if p["target"] == "direct"}
    direct_kinds = ("direct", "direct-mix")
    rows = []
    for p in points:
        d = base[(p["stream"], p["concurrency"])]
        added50 = p["latency_ms"]["p50"] - d["latency_ms"]["p50"]
        added99 = p["latency_ms"]["p99"] - d["latency_ms"]["p99"]
        p["added_ms"] = {"p50": added50, "p99": added99}
        rows.append(
            [
                p["target"],
                "yes" if p["stream"] else "no",
                p["concurrency"],
                p["ok"],
                fmt(p["latency_ms"]["p50"]),
                fmt(p["latency_ms"]["p99"]),
                "-" if p["target"] in direct_kinds else fmt(added50),
                "-" if p["target"] in direct_kinds else fmt(added99),
                fmt(p["ok_per_s"], 1),
                ", ".join(f"{k}: {v}" for k, v in p["outcomes"].items()),
            ]
        )
    table = markdown_table(
        [
            "target",
            "stream",
            "clients",
            "ok",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "req/s",
            "outcomes",
        ],
        rows,
    )
    targets = sorted(
        {p["target"] for p in points},
        key=["direct", "direct-mix", "tollway", "tollway-routed", "litellm"].index,
    )
    max_rps = {t: max(p["ok_per_s"] for p in points if p["target"] == t) for t in targets}
    rps_table = markdown_table(
        ["target", "max req/s (any point)"], [[t, fmt(max_rps[t], 1)] for t in targets]
    )

    verdict = []
    if "litellm" in targets:
        for tgt in ("tollway", "tollway-routed"):
            wins = [
                p["added_ms"]["p50"] < q["added_ms"]["p50"] and p["added_ms"]["p99"] < q["added_ms"]["p99"]
                for p in points
                if p["target"] == tgt
                for q in points
                if q["target"] == "litellm"
                and q["stream"] == p["stream"]
                and q["concurrency"] == p["concurrency"]
            ]
            verdict.append(
                f"- {tgt} adds less latency than LiteLLM (p50 and p99) at {sum(wins)} of {len(wins)} points."
            )
    verdict.extend(targets_met(points, max_rps))
    routed = [p for p in points if p["target"] == "tollway-routed"]
    dec99 = max((p["decision_ms"]["p99"] for p in routed), default=float("nan"))
    dip = data["decision_in_process"]
    verdict.append(
        f"- Routing decision p99: {fmt(dip['p99_ms'], 3)} ms timed in-process on {dip['n']} prompts "
        f"(p50 {fmt(dip['p50_ms'], 3)} ms); inside the loaded router, worst point's p99 from its histogram: "
        f"{fmt(dec99, 3)} ms (bucket-interpolated; includes event-loop contention)."
    )
    rss = data["rss_bytes"]
    mem = f"Router RSS after the run: {rss['tollway'] / 2**20:.0f} MiB"
    if rss.get("litellm"):
        mem += f"; LiteLLM proxy RSS: {rss['litellm'] / 2**20:.0f} MiB"
    settings = data["settings"]
    body = "\n".join(
        [
            "## Setup",
            "",
            f"- Three `tollway simulate` servers ({', '.join(MODELS)}), flags {SIM_FLAGS}: a fast backend, so the "
            "latency is mostly HTTP hops and Python. One process each.",
            "- `tollway router` (one process, one event loop on uvloop, httptools, no access log) with the three "
            "as backends; upstream calls over one aiohttp pool per endpoint.",
            f"- LiteLLM proxy {settings['litellm_version']} (`litellm[proxy]`, separate venv, one uvicorn worker, "
            "access log off, a master key sent with every request) with the same three simulators as "
            "`openai/<name>` deployments.",
            "- Client: this process, httpx.AsyncClient, one connection per client, keep-alive; the same "
            "`send_chat` for every target. Closed loop: each client sends its next request when the last ends. "
            f"{settings['requests_per_point_1_client']} requests per point at 1 client, "
            f"{settings['requests_per_point_more_clients']} at more (capped at {settings['max_seconds_per_point']} s), "
            f"after a warm-up; {settings['max_tokens']} completion tokens; prompts from the shipped history.",
            "- Added latency = target percentile - direct percentile at the same point (same run).",
            "- Routing sends each prompt to the model its estimate favours; without budgets that is mostly the "
            f"strongest: of the {sum(data['routed_mix'].values())} prompts, "
            + ", ".join(f"{m} {n}" for m, n in data["routed_mix"].items())
            + ". So routed throughput is capped by one simulator process, whatever the router costs; "
            "`direct-mix` sends the same prompts straight to the same models, the like-for-like baseline.",
            f"- 1-minute load average at the start: {data.get('load_average_1m_at_start')} (other engineers share "
            "this machine; above ~0.5 the cores were not ours alone).",
            "- **Core contention:** the load generator, the proxy under test and the three simulators all share "
            f"this machine's {data['machine_cpus']} cores. At 16 and 64 clients the client and the simulators "
            "take CPU from the proxy, so req/s is a whole-system figure and the added latency includes queueing "
            "for the CPU; it is the same handicap for tollway and LiteLLM.",
            "",
            "## Results",
            "",
            table,
            "",
            rps_table,
            "",
            "Throughput at each point, as a share of direct's at the same point:",
            "",
            throughput_ratios(points),
            "",
            "## Verdict",
            "",
            *verdict,
            f"- {mem}.",
            "",
        ]
    )
    fig, axes = new_figure(3, 1, size=(5.0, 3.8))
    styles = {
        "tollway": "tab:blue",
        "tollway-routed": "tab:green",
        "litellm": "tab:red",
        "direct": "tab:gray",
        "direct-mix": "tab:olive",
    }
    for stream, ls in ((False, "-"), (True, "--")):
        for t in targets:
            pts = sorted(
                (p for p in points if p["target"] == t and p["stream"] == stream),
                key=lambda p: p["concurrency"],
            )
            xs = [p["concurrency"] for p in pts]
            lab = f"{t}{' (stream)' if stream else ''}"
            if t not in direct_kinds:
                axes[0][0].plot(
                    xs, [p["added_ms"]["p50"] for p in pts], ls, marker="o", color=styles[t], label=lab
                )
                axes[0][1].plot(
                    xs, [p["added_ms"]["p99"] for p in pts], ls, marker="o", color=styles[t], label=lab
                )
            axes[0][2].plot(xs, [p["ok_per_s"] for p in pts], ls, marker="o", color=styles[t], label=lab)
    for ax, title in zip(
        axes[0], ("added latency p50 (ms)", "added latency p99 (ms)", "requests/s"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][2].legend(fontsize=7)
    paths = write_report(
        "proxy_overhead",
        title="Proxy overhead: tollway vs direct vs LiteLLM",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )
    return paths["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/proxy_overhead.py", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=400, help="requests per point at 1 client (x4 above)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cap per measurement point")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (not installed)")
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the report goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_seconds = 60, 5.0
    data = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    data["machine_cpus"] = os.cpu_count()
    print(report(data, args.out_dir).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
