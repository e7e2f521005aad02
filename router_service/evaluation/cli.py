"""`tollway eval`: replay a query stream through routing algorithms under per-model budgets.

    tollway eval --history FILE [FILE ...] --stream FILE [FILE ...] [--budget 1.0]
                 [--split weighted] [--algorithms port,tollway,...] [--orders 20]
                 [--embedder NAME] [--k K] [--weighting uniform|similarity] [--temperature T]
                 [--shrinkage L] [--prior neighbourhood|global] [--prior-k K] [--choose-k]
                 [--seed 0] [--json OUT] [--plot OUT.png]

Files are RouterBench CSVs or tollway JSONL. A file carrying split labels (the shipped
``routerbench_history.jsonl.gz``) contributes its "history" rows to --history and its "stream"
rows to --stream. When --history and --stream name the same unlabelled files (e.g. the RouterBench
train CSVs), they are split 80/20 per task with the same seeded split as the shipped file.
Without --history/--stream the shipped data is used. The embedder and estimator default to the
router's own defaults (`router_service.config`).

Next to each algorithm's performance it reports the share of Approx-Optimum (the LP on the same
estimates: how well the policy uses them) and of Optimum (the LP on true values, the oracle: the
quality served per budget), and the estimates' own accuracy (`evaluation.accuracy`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from router_service.config import AnnSettings, EmbeddingSettings, EstimatorSettings
from router_service.evaluation.accuracy import EstimateAccuracy, estimate_accuracy
from router_service.evaluation.algorithms import ALGORITHMS, DEFAULT_ALGORITHMS, TollwayOptions
from router_service.evaluation.runner import AlgorithmSummary, evaluate, make_orders
from router_service.evaluation.scenario import build_scenario
from router_service.routing.budgets import SPLIT_STRATEGIES
from router_service.routing.embedding import (
    Embedder,
    EmbeddingCache,
    HashedNgramEmbedder,
    HybridEmbedder,
    MiniLMEmbedder,
    SentenceTransformerEmbedder,
)
from router_service.routing.history import BUILTIN_PATH, History, assign_split, load_histories

EMBEDDER_CHOICES = "hashed | hashed:DIM | minilm | sentence-transformers | st:PATH | hybrid | hybrid:W"


def make_eval_embedder(name: str) -> Embedder:
    """An embedder by name: hashed (the router's default dimension), hashed:DIM, minilm (numpy, no
    torch), sentence-transformers (the same model through torch), st:PATH (a local
    sentence-transformers model), hybrid[:W] (hashed, default dimension, + minilm; W = the hashed
    part's weight, default 0.5)."""
    if name == "hashed":
        return HashedNgramEmbedder(EmbeddingSettings().dimensions)
    if name.startswith("hashed:"):
        return HashedNgramEmbedder(int(name.split(":", 1)[1]))
    if name in {"minilm", "all-MiniLM-L6-v2"}:
        return MiniLMEmbedder(None)
    if name == "sentence-transformers":
        return SentenceTransformerEmbedder(None)
    if name.startswith("st:"):
        return SentenceTransformerEmbedder(name[3:])
    if name == "hybrid" or name.startswith("hybrid:"):
        w = float(name.split(":", 1)[1]) if ":" in name else 0.5
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"--embedder {name!r}: the hashed part's weight must be within [0, 1]")
        return HybridEmbedder(
            [HashedNgramEmbedder(EmbeddingSettings().dimensions), MiniLMEmbedder(None)], [w, 1 - w]
        )
    raise ValueError(f"--embedder {name!r}: use {EMBEDDER_CHOICES}")


def load_inputs(history_files: list[str], stream_files: list[str], seed: int = 0) -> tuple[History, History]:
    hist = load_histories(history_files)
    if sorted(map(str, history_files)) == sorted(map(str, stream_files)):
        both = hist if hist.split is not None else assign_split(hist, 0.2, seed=0)
        return both.part("history"), both.part("stream")
    stream = load_histories(stream_files)
    if hist.split is not None:
        hist = hist.part("history")
    if stream.split is not None:
        stream = stream.part("stream")
    return hist, stream


