"""How much of the oracle can an estimate that only knows each query's task reach?

    .venv/bin/python benchmarks/estimate_ceiling.py [--orders 20] [--out benchmarks/results]

On the shipped RouterBench-derived split, tollway replays the held-out stream with three quality
estimates and the same cost estimates, budgets and algorithm:

- the router's default (the mean over the k nearest history neighbours);
- each model's mean score over the history queries of the same task (what a perfect task
  classifier plus the history would give);
- each model's mean score over the *stream's own* queries of the same task: an oracle that knows
  the true per-task means of the very queries it routes, the best-informed estimate that only
  tells the tasks apart.

Each cell: quality served as a share of the Optimum (the LP on true per-query scores).
Writes estimate_ceiling.{md,json,png} to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from router_service.evaluation.cli import make_eval_embedder
from router_service.evaluation.runner import evaluate, make_orders
from router_service.evaluation.scenario import build_scenario
from router_service.routing.embedding import EmbeddingCache
from router_service.routing.history import load_builtin_history

MULTIPLIERS = [0.5, 1.0, 2.0]


def task_means(tasks_from: np.ndarray, scores_from: np.ndarray, tasks_to: np.ndarray) -> np.ndarray:
    """Each query's estimate: every model's mean score over the `from` queries of its task."""
    out = np.zeros((len(tasks_to), scores_from.shape[1]))
    for task in np.unique(tasks_to):
        out[tasks_to == task] = np.nanmean(scores_from[tasks_from == task], axis=0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    history, stream = load_builtin_history("history"), load_builtin_history("stream")
    base = build_scenario(
        history, stream, make_eval_embedder("hashed:256"), cache=EmbeddingCache(), seed=args.seed
    )
    tasks_h, tasks_s = np.array(history.eval_names), np.array(stream.eval_names)
    estimates = {
        f"k-nearest neighbours (default, k={base.k})": base.est_quality,
        "history mean of the query's task": task_means(tasks_h, history.scores, tasks_s),
        "stream's own mean of the query's task (oracle)": task_means(tasks_s, stream.scores, tasks_s),
    }
    orders = make_orders(base.n, args.orders, args.seed)
    table: dict[str, dict[float, float]] = {name: {} for name in estimates}
    for mult in MULTIPLIERS:
        for name, quality in estimates.items():
            scn = dataclasses.replace(base, est_quality=quality).with_budget(mult)
            res = evaluate(scn, ["tollway", "optimum"], orders, seed=args.seed)
            table[name][mult] = res["tollway"].performance / res["optimum"].performance
            print(f"budget {mult}x  {name}: {100 * table[name][mult]:.1f}% of the oracle", flush=True)
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/estimate_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "command": command.strip(),
        "orders": args.orders,
        "stream_queries": base.n,
        "share_of_optimum": {name: {str(m): v for m, v in row.items()} for name, row in table.items()},
        "seconds": elapsed,
        "load_average": os.getloadavg(),
    }
    (out / "estimate_ceiling.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# How far estimates can take routing on these tasks",
        "",
        f"tollway on the held-out stream ({base.n} queries, {args.orders} orders), quality served as a share of "
        "the oracle (the LP on true per-query scores), with three quality estimates (same costs and budgets):",
        "",
        "| estimate | " + " | ".join(f"{m}x" for m in MULTIPLIERS) + " |",
        "|---|" + "---|" * len(MULTIPLIERS),
    ]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]:.1f}%" for m in MULTIPLIERS) + " |")
    lines += [
        "",
        "The last row knows the true mean of every model over the stream's own queries of each task, the "
        "best-informed estimate that only tells the tasks apart. The neighbour estimate serves about as much "
        "(more at 1x, less at 2x): what separates tollway from the oracle here is per-query knowledge (which "
        "questions a cheap model gets right) that neither lexical nor MiniLM neighbours carry on these three "
        "tasks (benchmarks/results/estimators.md), not a better use of task-level information.",
        "",
        f"Command: `{doc['command']}`; {elapsed:.0f} s on {os.cpu_count()} CPUs.",
    ]
    (out / "estimate_ceiling.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.items()):
        xs = np.arange(len(MULTIPLIERS)) + i * width
        ax.bar(xs, [100 * row[m] for m in MULTIPLIERS], width, label=name)
    ax.set_xticks(
        np.arange(len(MULTIPLIERS)) + width * (len(table) - 1) / 2, [f"{m}x budget" for m in MULTIPLIERS]
    )
    ax.set_ylabel("quality served, % of oracle")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Neighbour estimates vs the best-informed task-level estimate")
    fig.tight_layout()
    fig.savefig(out / "estimate_ceiling.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
