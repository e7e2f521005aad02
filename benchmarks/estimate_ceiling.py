"""How much of the oracle can estimates reach on these tasks, and what would it take to get closer?

    .venv/bin/python benchmarks/estimate_ceiling.py [--orders 20] [--out benchmarks/results]

Three analyses on the shipped RouterBench-derived data (history 1,764 and stream 441 queries, 11
models, 0/1 scores); nothing here is tuned, so nothing needs a held-out split of its own:

1. **Task-level estimates.** tollway replays the held-out stream with three quality estimates and
   the same cost estimates, budgets and algorithm: the router's default (the mean over the k
   nearest history neighbours); each model's mean score over the history queries of the same task;
   and each model's mean over the *stream's own* queries of the same task, an oracle that knows the
   true per-task means of the very queries it routes (the best-informed estimate that only tells
   the tasks apart).
2. **Per-query signal in neighbours.** Over all 2,205 queries, leave-one-out: how well does the
   mean over a query's k nearest other queries estimate its 0/1 scores (squared error), against
   each model's mean over the other queries of its task? And how much do a query's scores and its
   nearest neighbour's agree beyond their tasks' means (the correlation of the residuals)? For
   hashed n-grams and MiniLM, on the whole prompt and on the question alone (the prompt's last
   paragraph, without the five worked examples every arc-challenge and winogrande prompt shares).
3. **Where the gap to the oracle lies.** tollway on the stream with the default estimates, then
   with one part replaced by what the oracle knows: the prompt's share of the cost made exact (the
   form the online router uses: known prompt tokens + the neighbours' completion tokens, priced with
   each model's USD per token recovered from the history by non-negative least squares), the true
   costs, the true scores.

Each share: quality served by tollway over the Optimum's (the LP on true per-query scores and
costs), over `--orders` random orders. Writes estimate_ceiling.{md,json,png} to --out.
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
from scipy.optimize import nnls
from tqdm import tqdm

from router_service.evaluation.cli import make_eval_embedder
from router_service.evaluation.runner import evaluate, make_orders
from router_service.evaluation.scenario import Scenario, build_scenario
from router_service.routing.embedding import EmbeddingCache
from router_service.routing.history import History, load_builtin_history

MULTIPLIERS = [0.5, 1.0, 2.0]
NEIGHBOUR_KS = (1, 5, 20, 50, 200)
SIGNAL_EMBEDDERS = (
    ("hashed:256", "whole prompt"),
    ("hashed:256", "question only"),
    ("minilm", "whole prompt"),
    ("minilm", "question only"),
)


def task_means(tasks_from: np.ndarray, scores_from: np.ndarray, tasks_to: np.ndarray) -> np.ndarray:
    """Each query's estimate: every model's mean score over the `from` queries of its task."""
    out = np.zeros((len(tasks_to), scores_from.shape[1]))
    for task in np.unique(tasks_to):
        out[tasks_to == task] = np.nanmean(scores_from[tasks_from == task], axis=0)
    return out


def leave_one_out_task_means(tasks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each query's estimate: every model's mean over the *other* queries of its task."""
    out = np.zeros_like(scores, dtype=np.float64)
    for task in np.unique(tasks):
        rows = tasks == task
        n = int(rows.sum())
        out[rows] = (scores[rows].sum(axis=0) - scores[rows]) / max(n - 1, 1)
    return out


def question_only(prompt: str) -> str:
    """The prompt's last paragraph (after its last blank line): the question being asked, without
    the worked examples a few-shot prompt shares with every other query of its task."""
    text = prompt.rstrip()
    cut = text.rfind("\n\n")
    return text[cut + 2 :] if cut >= 0 else text


def neighbour_signal(
    vectors: np.ndarray, scores: np.ndarray, tasks: np.ndarray, ks: tuple[int, ...] = NEIGHBOUR_KS
) -> dict:
    """Leave-one-out squared error of the k-nearest-neighbour mean per k (exact cosine search), and
    the correlation between a query's and its nearest neighbour's scores beyond their task means."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    errors = {k: float(np.mean((scores[order[:, :k]].mean(axis=1) - scores) ** 2)) for k in ks}
    means = task_means(tasks, scores, tasks)
    residual = scores - means
    nearest = order[:, 0]
    corr = float(np.corrcoef(residual.ravel(), residual[nearest].ravel())[0, 1])
    return {"squared_error": errors, "nearest_residual_correlation": corr}


def usd_per_token(history: History) -> np.ndarray:
    """[m, 2] USD per prompt and per completion token, by non-negative least squares of each model's
    cost on the history's prompt and completion tokens."""
    prompt, completion = history.prompt_tokens, history.completion_tokens
    return np.array(
        [
            nnls(np.column_stack([prompt, completion[:, i]]), history.costs[:, i])[0]
            for i in range(len(history.models))
        ]
    )


