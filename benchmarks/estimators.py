"""Embedders x estimator settings: quality served as a share of the oracle, estimate error, latency.

    .venv/bin/python benchmarks/estimators.py [--orders 10] [--repeats 3] [--entries 100000]
                                              [--quick] [--out benchmarks/results]

Data: the shipped RouterBench-derived split (router_service/data): history part 1,764 queries,
stream part 441 queries, 11 models, 0/1 scores, costs in USD.

1. Tuning, on the history part only: `--repeats` x 5-fold cross-validation (each fold's queries are
   the stream, the other four folds the history). Per row: the quality the LP on the estimates
   serves (Approx-Optimum replayed against the budgets; tollway serves 97-100% of it) as a share of
   the oracle's (the LP on true scores) at budgets 0.5x, 1x and 2x, and the squared error of d.
   The row selected is the one with the best mean share over the three budgets among rows within
   the latency budget (decision p99 < 1 ms at `--entries` entries, embedding p99 < 2 ms), or, when
   several rows are within one standard error of that mean (paired over folds), the one with the
   fastest decision among them.
2. Report, on the held-out stream part (never used for tuning): every row through `tollway eval`'s
   replay (`--orders` random orders): tollway's quality served as a share of the oracle and of
   Approx-Optimum, PORT's share of the oracle, and the estimates' error (`evaluation.accuracy`).
3. Latency on this machine: one decision (neighbour search + estimate + rank, embedding excluded)
   at `--entries` history entries (the shipped history's vectors plus small noise, as
   decision_latency.py), and one query's embedding, p50/p99 over single calls; wall time and the
   thread's CPU time (the gap between them is the host preempting the process).

Writes estimators.{md,json,png} to --out. The baseline in the same run is the old default
(hashed:1024, k=5 plain mean: PORT's estimator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from router_service.config import AnnSettings, EmbeddingSettings, EstimatorSettings
from router_service.evaluation.accuracy import estimate_accuracy
from router_service.evaluation.algorithms import TollwayOptions, lp_choice
from router_service.evaluation.runner import evaluate, make_orders
from router_service.evaluation.scenario import Scenario, build_scenario
from router_service.routing.ann import NeighbourIndex
from router_service.routing.embedding import (
    Embedder,
    EmbeddingCache,
    HashedNgramEmbedder,
    HybridEmbedder,
    MiniLMEmbedder,
    fit_to_history,
)
from router_service.routing.estimator import NeighbourEstimator
from router_service.routing.history import History, load_builtin_history
from router_service.routing.policy import rank

MULTIPLIERS = (0.5, 1.0, 2.0)
DECISION_P99_BUDGET_MS = 1.0
EMBEDDING_P99_BUDGET_MS = 2.0
EMBEDDERS = ("hashed:1024", "hashed:256", "minilm", "hybrid")
UNIFORM = EstimatorSettings(weighting="uniform")
SETTINGS: dict[str, tuple[int, EstimatorSettings]] = {
    "k5 uniform (PORT)": (5, UNIFORM),
    "k20 uniform": (20, UNIFORM),
    "k50 uniform": (50, UNIFORM),
    "k50 similarity T0.1": (50, EstimatorSettings(weighting="similarity", temperature=0.1)),
    "k50 similarity T0.1 + shrink 1 to global": (
        50,
        EstimatorSettings(weighting="similarity", temperature=0.1, shrinkage=1.0, prior="global"),
    ),
    "k20 uniform + shrink 10 to 200-nbhd": (
        20,
        EstimatorSettings(weighting="uniform", shrinkage=10.0, prior_k=200),
    ),
    "k by leave-one-out (<=200) uniform": (200, EstimatorSettings(weighting="uniform", choose_k=True)),
}
BASELINE = ("hashed:1024", "k5 uniform (PORT)")


class Precomputed:
    """An embedder answering from vectors computed once (MiniLM over every shipped prompt), so the
    folds of the cross-validation do not embed the same texts again."""

    def __init__(self, inner: Embedder, texts: Sequence[str]) -> None:
        vecs = EmbeddingCache().embed(inner, list(texts))
        self._row = {t: i for i, t in enumerate(texts)}
        self._vecs, self._name, self._dim = vecs, inner.name, inner.dim

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._vecs[[self._row[t] for t in texts]]


def make_embedder(name: str, minilm: Embedder | None) -> Embedder:
    if name.startswith("hashed:"):
        return HashedNgramEmbedder(int(name.split(":")[1]))
    assert minilm is not None
    if name == "minilm":
        return minilm
    if name == "hybrid":  # the default hashed dimension + MiniLM, equal weight
        return HybridEmbedder([HashedNgramEmbedder(EmbeddingSettings().dimensions), minilm], [0.5, 0.5])
    raise ValueError(name)


def budget_scenarios(base: Scenario) -> dict[float, Scenario]:
    return {m: base.with_budget(m) for m in MULTIPLIERS}


def lp_share_of_oracle(scn: Scenario, order: np.ndarray) -> float:
    """Quality served by Approx-Optimum's allocation over Optimum's, replayed in one order."""

    def served(choice: np.ndarray) -> float:
        remaining = scn.budgets.copy()
        total = 0.0
        for j in order:
            i = int(choice[j])
            if i >= 0 and remaining[i] >= scn.true_cost[j, i]:
                remaining[i] -= scn.true_cost[j, i]
                total += scn.true_quality[j, i]
        return total

    return served(lp_choice(scn, on_estimates=True)) / served(lp_choice(scn, on_estimates=False))


def folds(n: int, count: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::count]) for i in range(count)]


@dataclass
class Row:
    embedder: str
    setting: str

    @property
    def key(self) -> str:
        return f"{self.embedder} | {self.setting}"


def tune(
    rows: list[Row], history: History, embedders: dict[str, Embedder], repeats: int, cache: EmbeddingCache
) -> dict[str, dict]:
    """Cross-validation inside the history part: per row, the share of the oracle per fold and budget."""
    out: dict[str, dict] = {r.key: {"shares": [], "sq_error": []} for r in rows}
    splits = [(r, f) for r in range(repeats) for f in folds(len(history), 5, seed=r)]
    for rep_fold, (rep, fold) in enumerate(tqdm(splits, desc="tuning folds", unit="fold", file=sys.stderr)):
        train = history.select(np.setdiff1d(np.arange(len(history)), fold))
        held = history.select(fold)
        order = np.random.default_rng([rep, rep_fold]).permutation(len(held))
        for row in rows:
            k, settings = SETTINGS[row.setting]
            base = build_scenario(train, held, embedders[row.embedder], k=k, estimator=settings, cache=cache)
            shares = [lp_share_of_oracle(s, order) for s in budget_scenarios(base).values()]
            out[row.key]["shares"].append(shares)
            out[row.key]["sq_error"].append(float(np.mean((base.est_quality - base.true_quality) ** 2)))
    return out


def report(
    rows: list[Row],
    history: History,
    stream: History,
    embedders: dict[str, Embedder],
    orders_n: int,
    cache: EmbeddingCache,
    scenarios: dict[str, Scenario],
) -> dict[str, dict]:
    """Every row on the held-out stream through the evaluation's replay (fills `scenarios`)."""
    out: dict[str, dict] = {}
    for row in tqdm(rows, desc="held-out stream", unit="row", file=sys.stderr):
        k, settings = SETTINGS[row.setting]
        base = build_scenario(history, stream, embedders[row.embedder], k=k, estimator=settings, cache=cache)
        orders = make_orders(base.n, orders_n, 0)
        per_budget = {}
        for m, scn in budget_scenarios(base).items():
            res = evaluate(
                scn, ["tollway", "port", "approx-optimum", "optimum"], orders, tollway=TollwayOptions()
            )
            per_budget[str(m)] = {
                "tollway_of_optimum": res["tollway"].of_optimum,
                "tollway_of_approx_optimum": res["tollway"].relative_performance,
                "port_of_optimum": res["port"].of_optimum,
                "tollway_performance": res["tollway"].performance,
                "optimum_performance": res["optimum"].performance,
            }
        acc = estimate_accuracy(
            base.models, base.est_quality, base.true_quality, base.est_cost, base.true_cost
        )
        out[row.key] = {"k": base.k, "budgets": per_budget, "estimates": acc.to_json()}
        scenarios[row.key] = base
    return out


