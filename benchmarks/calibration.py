"""What `tollway calibrate` costs: throughput against simulators, and tokens for 500 prompts x 3 models.

Three `tollway simulate` child processes stand in for a pool (small / medium / large: an 8B-,
a 30B- and a 70B-class speed profile) and answer 500 lines of the built-in calibration set
(seeded sample) like three RouterBench models (skill files: the reference where that model scored
1, a wrong letter otherwise). `tollway calibrate` runs as its own process at several
``--concurrency`` levels (requests in flight per backend), each run from scratch:

- **server-bound** (simulators at speedup 1, so a request takes what the profile says a GPU takes):
  the throughput a real pool of that speed would give, and how concurrency buys it;
- **client-bound** (speedup 1000: the servers answer almost at once): the ceiling of the
  calibration client itself on this machine.

Throughput is graded answers (line x model) per second of the run (`run.seconds` in the summary,
process start-up excluded) and dataset lines per second (answers / 3); ratios are against
concurrency 1 in the same run. Tokens are the servers' own `usage` (the simulator's tokenizer:
~1.2-1.3 tokens per English word, close to BPE tokenizers). The judge's cost is measured the
same way on the judge-graded code set (a simulated coder and a simulated judge).

    .venv/bin/python benchmarks/calibration.py [--lines 500] [--concurrency 1 4 16 64]

Writes benchmarks/results/calibration.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import TOLLWAY, markdown_table, write_report  # noqa: E402

from router_service.calibration.dataset import CalibrationItem, load_dataset  # noqa: E402
from router_service.calibration.graders import judge_prompt, load_judge_template  # noqa: E402
from router_service.calibration.simulated import skill_lines, write_skill  # noqa: E402
from router_service.routing.history import load_builtin_history  # noqa: E402
from router_service.simulator import SimulatorProcess, SimulatorProfile  # noqa: E402

POOL = {
    "small": (
        "mistralai/mistral-7b-chat",
        {"prefill_tokens_per_second": 20000.0, "decode_tokens_per_second": 90.0},
    ),
    "medium": (
        "mistralai/mixtral-8x7b-chat",
        {"prefill_tokens_per_second": 10000.0, "decode_tokens_per_second": 60.0},
    ),
    "large": ("gpt-4-1106-preview", {"prefill_tokens_per_second": 4000.0, "decode_tokens_per_second": 30.0}),
}
JUDGE_LINES = 60


def sample(lines: int, seed: int) -> list[CalibrationItem]:
    items = load_dataset("builtin").items
    rng = np.random.default_rng(seed)
    return [items[i] for i in sorted(rng.choice(len(items), size=min(lines, len(items)), replace=False))]


def true_scores(items: list[CalibrationItem]) -> np.ndarray:
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    columns = [history.model_index(col) for col, _ in POOL.values()]
    return history.scores[[row[i.prompt] for i in items]][:, columns]


def run_calibrate(args: list[str], workdir: Path) -> tuple[dict[str, Any], float, float]:
    """(summary, wall seconds, CPU seconds of the calibrate process)."""
    summary = workdir / f"summary-{time.monotonic_ns()}.json"
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [str(TOLLWAY), "calibrate", *args, "--json", str(summary), "--no-progress"],
        cwd=workdir, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"tollway calibrate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(summary.read_text()), wall, cpu


def throughput(items: list[CalibrationItem], workdir: Path, speedup: float, levels: list[int]) -> list[dict]:
    scores = true_scores(items)
    dataset = workdir / "set.jsonl"
    dataset.write_text("".join(i.model_dump_json(exclude_none=True) + "\n" for i in items))
    sims = []
    try:
        backends = []
        for j, (name, (_, speed)) in enumerate(POOL.items()):
            skill = write_skill(skill_lines(items, scores[:, j]), workdir / f"{name}.skill.jsonl")
            profile = SimulatorProfile(model=name, speedup=speedup, skill=str(skill), **speed)
            sims.append(SimulatorProcess(profile, log_path=workdir / f"{name}.log").start())
            backends += ["--backend", f"{name}={sims[-1].url}"]
        rows = []
        for level in levels:
            out = workdir / f"history-{speedup:g}-{level}.jsonl"
            doc, wall, cpu = run_calibrate(
                ["--dataset", str(dataset), *backends, "--out", str(out), "--concurrency", str(level)],
                workdir,
            )
            run = doc["run"]
            assert run["failures"] == 0 and run["pairs_answered"] == 3 * len(items), run
            rows.append(
                {
                    "speedup": speedup,
                    "concurrency": level,
                    "answers": run["pairs_answered"],
                    "seconds": run["seconds"],
                    "command_seconds": round(wall, 3),
                    "command_cpu_seconds": round(cpu, 3),
                    "cpu_ms_per_answer": 1000 * cpu / run["pairs_answered"],
                    "answers_per_second": run["pairs_answered"] / run["seconds"],
                    "lines_per_second": len(items) / run["seconds"],
                    "summary": doc,
                }
            )
            print(
                f"speedup {speedup:g} concurrency {level}: {rows[-1]['answers_per_second']:.1f} answers/s",
                flush=True,
            )
        return rows
    finally:
        for sim in sims:
            sim.stop()


def judge_cost(workdir: Path) -> dict[str, Any]:
    """Judge tokens per judge-graded line: a coder answering with the reference, a judge saying SCORE: 1."""
    items = load_dataset("builtin:code").items[:JUDGE_LINES]
    template = load_judge_template()
    verdict = "The answer implements the same behaviour as the reference.\nSCORE: 1"
    coder_skill = write_skill(
        [{"prompt": i.prompt, "answer": i.reference} for i in items], workdir / "coder.jsonl"
    )
    judge_skill = write_skill(
        [
            {"prompt": judge_prompt(i.prompt, i.reference, i.reference, template), "answer": verdict}
            for i in items
        ],
        workdir / "judge.jsonl",
    )
    dataset = workdir / "code.jsonl"
    dataset.write_text("".join(i.model_dump_json(exclude_none=True) + "\n" for i in items))
    with (
        SimulatorProcess(SimulatorProfile(model="coder", speedup=1000, skill=str(coder_skill))) as coder,
        SimulatorProcess(SimulatorProfile(model="judge", speedup=1000, skill=str(judge_skill))) as judge,
    ):
        doc, _, _ = run_calibrate(
            ["--dataset", str(dataset), "--backend", f"coder={coder.url}", "--judge", f"judge={judge.url}",
             "--out", str(workdir / "code-history.jsonl")],
            workdir,
        )  # fmt: skip
    model = doc["models"]["coder"]
    return {
        "lines": len(items),
        "mean_score": model["mean_score"],
        "answer_tokens_per_line": (model["prompt_tokens"] + model["completion_tokens"]) / len(items),
        "judge_tokens_per_line": doc["totals"]["judge_tokens"] / len(items),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    items = sample(args.lines, args.seed)
    with tempfile.TemporaryDirectory(prefix="tollway-calibration-") as tmp:
        workdir = Path(tmp)
        rows = throughput(items, workdir, 1.0, args.concurrency) + throughput(
            items, workdir, 1000.0, args.concurrency
        )
        judge = judge_cost(workdir)

    # Tokens of the 500 x 3 calibration (identical in every run: same answers).
    summary = rows[0]["summary"]
    per_model = {
        name: {
            "prompt_tokens": m["prompt_tokens"],
            "completion_tokens": m["completion_tokens"],
            "mean_score": m["mean_score"],
        }
        for name, m in summary["models"].items()
    }
    total_tokens = summary["totals"]["model_tokens"]
    chars_over_4 = sum(len(i.prompt) for i in items) / 4 * len(POOL)
    mean_prompt = per_model["large"]["prompt_tokens"] / len(items)
    large_rate = POOL["large"][1]["prefill_tokens_per_second"] / mean_prompt
    client_cpu = float(np.median([r["cpu_ms_per_answer"] for r in rows if r["speedup"] == 1000.0]))
    n = len(items)

    table_rows = []
    for speedup in (1.0, 1000.0):
        base = next(r for r in rows if r["speedup"] == speedup and r["concurrency"] == args.concurrency[0])
        for r in (r for r in rows if r["speedup"] == speedup):
            table_rows.append(
                [
                    "server-bound (speedup 1)" if speedup == 1.0 else "client-bound (speedup 1000)",
                    r["concurrency"],
                    f"{r['seconds']:.1f}",
                    f"{r['answers_per_second']:.1f}",
                    f"{r['lines_per_second']:.1f}",
                    f"{r['answers_per_second'] / base['answers_per_second']:.2f}x",
                    f"{r['cpu_ms_per_answer']:.2f}",
                ]
            )
    token_rows = [
        [
            name,
            f"{m['prompt_tokens']:,}",
            f"{m['completion_tokens']:,}",
            f"{m['prompt_tokens'] + m['completion_tokens']:,}",
            f"{m['mean_score']:.3f}",
        ]
        for name, m in per_model.items()
    ]
    token_rows.append(["**all 3**", "", "", f"**{total_tokens:,}**", ""])
    body = "\n".join(
        [
            f"{n} lines of the built-in set (ARC-Challenge + Winogrande, seeded sample), 3 simulated models, "
            f"each run from scratch (a fresh `--out`); `--concurrency` = requests in flight per backend.",
            "",
            "## Throughput",
            "",
            markdown_table(
                [
                    "regime",
                    "concurrency",
                    "run (s)",
                    "answers/s",
                    "lines/s (x3 models)",
                    "vs concurrency " + str(args.concurrency[0]),
                    "calibrate CPU ms/answer",
                ],
                table_rows,
            ),
            "",
            f"Server-bound, a run lasts as long as the slowest model needs: prefill dominates (~{mean_prompt:.0f} "
            "prompt tokens per line, one-token answers), and the simulated `large` prefills "
            f"{POOL['large'][1]['prefill_tokens_per_second']:,.0f} tokens/s, i.e. at most {large_rate:.1f} lines/s "
            "at any concurrency; more than one request in flight only overlaps the per-request overhead. "
            f"Client-bound, `tollway calibrate` spends {client_cpu:.1f} ms of CPU per graded answer (request, "
            f"parsing, grading, journal) whatever the concurrency, a ceiling of ~{1000 / client_cpu:.0f} answers/s "
            "on one core; once a few requests are in flight in all the client is that bound, and on this shared "
            "2-core host (see the load average above) wall-clock throughput at 16-64 varies from run to run while "
            "the CPU per answer does not.",
            "",
            f"## Tokens of a {n}-line calibration of a 3-model pool",
            "",
            markdown_table(
                ["model", "prompt tokens", "completion tokens", "total", "mean score"], token_rows
            ),
            "",
            f"Per line and model: {total_tokens / (n * len(POOL)):.0f} tokens (the few-shot prompts dominate; "
            f"answers are one option letter). The router's chars/4 estimate of the same prompts: {chars_over_4:,.0f} "
            "tokens for the pool.",
            "",
            "## Judge-graded lines (built-in code set)",
            "",
            f"{judge['lines']} MBPP lines, a simulated coder answering with the reference and a simulated judge: "
            f"{judge['answer_tokens_per_line']:.0f} tokens per answer, **{judge['judge_tokens_per_line']:.0f} judge tokens "
            f"per graded answer** (rubric + question + reference + answer + a two-line verdict). "
            f"500 judge-graded lines x 3 models would add ~{judge['judge_tokens_per_line'] * 1500:,.0f} judge tokens.",
        ]
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for speedup, label in [(1.0, "server-bound (speedup 1)"), (1000.0, "client-bound (speedup 1000)")]:
        pts = [r for r in rows if r["speedup"] == speedup]
        ax.plot(
            [r["concurrency"] for r in pts], [r["answers_per_second"] for r in pts], marker="o", label=label
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("--concurrency (requests in flight per backend)")
    ax.set_ylabel("graded answers per second")
    ax.set_title(f"tollway calibrate: {n} lines x 3 simulated models")
    ax.legend()
    ax.grid(alpha=0.3)
    data = {
        "lines": n,
        "models": {name: col for name, (col, _) in POOL.items()},
        "throughput": [{k: v for k, v in r.items() if k != "summary"} for r in rows],
        "tokens": {"per_model": per_model, "total": total_tokens, "chars_over_4_estimate": chars_over_4},
        "judge": judge,
    }
    paths = write_report(
        "calibration", title="Calibration throughput and token cost", body_md=body, data=data, figure=fig
    )
    print(body)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
