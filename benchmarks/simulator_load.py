"""Is `tollway simulate` cheap enough to never be the bottleneck, and does it keep to its model?

Starts one simulator as a child process (speedup 1, so simulated time = wall time), fires N
concurrent streaming (and non-streaming) completions at it, and reports:

- the simulator process's CPU use during the run (from /proc), as a fraction of one core;
- the mean end-to-end latency the simulator measured (vllm:e2e_request_latency_seconds) next to
  what the pure capacity model predicts for the same requests arriving together.

    .venv/bin/python benchmarks/simulator_load.py [--concurrency 64 128 256] [--tokens 100]

Writes benchmarks/results/simulator_load.{md,json} (and the simulator's log next to them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router_service.simulator import SimulatorProcess, SimulatorProfile  # noqa: E402
from router_service.simulator.capacity import Scheduler  # noqa: E402
from router_service.simulator.textgen import count_tokens  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def predicted_mean_e2e(profile: SimulatorProfile, prompts: list[str], tokens: int) -> float:
    """Mean e2e of the pure capacity model for these requests all arriving at t=0."""
    scheduler = Scheduler(profile)
    seqs = [scheduler.add(count_tokens(p), tokens, now=0.0) for p in prompts]
    now = 0.0
    for _ in range(10_000_000):
        result = scheduler.step(now)
        if result is None:
            break
        now = result.end
    overhead = profile.ttft_ms / 1000
    return overhead + sum(s.finished_at or 0.0 for s in seqs) / len(seqs)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def run_case(profile: SimulatorProfile, concurrency: int, tokens: int, stream: bool) -> dict:
    prompts = [f"benchmark request {i} " * 10 for i in range(concurrency)]
    with SimulatorProcess(profile, log_path=RESULTS / "simulator_load.log") as sim:
        assert sim.process is not None
        limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
        async with httpx.AsyncClient(limits=limits, timeout=300) as client:

            async def one(prompt: str) -> int:
                body = {"model": profile.model, "prompt": prompt, "max_tokens": tokens, "stream": stream}
                if not stream:
                    response = await client.post(f"{sim.base_url}/completions", json=body)
                    return response.json()["usage"]["completion_tokens"]
                chunks = 0
                async with client.stream("POST", f"{sim.base_url}/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        chunks += line.startswith("data: {")
                return chunks

            cpu0, t0 = cpu_seconds(sim.process.pid), time.perf_counter()
            generated = await asyncio.gather(*(one(p) for p in prompts))
            wall, cpu = time.perf_counter() - t0, cpu_seconds(sim.process.pid) - cpu0
            text = (await client.get(f"{sim.url}/metrics")).text
    if generated != [tokens] * concurrency:
        raise AssertionError(f"wrong token counts: {sorted(set(generated))}")
    e2e_sum = metric(text, "vllm:e2e_request_latency_seconds_sum")
    e2e_count = metric(text, "vllm:e2e_request_latency_seconds_count")
    return {
        "concurrency": concurrency,
        "stream": stream,
        "tokens_per_request": tokens,
        "wall_s": round(wall, 3),
        "simulator_cpu_s": round(cpu, 3),
        "simulator_cpu_fraction_of_one_core": round(cpu / wall, 3),
        "measured_mean_e2e_s": round(e2e_sum / e2e_count, 3),
        "model_mean_e2e_s_all_arrive_at_0": round(predicted_mean_e2e(profile, prompts, tokens), 3),
        "tokens_per_s_delivered": round(concurrency * tokens / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args(argv)
    profile = SimulatorProfile(model="bench", max_num_seqs=256, decode_tokens_per_second=60.0, speedup=1.0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for concurrency in args.concurrency:
        for stream in (True, False):
            row = asyncio.run(run_case(profile, concurrency, args.tokens, stream))
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "command": "benchmarks/simulator_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "profile": profile.model_dump(mode="json"),
    }
    (RESULTS / "simulator_load.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    header = (
        "| concurrency | stream | wall s | sim CPU (1 core) | mean e2e s (measured) | mean e2e s (model) |"
    )
    lines = [
        "# simulator_load",
        "",
        f"`{meta['command']}` on {meta['machine']}. Load generator and simulator share the machine.",
        "",
        header,
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['stream']} | {r['wall_s']} | {r['simulator_cpu_fraction_of_one_core']:.0%} "
            f"| {r['measured_mean_e2e_s']} | {r['model_mean_e2e_s_all_arrive_at_0']} |"
        )
    (RESULTS / "simulator_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