def share_of_oracle(scn: Scenario, orders: list[np.ndarray], seed: int) -> dict[float, float]:
    out = {}
    for mult in MULTIPLIERS:
        res = evaluate(scn.with_budget(mult), ["tollway", "optimum"], orders, seed=seed)
        out[mult] = res["tollway"].performance / res["optimum"].performance
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    cache = EmbeddingCache()
    history, stream = load_builtin_history("history"), load_builtin_history("stream")
    base = build_scenario(history, stream, make_eval_embedder("hashed:256"), cache=cache, seed=args.seed)
    orders = make_orders(base.n, args.orders, args.seed)
    tasks_h, tasks_s = np.array(history.eval_names), np.array(stream.eval_names)

    # 1. Task-level estimates.
    default = f"k-nearest neighbours (default, k={base.k})"
    task_level = {
        default: base.est_quality,
        "history mean of the query's task": task_means(tasks_h, history.scores, tasks_s),
        "stream's own mean of the query's task (oracle)": task_means(tasks_s, stream.scores, tasks_s),
    }
    table1 = {
        name: share_of_oracle(dataclasses.replace(base, est_quality=q), orders, args.seed)
        for name, q in tqdm(task_level.items(), desc="task-level estimates", file=sys.stderr)
    }

    # 2. Per-query signal in neighbours, leave-one-out over every shipped query.
    everything = load_builtin_history()
    tasks_all = np.array(everything.eval_names)
    task_error = float(
        np.mean((leave_one_out_task_means(tasks_all, everything.scores) - everything.scores) ** 2)
    )
    signal = {}
    for embedder, view in tqdm(SIGNAL_EMBEDDERS, desc="neighbour signal", file=sys.stderr):
        texts = (
            everything.prompts if view == "whole prompt" else [question_only(p) for p in everything.prompts]
        )
        vectors = cache.embed(make_eval_embedder(embedder), texts)
        signal[f"{embedder}, {view}"] = neighbour_signal(vectors, everything.scores, tasks_all)

    # 3. Where the gap lies: one part of the estimate replaced by what the oracle knows.
    prices = usd_per_token(history)
    completion = history.completion_tokens
    known_prompt_cost = (
        stream.prompt_tokens[:, None] * prices[:, 0]
        + completion[base.neighbour_ids].mean(axis=1) * prices[:, 1]
    )
    replaced = {
        "+ the prompt's share of the cost exact": dataclasses.replace(base, est_cost=known_prompt_cost),
        "+ true costs": dataclasses.replace(base, est_cost=base.true_cost),
        "+ true scores": dataclasses.replace(base, est_quality=base.true_quality),
    }
    cost_error = {
        name: float(np.abs(scn.est_cost - base.true_cost).sum() / base.true_cost.sum())
        for name, scn in {"default estimates": base, **replaced}.items()
    }
    table3 = {"default estimates": table1[default]} | {  # the default's replay is section 1's first row
        name: share_of_oracle(scn, orders, args.seed)
        for name, scn in tqdm(replaced.items(), desc="gap decomposition", file=sys.stderr)
    }
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/estimate_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "command": command.strip(),
        "orders": args.orders,
        "stream_queries": base.n,
        "share_of_optimum": {name: {str(m): v for m, v in row.items()} for name, row in table1.items()},
        "neighbour_signal": {
            "queries": len(everything),
            "task_mean_squared_error": task_error,
            "by_embedder": {
                name: {**s, "squared_error": {str(k): v for k, v in s["squared_error"].items()}}
                for name, s in signal.items()
            },
        },
        "gap": {
            name: {"share_of_optimum": {str(m): v for m, v in row.items()}, "cost_error": cost_error[name]}
            for name, row in table3.items()
        },
        "usd_per_million_tokens": {
            model: {"prompt": 1e6 * p[0], "completion": 1e6 * p[1]}
            for model, p in zip(history.models, prices, strict=True)
        },
        "seconds": elapsed,
        "load_average": os.getloadavg(),
    }
    (out / "estimate_ceiling.json").write_text(json.dumps(doc, indent=2) + "\n")
    markdown = render_markdown(doc)
    (out / "estimate_ceiling.md").write_text(markdown)
    plot(doc, out / "estimate_ceiling.png")
    print(markdown)
    return 0


def _shares(row: dict[str, float]) -> str:
    """One table row's cells: the share of the oracle at each budget."""
    return " | ".join(f"{100 * row[str(m)]:.1f}%" for m in MULTIPLIERS)