def paired_bootstrap(a: Scenario, b: Scenario, resamples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """How much the stream's sampling moves the difference in share of the oracle between two
    rows: the stream's queries resampled with replacement (budgets re-derived from each sample),
    Approx-Optimum's allocation replayed for both rows. Per budget: mean and 5th/95th percentiles
    of a - b in percentage points."""
    rng = np.random.default_rng(seed)
    diffs: dict[float, list[float]] = {m: [] for m in MULTIPLIERS}
    for _ in tqdm(range(resamples), desc="bootstrap", unit="sample", file=sys.stderr):
        idx = rng.integers(0, a.n, a.n)
        order = rng.permutation(a.n)
        for m in MULTIPLIERS:
            sa, sb = (resample(s, idx).with_budget(m) for s in (a, b))
            diffs[m].append(100 * (lp_share_of_oracle(sa, order) - lp_share_of_oracle(sb, order)))
    return {
        str(m): {
            "mean": float(np.mean(d)),
            "p5": float(np.percentile(d, 5)),
            "p95": float(np.percentile(d, 95)),
        }
        for m, d in diffs.items()
    }


def resample(scn: Scenario, idx: np.ndarray) -> Scenario:
    return replace(
        scn,
        true_quality=scn.true_quality[idx],
        true_cost=scn.true_cost[idx],
        est_quality=scn.est_quality[idx],
        est_cost=scn.est_cost[idx],
        neighbour_ids=scn.neighbour_ids[idx],
    )


def percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def timed(fn, items) -> tuple[dict[str, float], dict[str, float]]:
    """(wall, thread CPU) percentiles of fn(item) over items."""
    wall, cpu = [], []
    for item in items:
        t, c = time.perf_counter(), time.thread_time()
        fn(item)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return percentiles(wall), percentiles(cpu)


def embedding_latency(name: str, embedder: Embedder, prompts: list[str]) -> dict:
    embedder.embed(prompts[:5])  # warm caches and BLAS
    wall, cpu = timed(lambda p: embedder.embed([p]), prompts)
    return {"embedder": name, "wall": wall, "cpu": cpu, "calls": len(prompts)}


def decision_latency(
    vectors: np.ndarray, history: History, queries: np.ndarray, entries: int, settings_k: dict[str, int]
) -> dict[str, dict]:
    """Per setting: one query's search + estimate + rank over `entries` noisy copies of `vectors`."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(vectors), entries)
    dim = vectors.shape[1]
    data = vectors[rows] + rng.normal(scale=0.3 / np.sqrt(dim), size=(entries, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    t = time.perf_counter()
    index = NeighbourIndex.build(data, AnnSettings())
    build_s = time.perf_counter() - t
    gamma = rng.uniform(0, 1e-3, len(history.models))
    out: dict[str, dict] = {"index_build_seconds": round(build_s, 1), "index": index.kind}
    for name, k in settings_k.items():
        _, settings = SETTINGS[name]
        est = NeighbourEstimator(index, history.scores[rows], history.tokens[rows], k, settings)

        def decide(v: np.ndarray, est: NeighbourEstimator = est) -> str:
            d, g = est.estimate_one(v)
            return rank(history.models, d, g, gamma, 1.0)[0].model

        for v in queries[:50]:
            decide(v)
        wall, cpu = timed(decide, queries)
        out[name] = {"k": k, "wall": wall, "cpu": cpu}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 5-fold tuning CV")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000, help="single-query decisions timed")
    parser.add_argument("--embed-calls", type=int, default=300, help="single-query embeddings timed")
    parser.add_argument("--bootstrap", type=int, default=300, help="stream resamples (default vs baseline)")
    parser.add_argument("--quick", action="store_true", help="hashed embedders only, 1 repeat, 20k entries")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md and .png from --out's .json"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        doc = json.loads((out / "estimators.json").read_text())
        (out / "estimators.md").write_text(render_markdown(doc))
        plot(doc, out / "estimators.png")
        return 0
    if args.quick:
        args.repeats, args.entries, args.orders, args.queries, args.bootstrap = 1, 20_000, 3, 500, 30
    embedder_names = [e for e in EMBEDDERS if not args.quick or e.startswith("hashed")]
    rows = [Row(e, s) for e in embedder_names for s in SETTINGS]
    t0 = time.perf_counter()

    history, stream = load_builtin_history("history"), load_builtin_history("stream")
    everything = load_builtin_history().prompts  # the whole shipped file, embedded once (disk cache)
    minilm = Precomputed(MiniLMEmbedder(), everything) if "minilm" in embedder_names else None
    embedders = {name: make_embedder(name, minilm) for name in embedder_names}

    with tempfile.TemporaryDirectory(prefix="tollway-estimators-") as tmp:
        cache = EmbeddingCache(Path(tmp))  # per-fold IDF-fitted vectors stay out of ~/.cache
        tuned = tune(rows, history, embedders, args.repeats, cache)
        scenarios: dict[str, Scenario] = {}
        held_out = report(rows, history, stream, embedders, args.orders, cache, scenarios)

    # Latency: embeddings of single stream prompts; decisions over a large synthetic history.
    prompts = [stream.prompts[i % len(stream)] for i in range(args.embed_calls)]
    embed_lat: dict[str, dict] = {}
    for name in tqdm(embedder_names, desc="embedding latency", unit="embedder", file=sys.stderr):
        live = fit_to_history(
            make_embedder(name, MiniLMEmbedder() if name in {"minilm", "hybrid"} else None), history.prompts
        )
        embed_lat[name] = embedding_latency(
            name, live, prompts[: 100 if name in {"minilm", "hybrid"} else None]
        )
    decision_lat: dict[str, dict] = {}
    for name in tqdm(
        embedder_names, desc=f"decision latency at {args.entries} entries", unit="embedder", file=sys.stderr
    ):
        live = fit_to_history(embedders[name], history.prompts)
        vecs = live.embed(history.prompts)
        queries = live.embed([stream.prompts[i % len(stream)] for i in range(args.queries)])
        ks = {s: held_out[Row(name, s).key]["k"] for s in SETTINGS}
        decision_lat[name] = decision_latency(vecs, history, queries, args.entries, ks)

    # Selection on the tuning CV only.
    summary: dict[str, dict] = {}
    for row in rows:
        shares = np.array(tuned[row.key]["shares"])  # [folds, budgets]
        summary[row.key] = {
            "embedder": row.embedder,
            "setting": row.setting,
            "cv_share_of_oracle": dict(zip(map(str, MULTIPLIERS), shares.mean(axis=0).tolist(), strict=True)),
            "cv_mean": float(shares.mean()),
            "cv_squared_error": float(np.mean(tuned[row.key]["sq_error"])),
            "decision": decision_lat[row.embedder][row.setting],
            "embedding": embed_lat[row.embedder],
            **held_out[row.key],
        }
        # Gated on CPU time: the wall-clock tail on this shared host is other jobs preempting us.
        summary[row.key]["within_latency"] = (
            summary[row.key]["decision"]["cpu"]["p99_ms"] < DECISION_P99_BUDGET_MS
            and embed_lat[row.embedder]["cpu"]["p99_ms"] < EMBEDDING_P99_BUDGET_MS
        )
    fold_means = {key: np.array(tuned[key]["shares"]).mean(axis=1) for key in summary}
    eligible = [k for k, v in summary.items() if v["within_latency"]] or list(summary)
    best = max(eligible, key=lambda k: summary[k]["cv_mean"])
    close = []
    for key in summary:
        diff = fold_means[best] - fold_means[key]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        summary[key]["cv_gap_to_best"] = float(diff.mean())
        summary[key]["cv_gap_se"] = se
        if key in eligible and diff.mean() <= se:
            close.append(key)
    selected = min(close, key=lambda k: summary[k]["decision"]["wall"]["p50_ms"])
    default = f"hashed:{EmbeddingSettings().dimensions} | " + next(
        (s for s, (k, st) in SETTINGS.items() if k == AnnSettings().k and st == EstimatorSettings()), "?"
    )
    baseline = " | ".join(BASELINE)
    bootstrap = (
        paired_bootstrap(scenarios[default], scenarios[baseline], args.bootstrap)
        if default in scenarios and baseline in scenarios and args.bootstrap > 0
        else None
    )
    elapsed = time.perf_counter() - t0
    command = (
        "python benchmarks/estimators.py"
        + (" --quick" if args.quick else "")
        + (f" --orders {args.orders} --repeats {args.repeats} --entries {args.entries}")
    )
    doc = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "seconds": round(elapsed, 1),
        "history": len(history),
        "stream": len(stream),
        "tuning": f"{args.repeats} x 5-fold cross-validation inside the history part (never the stream)",
        "baseline": " | ".join(BASELINE),
        "selected_by_tuning": selected,
        "best_cv": best,
        "within_one_se_of_best": close,
        "configured_default": default,
        "bootstrap_default_minus_baseline": bootstrap,
        "rows": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators.json").write_text(json.dumps(doc, indent=2))
    (out / "estimators.md").write_text(render_markdown(doc))
    plot(doc, out / "estimators.png")
    print(render_markdown(doc))
    return 0


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(doc: dict) -> str:
    rows = doc["rows"]
    base = rows[doc["baseline"]]
    lines = [
        f"Embedders x estimator settings on the shipped RouterBench-derived split ({doc['history']} history, "
        f"{doc['stream']} held-out stream queries, 11 models). Tuning: {doc['tuning']}; the report columns use "
        "the held-out stream only.",
        "",
        f"- Selected by the tuning CV (best mean share of the oracle over 0.5x/1x/2x among rows within the latency "
        f"budget, CPU-time p99: decision < {DECISION_P99_BUDGET_MS} ms, embedding < {EMBEDDING_P99_BUDGET_MS} ms; "
        f"among rows within one standard error of it, the fastest decision): **{doc['selected_by_tuning']}**.",
        f"- Configured default (router, RoutingPolicy, `tollway eval`): **{doc['configured_default']}**.",
        f"- Baseline in the same run (the old default, PORT's estimator): {doc['baseline']}.",
        "",
        "Quality served by tollway as % of the oracle (Optimum, the LP on true scores) on the held-out stream, "
        "PORT's in brackets; tollway's share of Approx-Optimum (the LP on the same estimates) at 1x; the "
        "estimates' error on the stream (MAE and squared error of d, share of queries whose estimated best "
        "model reached the best true score, relative error of the cost); tuning CV mean share of the oracle "
        "(gap to the best CV row +- its standard error); latency on this machine (wall p50 / p99 and, in "
        "brackets, the thread's CPU-time p99; the embedding is excluded from the decision):",
        "",
        "| embedder | estimator | k | 0.5x | 1x | 2x | of approx-opt 1x | MAE d | sq. err d | top-1 | cost err "
        "| CV mean (gap +- se) | decision p50/p99 ms | embedding p50/p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        b = r["budgets"]
        cells = [
            f"{pct(b[m]['tollway_of_optimum'])} ({pct(b[m]['port_of_optimum'])})"
            for m in ("0.5", "1.0", "2.0")
        ]
        e, dec, emb = r["estimates"], r["decision"]["wall"], r["embedding"]["wall"]
        gap = (
            "-"
            if "cv_gap_to_best" not in r
            else f"{100 * r['cv_gap_to_best']:.1f} +- {100 * r['cv_gap_se']:.1f}"
        )
        name = f"**{r['setting']}**" if key == doc["configured_default"] else r["setting"]
        lines.append(
            f"| {r['embedder']} | {name} | {r['k']} | "
            + " | ".join(cells)
            + f" | {pct(b['1.0']['tollway_of_approx_optimum'])} | {e['mae']:.3f} | {e['brier']:.4f} "
            f"| {pct(e['top1_agreement'])} | {pct(e['cost_error'])} | {100 * r['cv_mean']:.1f} ({gap}) "
            f"| {dec['p50_ms']:.3f} / {dec['p99_ms']:.3f} ({r['decision']['cpu']['p99_ms']:.3f}) "
            f"| {emb['p50_ms']:.3f} / {emb['p99_ms']:.3f} ({r['embedding']['cpu']['p99_ms']:.3f}) |"
        )
    d = rows.get(doc["configured_default"])
    if d is not None:
        lines += [
            "",
            "Default against the baseline on the held-out stream (percentage points of the oracle):",
            "",
        ]
        for m in ("0.5", "1.0", "2.0"):
            lines.append(
                f"- {m}x: {pct(d['budgets'][m]['tollway_of_optimum'])}% vs {pct(base['budgets'][m]['tollway_of_optimum'])}% "
                f"(PORT {pct(d['budgets'][m]['port_of_optimum'])}%); tollway at "
                f"{pct(d['budgets'][m]['tollway_of_approx_optimum'])}% of approx-optimum"
            )
        boot = doc.get("bootstrap_default_minus_baseline")
        if boot:
            lines.append(
                f"- the stream is {doc['stream']} queries: resampling them (paired bootstrap, Approx-Optimum's "
                "allocation for both rows) puts the default's lead over the baseline at "
                + "; ".join(
                    f"{m}x {b['mean']:+.1f} [{b['p5']:+.1f}, {b['p95']:+.1f}]" for m, b in boot.items()
                )
                + " points (mean [5th, 95th percentile])"
            )
        cpu_dec, cpu_emb = d["decision"]["cpu"], d["embedding"]["cpu"]
        lines.append(
            f"- latency: decision p99 {d['decision']['wall']['p99_ms']:.3f} ms wall, {cpu_dec['p99_ms']:.3f} ms CPU; "
            f"embedding p99 {d['embedding']['wall']['p99_ms']:.3f} ms wall, {cpu_emb['p99_ms']:.3f} ms CPU"
        )
    m = doc["machine"]
    lines += [
        "",
        f"Machine: {m['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in m['load_average'])} at the end; "
        f"{doc['seconds']:.0f} s. Reproduce: `.venv/bin/{doc['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for key, r in rows.items():
        ys = [100 * r["budgets"][m]["tollway_of_optimum"] for m in ("0.5", "1.0", "2.0")]
        special = key in {doc["configured_default"], doc["baseline"]}
        left.plot(MULTIPLIERS, ys, marker="o", lw=2.5 if special else 0.8, alpha=1 if special else 0.5,
                  label=key if special else None)  # fmt: skip
    port = rows[doc["baseline"]]["budgets"]
    left.plot(
        MULTIPLIERS, [100 * port[m]["port_of_optimum"] for m in ("0.5", "1.0", "2.0")], "k--", label="PORT"
    )
    left.axhline(60, color="grey", ls=":", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xticks(MULTIPLIERS, [str(m) for m in MULTIPLIERS])
    left.set_xlabel("budget multiplier")
    left.set_ylabel("tollway's quality served, % of the oracle (held-out stream)")
    left.legend(fontsize=7)
    for key, r in rows.items():
        x = r["decision"]["cpu"]["p99_ms"]
        y = 100 * r["budgets"]["1.0"]["tollway_of_optimum"]
        right.scatter(x, y, s=40 if key == doc["configured_default"] else 15)
        right.annotate(key, (x, y), fontsize=5)
    right.axvline(DECISION_P99_BUDGET_MS, color="grey", ls=":", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("decision p99, thread CPU time (ms, embedding excluded)")
    right.set_ylabel("% of the oracle at 1x (held-out stream)")
    fig.suptitle("tollway estimators: embedder x estimator setting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