def format_table(results: dict[str, AlgorithmSummary]) -> str:
    head = (
        f"{'algorithm':<16}{'performance':>12}{'cost ($)':>11}{'perf/cost':>11}{'served':>9}"
        f"{'relative':>10}{'of optimum':>12}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        rel = "-" if r.relative_performance is None else f"{100 * r.relative_performance:.1f}%"
        opt = "-" if r.of_optimum is None else f"{100 * r.of_optimum:.1f}%"
        lines.append(
            f"{name:<16}{r.performance:>12.2f}{r.cost:>11.4f}{r.performance_per_cost:>11.1f}{r.served:>9.1f}"
            f"{rel:>10}{opt:>12}"
        )
    return "\n".join(lines)


def describe_estimator(s: EstimatorSettings) -> str:
    text = s.weighting + (f" T={s.temperature:g}" if s.weighting == "similarity" else "")
    if s.shrinkage > 0:
        text += f", shrinkage {s.shrinkage:g} toward the {s.prior} mean" + (
            f" ({s.prior_k} entries)" if s.prior == "neighbourhood" else ""
        )
    return text + (", k by leave-one-out" if s.choose_k else "")


def format_accuracy(acc: EstimateAccuracy) -> str:
    per_model = ", ".join(f"{m} {e:.3f}" for m, e in acc.mae_per_model.items())
    return (
        f"estimates on the stream: quality MAE {acc.mae:.3f}, squared error {acc.brier:.4f}, "
        f"best model agrees with the truth on {100 * acc.top1_agreement:.1f}% of queries, "
        f"rank correlation {acc.rank_correlation:.3f}, cost error {100 * acc.cost_error:.1f}%\n"
        f"quality MAE per model: {per_model}"
    )


def plot_bars(results: dict[str, AlgorithmSummary], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    rel = [100 * (results[n].relative_performance or 0.0) for n in names]
    ax.bar(names, rel, color=["tab:green" if n == "tollway" else "tab:blue" for n in names])
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("relative performance (% of approx-optimum)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_reject(text: str) -> float | None:
    return None if text.lower() in {"none", "off"} else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollway eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", nargs="+", default=[str(BUILTIN_PATH)], metavar="FILE")
    parser.add_argument("--stream", nargs="+", default=[str(BUILTIN_PATH)], metavar="FILE")
    parser.add_argument("--budget", type=float, default=1.0, help="multiplier on the cheapest model's total")
    parser.add_argument("--split", default="weighted", choices=SPLIT_STRATEGIES)
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS))
    parser.add_argument("--orders", type=int, default=20)
    defaults = EstimatorSettings()
    parser.add_argument("--embedder", default="hashed", help=EMBEDDER_CHOICES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=AnnSettings().k, help="neighbours per query")
    parser.add_argument("--weighting", default=defaults.weighting, choices=["uniform", "similarity"])
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="similarity kernel")
    parser.add_argument("--shrinkage", type=float, default=defaults.shrinkage, help="prior pseudo-neighbours")
    parser.add_argument("--prior", default=defaults.prior, choices=["neighbourhood", "global"])
    parser.add_argument("--prior-k", type=int, default=defaults.prior_k)
    parser.add_argument("--choose-k", action="store_true", help="k by leave-one-out (up to --k)")
    parser.add_argument("--alpha", type=float, default=1e-4, help="quality weight (costs in USD)")
    parser.add_argument("--eps", type=float, default=0.025, help="learning fraction (PORT and tollway)")
    parser.add_argument("--refit-every", type=int, default=50, help="tollway: re-fit gamma every N queries")
    parser.add_argument("--reject-below", type=_parse_reject, default=0.0, help="tollway: float or 'none'")
    parser.add_argument("--json", dest="json_out", metavar="OUT")
    parser.add_argument("--plot", metavar="OUT.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    if args.orders < 1:
        parser.error("--orders must be >= 1")
    if args.budget <= 0:
        parser.error("--budget must be > 0")
    try:
        history, stream = load_inputs(args.history, args.stream, args.seed)
        embedder = make_eval_embedder(args.embedder)
        estimator = EstimatorSettings(
            weighting=args.weighting, temperature=args.temperature, shrinkage=args.shrinkage,
            prior=args.prior, prior_k=args.prior_k, choose_k=args.choose_k,
        )  # fmt: skip
        if not 1 <= args.k <= 256:
            raise ValueError(f"--k must be within 1..256, got {args.k}")
    except (OSError, ValueError, KeyError) as exc:
        print(f"tollway eval: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    scn = build_scenario(
        history, stream, embedder, k=args.k, estimator=estimator, multiplier=args.budget, split=args.split,
        alpha=args.alpha, cache=EmbeddingCache(), seed=args.seed,
    )  # fmt: skip
    accuracy = estimate_accuracy(scn.models, scn.est_quality, scn.true_quality, scn.est_cost, scn.true_cost)
    orders = make_orders(scn.n, args.orders, args.seed)
    options = TollwayOptions(
        refit_every=args.refit_every, reject_below=args.reject_below, warmup_fraction=args.eps
    )
    from tqdm import tqdm

    with tqdm(
        total=len(orders), desc="orders", unit="order", disable=args.no_progress, file=sys.stderr
    ) as bar:
        results = evaluate(
            scn, algorithms, orders, seed=args.seed, tollway=options, on_order=lambda: bar.update()
        )
    elapsed = time.perf_counter() - t0

    skipped = {"history": history.skipped, "stream": stream.skipped}
    print(
        f"history {len(history)} queries, stream {scn.n} queries, {len(scn.models)} models, "
        f"rows skipped for missing cells (per input file set): {skipped}; budget {args.budget} x cheapest = "
        f"${scn.budgets.sum():.4f} ({args.split} split); {args.orders} orders; embedder {embedder.name}; "
        f"estimator k={scn.k} {describe_estimator(estimator)}; {elapsed:.1f}s"
    )
    print(format_table(results))
    print(format_accuracy(accuracy))
    if args.json_out:
        doc = {
            "n": scn.n,
            "history_size": len(history),
            "models": scn.models,
            "budget": args.budget,
            "budget_total": float(scn.budgets.sum()),
            "budgets": dict(zip(scn.models, map(float, scn.budgets), strict=True)),
            "split": args.split,
            "orders": args.orders,
            "seed": args.seed,
            "embedder": embedder.name,
            "k": scn.k,
            "estimator": estimator.to_wire(),
            "skipped": skipped,
            "results": {name: r.to_json() for name, r in results.items()},
            "estimates": accuracy.to_json(),
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=2))
    if args.plot:
        plot_bars(results, args.plot, f"budget {args.budget}x, {args.split} split, {args.orders} orders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