def render_markdown(doc: dict) -> str:
    header = "| " + " | ".join(f"{m}x" for m in MULTIPLIERS) + " |"
    rule = "---|" * len(MULTIPLIERS)
    task_level = doc["share_of_optimum"]
    names = list(task_level)  # the default's neighbours first, the task-level oracle last
    neighbours, oracle = task_level[names[0]]["1.0"], task_level[names[-1]]["1.0"]
    lines = [
        "# How far estimates can take routing on these tasks",
        "",
        "## 1. Task-level estimates",
        "",
        f"tollway on the held-out stream ({doc['stream_queries']} queries, {doc['orders']} orders), quality served "
        "as a share of the oracle (the LP on true per-query scores), with three quality estimates (same costs "
        "and budgets):",
        "",
        "| estimate " + header,
        "|---|" + rule,
        *(f"| {name} | {_shares(row)} |" for name, row in task_level.items()),
        "",
        "The last row knows the true mean of every model over the stream's own queries of each task, the "
        f"best-informed estimate that only tells the tasks apart: at 1x it serves {100 * oracle:.1f}% of the "
        f"oracle, the neighbours {100 * neighbours:.1f}%.",
    ]
    sig = doc["neighbour_signal"]
    task_error = sig["task_mean_squared_error"]
    ks = list(next(iter(sig["by_embedder"].values()))["squared_error"])
    best_error, best_name, best_k = min(
        (err, name, k) for name, s in sig["by_embedder"].items() for k, err in s["squared_error"].items()
    )
    most_corr = max(s["nearest_residual_correlation"] for s in sig["by_embedder"].values())
    lines += [
        "",
        "## 2. Do neighbours know anything about a query beyond its task?",
        "",
        f"Leave-one-out over all {sig['queries']} shipped queries: squared error of the mean over the k nearest "
        "other queries' 0/1 scores (exact cosine search), against each model's mean over the other queries of "
        f"the same task (**{task_error:.4f}**); and the correlation between a query's scores and its nearest "
        "neighbour's once each is taken relative to its task's means (0: the neighbour tells nothing the task "
        "does not).",
        "",
        "| embedder, text | "
        + " | ".join(f"k={k}" for k in ks)
        + " | nearest-neighbour residual correlation |",
        "|---|" + "---|" * (len(ks) + 1),
        *(
            f"| {name} | "
            + " | ".join(f"{s['squared_error'][k]:.4f}" for k in ks)
            + f" | {s['nearest_residual_correlation']:+.3f} |"
            for name, s in sig["by_embedder"].items()
        ),
        "",
        (
            f"No neighbour row estimates a query's scores better than its task's mean (best: {best_name}, "
            f"k={best_k}, {best_error:.4f} vs {task_error:.4f})"
            if best_error >= task_error
            else f"The best neighbour row ({best_name}, k={best_k}) beats the task's mean: {best_error:.4f} vs "
            f"{task_error:.4f}"
        )
        + f"; the largest residual correlation is {most_corr:+.3f}.",
        "",
        "## 3. Where the gap to the oracle lies",
        "",
        "tollway on the held-out stream with the default estimates, then with one part replaced by what the "
        "oracle knows (share of the oracle; relative cost error of the estimate in the last column):",
        "",
        "| estimates " + header + " cost error |",
        "|---|" + rule + "---|",
        *(
            f"| {name} | {_shares(row['share_of_optimum'])} | {100 * row['cost_error']:.1f}% |"
            for name, row in doc["gap"].items()
        ),
        "",
    ]
    gap = {name: row["share_of_optimum"]["1.0"] for name, row in doc["gap"].items()}
    default_share = gap.pop("default estimates")
    gpt4 = doc["usd_per_million_tokens"].get("gpt-4-1106-preview")
    lines += [
        "Against the default at 1x: "
        + "; ".join(
            f"{name.removeprefix('+ ')} {100 * (v - default_share):+.1f} points" for name, v in gap.items()
        )
        + ". The exact prompt costs are the online router's own cost form, priced with USD per token recovered "
        "from the history"
        + (
            f" (gpt-4-1106-preview: ${gpt4['prompt']:.2f} / ${gpt4['completion']:.2f} per million prompt / "
            "completion tokens)"
            if gpt4
            else ""
        )
        + ". True costs are known only once each model has written its answer; true scores, once it is graded.",
        "",
        f"Command: `{doc['command']}`; {doc['seconds']:.0f} s on {os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [str(m) for m in MULTIPLIERS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    rows = {
        **doc["share_of_optimum"],
        **{k: v["share_of_optimum"] for k, v in doc["gap"].items() if k != "default estimates"},
    }
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        xs = np.arange(len(budgets)) + i * width
        left.bar(xs, [100 * row[m] for m in budgets], width, label=name)
    left.set_xticks(np.arange(len(budgets)) + width * (len(rows) - 1) / 2, [f"{m}x budget" for m in budgets])
    left.set_ylabel("tollway's quality served, % of oracle")
    left.set_ylim(0, 105)
    left.axhline(60, color="grey", ls=":", lw=0.8)
    left.legend(fontsize=6, loc="upper left")
    left.set_title("Held-out stream: estimates vs what the oracle knows")
    sig = doc["neighbour_signal"]
    for name, s in sig["by_embedder"].items():
        ks = [int(k) for k in s["squared_error"]]
        right.plot(ks, list(s["squared_error"].values()), marker="o", label=name)
    right.axhline(sig["task_mean_squared_error"], color="k", ls="--", label="mean of the query's task")
    right.set_xscale("log")
    right.set_ylim(sig["task_mean_squared_error"] * 0.9, sig["task_mean_squared_error"] * 1.4)
    right.set_xlabel("k nearest neighbours")
    right.set_ylabel("leave-one-out squared error of d")
    right.legend(fontsize=7)
    right.set_title(f"Neighbours vs task means, all {sig['queries']} queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
