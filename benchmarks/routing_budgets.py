"""Relative performance of PORT, tollway and the baselines at budget multipliers 0.5, 1 and 2.

    .venv/bin/python benchmarks/routing_budgets.py [--orders 20] [--embedder hashed] [--out benchmarks/results]

Uses the shipped RouterBench-derived history/stream split (router_service/data), the same code
and defaults (embedder, k, estimator) as `tollway eval` and the router, and writes
routing_budgets.{md,json,png} to --out. Each cell: share of Approx-Optimum (the LP on the same
estimates) / share of Optimum (the LP on true scores, the oracle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from router_service.evaluation.algorithms import TollwayOptions
from router_service.evaluation.cli import make_eval_embedder
from router_service.evaluation.runner import evaluate, make_orders
from router_service.evaluation.scenario import build_scenario
from router_service.routing.embedding import EmbeddingCache
from router_service.routing.history import load_builtin_history

ALGOS = [
    "tollway", "port", "port-lbfgsb", "greedy-perf", "greedy-cost", "knn-perf", "random",
    "approx-optimum", "optimum",
]  # fmt: skip
MULTIPLIERS = [0.5, 1.0, 2.0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--embedder", default="hashed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    history, stream = load_builtin_history("history"), load_builtin_history("stream")
    embedder = make_eval_embedder(args.embedder)
    base = build_scenario(history, stream, embedder, cache=EmbeddingCache(), seed=args.seed)
    orders = make_orders(base.n, args.orders, args.seed)
    table: dict[float, dict] = {}
    for mult in MULTIPLIERS:
        scn = base.with_budget(mult)
        res = evaluate(scn, ALGOS, orders, seed=args.seed, tollway=TollwayOptions())
        table[mult] = {name: r.to_json() for name, r in res.items()}
        print(
            f"budget {mult}: "
            + ", ".join(
                f"{n} {100 * r.relative_performance:.1f}% / {100 * r.of_optimum:.1f}%" for n, r in res.items()
            )
        )
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "routing_budgets"
        if args.embedder == "hashed"
        else f"routing_budgets_{args.embedder.replace(':', '_')}"
    )
    meta = {
        "history": len(history), "stream": base.n, "models": base.models, "orders": args.orders,
        "embedder": args.embedder, "seed": args.seed, "seconds": round(elapsed, 1),
        "command": f"python benchmarks/routing_budgets.py --orders {args.orders} --embedder {args.embedder}",
    }  # fmt: skip
    (out / f"{stem}.json").write_text(
        json.dumps({**meta, "results": {str(k): v for k, v in table.items()}}, indent=2)
    )

    lines = [
        f"% of Approx-Optimum / % of Optimum (the oracle), mean of {args.orders} orders; history {len(history)}, "
        f"stream {base.n} queries, {len(base.models)} models, embedder `{args.embedder}` ({embedder.name}), "
        f"k={base.k}, weighted split.",
        "",
        "| algorithm | "
        + " | ".join(f"budget {m}x: approx-opt / oracle (perf / served)" for m in MULTIPLIERS)
        + " |",
        "|---|" + "---|" * len(MULTIPLIERS),
    ]
    for name in ALGOS:
        cells = []
        for m in MULTIPLIERS:
            r = table[m][name]
            cells.append(
                f"{100 * r['relative_performance']:.1f}% / {100 * r['of_optimum']:.1f}% "
                f"({r['performance']:.1f} / {r['served']:.0f})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{meta['command']}` ({elapsed:.0f} s on this machine)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ALGOS:
        ys = [100 * table[m][name]["relative_performance"] for m in MULTIPLIERS]
        ax.plot(MULTIPLIERS, ys, marker="o", lw=2.5 if name == "tollway" else 1.2, label=name)
    ax.axhline(95, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(MULTIPLIERS, [str(m) for m in MULTIPLIERS])
    ax.set_xlabel("budget multiplier (x cost of the cheapest model on the stream)")
    ax.set_ylabel("% of Approx-Optimum performance")
    ax.set_title(f"RouterBench slices, {args.orders} orders, embedder {args.embedder}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
