"""Routing decision cost with a 100k-entry history: estimate + score for one query.

    .venv/bin/python benchmarks/decision_latency.py [--entries 100000] [--queries 2000] [--out benchmarks/results]

Measures, per query and excluding the embedding model: neighbour search (the engine's
`NeighbourIndex`, HNSW above exactBelow), the estimate over the k neighbours
(`NeighbourEstimator.estimate_one`, the default estimator settings) and scoring + ranking
(`policy.rank`), p50/p99 over single-query calls. The baseline in the same run is an exact numpy
search (matrix-vector product + argpartition) with the same estimate and scoring. The history is
100k vectors of the default hashed embedder (`--dim`, default the router's): the shipped prompts'
embeddings plus small noise (clustered like real traffic), with the shipped score/cost rows
repeated. Also reports the hashed embedder's own cost per query and neighbour recall@k of HNSW
against exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from router_service.config import AnnSettings, EmbeddingSettings, EstimatorSettings
from router_service.routing.ann import NeighbourIndex
from router_service.routing.embedding import EmbeddingCache, HashedNgramEmbedder
from router_service.routing.estimator import NeighbourEstimator
from router_service.routing.history import load_builtin_history
from router_service.routing.policy import rank


def pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=AnnSettings().k)
    parser.add_argument("--dim", type=int, default=EmbeddingSettings().dimensions)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    hist, stream = load_builtin_history("history"), load_builtin_history("stream")
    embedder = HashedNgramEmbedder(args.dim).fit_idf(hist.prompts)
    base = EmbeddingCache().embed(embedder, hist.prompts)
    rows = rng.integers(0, len(base), args.entries)
    data = base[rows] + rng.normal(scale=0.02, size=(args.entries, base.shape[1])).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    scores, costs = hist.scores[rows], hist.tokens[rows]
    models = hist.models
    gamma = rng.uniform(0, 1e-3, len(models))

    t = time.perf_counter()
    index = NeighbourIndex.build(data, AnnSettings(k=args.k))  # exactBelow 20000 -> HNSW
    build_s = time.perf_counter() - t
    settings = EstimatorSettings()
    est = NeighbourEstimator(index, scores, costs, args.k, settings)

    # Queries: the stream's prompts (never in the history), embedded up front.
    prompts = [stream.prompts[i % len(stream)] for i in range(args.queries)]
    embed_times = []
    for p in prompts[: min(500, len(prompts))]:
        t = time.perf_counter()
        embedder.embed_one(p)
        embed_times.append(time.perf_counter() - t)
    qv = embedder.embed(prompts)

    def engine_decision(v: np.ndarray) -> str:
        d, g = est.estimate_one(v)
        return rank(models, d, g, gamma, 1.0)[0].model

    def exact_decision(v: np.ndarray) -> str:
        sims = data @ v
        ids = np.argpartition(-sims, args.k)[: args.k]
        ids = ids[np.argsort(-sims[ids])][None, :]
        d, g = est.estimate_ids(ids, sims[ids])
        return rank(models, d[0], g[0], gamma, 1.0)[0].model

    for v in qv[:50]:  # warm up both paths
        engine_decision(v)
        exact_decision(v)
    # One path at a time: interleaved, the exact path's BLAS threads (still spinning after each
    # matrix product) steal the core from the engine's next call.
    timings: dict[str, list[float]] = {"engine": [], "exact_numpy": []}
    cpu: dict[str, list[float]] = {"engine": [], "exact_numpy": []}
    picks: dict[str, list[str]] = {"engine": [], "exact_numpy": []}
    for name, decide in (("engine", engine_decision), ("exact_numpy", exact_decision)):
        for v in qv:
            t, c = time.perf_counter(), time.thread_time()
            picks[name].append(decide(v))
            cpu[name].append(time.thread_time() - c)
            timings[name].append(time.perf_counter() - t)
    agree = sum(a == b for a, b in zip(picks["engine"], picks["exact_numpy"], strict=True))

    ids_h, _ = index.search(qv, args.k)
    exact_ids = np.argsort(-(qv @ data.T), axis=1)[:, : args.k]
    recall = float(np.mean([len(set(x) & set(y)) / args.k for x, y in zip(ids_h, exact_ids, strict=True)]))

    result = {
        "entries": args.entries,
        "dim": int(data.shape[1]),
        "k": args.k,
        "estimator": settings.to_wire(),
        "queries": args.queries,
        "index": index.kind,
        "index_build_seconds": round(build_s, 2),
        "engine": pct(timings["engine"]),
        "engine_thread_cpu": pct(cpu["engine"]),
        "exact_numpy": pct(timings["exact_numpy"]),
        "hashed_embedding_per_query": pct(embed_times),
        "recall_at_k": recall,
        "same_top_model_as_exact": agree / args.queries,
    }
    result["speedup_p50"] = result["exact_numpy"]["p50_ms"] / result["engine"]["p50_ms"]
    result["speedup_p99"] = result["exact_numpy"]["p99_ms"] / result["engine"]["p99_ms"]
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision_latency.json").write_text(json.dumps(result, indent=2))
    e, x, h = result["engine"], result["exact_numpy"], result["hashed_embedding_per_query"]
    (out / "decision_latency.md").write_text(
        f"Decision cost for one query, {args.entries} history entries x {data.shape[1]}-d, k={args.k}, "
        f"{args.queries} single-query calls (embedding excluded):\n\n"
        "| path | p50 | p99 |\n|---|---|---|\n"
        f"| engine: HNSW search + estimate ({settings.weighting}) + score/rank "
        f"| {e['p50_ms']:.3f} ms | {e['p99_ms']:.3f} ms |\n"
        f"| baseline: exact numpy search + same estimate + score/rank "
        f"| {x['p50_ms']:.3f} ms | {x['p99_ms']:.3f} ms |\n"
        f"| (for reference) hashed embedding of the prompt | {h['p50_ms']:.3f} ms | {h['p99_ms']:.3f} ms |\n\n"
        f"Engine, thread CPU time (what is left when host preemption is taken out): p50 "
        f"{result['engine_thread_cpu']['p50_ms']:.3f} ms, p99 {result['engine_thread_cpu']['p99_ms']:.3f} ms; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.\n\n"
        f"Speed-up over exact: {result['speedup_p50']:.1f}x at p50, {result['speedup_p99']:.1f}x at p99. "
        f"HNSW recall@{args.k} vs exact {recall:.3f}; same top model as exact for "
        f"{100 * result['same_top_model_as_exact']:.1f}% of queries. Index build {build_s:.1f} s.\n\n"
        "Reproduce: `.venv/bin/python benchmarks/decision_latency.py`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
