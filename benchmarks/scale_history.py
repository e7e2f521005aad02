"""Scale of the routing history: index build time, memory and decision latency up to 1M entries.

    .venv/bin/python benchmarks/scale_history.py            # 100k and 1M entries, ~10 min on 2 cores
    .venv/bin/python benchmarks/scale_history.py --quick    # 20k and 100k, ~1 min

For each size N the history is the shipped RouterBench history (2,205 prompts) grown to N
entries: entry i copies the scores and tokens of source row i mod 2,205 and gets that row's
embedding plus Gaussian noise (re-normalised), so the entries form clusters around real prompts
as a large real history does. Embeddings are the router's default kind (hashed word n-grams,
IDF fitted on the shipped prompts) at --dim dimensions (default 256, the router's default; at
1,024 dimensions 1M float32 vectors alone take 4 GiB and the HNSW build would take most of an
hour on 2 cores). The HNSW build parameters default to M=16, efConstruction=64 (the router's
defaults, M=32 and efConstruction=200, build several times slower; pass --hnsw-m 32
--ef-construction 200 to measure them).

Measured per size, in this process, each index built from the same vectors:
- build: `RoutingEngine(...)` construction (index build + dual-price prior fit), seconds, and the
  RSS it added (Linux VmRSS);
- decision: `RoutingEngine.rank(prompt)` on real history prompts (embed, k-NN, estimate, score,
  sort), p50 / p99 ms; the k-NN search alone, p50 / p99 ms;
- recall@k of the router's index (HNSW past `ann.exactBelow`) against exact search.
The exact-search baseline (faiss IndexFlatIP, what the router uses below exactBelow) is built
and timed in the same run on the same vectors.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, fmt, markdown_table, new_figure, percentile, write_report

BACKENDS = {
    "strong": "gpt-4-1106-preview",
    "medium": "mistralai/mixtral-8x7b-chat",
    "weak": "mistralai/mistral-7b-chat",
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def base_history(dim: int) -> tuple[Any, Any, np.ndarray]:
    from router_service.routing.embedding import HashedNgramEmbedder
    from router_service.routing.history import load_builtin_history

    history = load_builtin_history().columns(list(BACKENDS.values()))
    embedder = HashedNgramEmbedder(dim).fit_idf(history.prompts)
    vectors = embedder.embed(history.prompts).astype(np.float32)
    return history, embedder, vectors


def grow(history: Any, vectors: np.ndarray, n: int, noise: float, seed: int = 0) -> tuple[Any, np.ndarray]:
    """An n-entry history around the real rows (see the module docstring)."""
    from router_service.routing.history import History

    rng = np.random.default_rng(seed)
    src = np.arange(n) % len(history)
    dim = vectors.shape[1]
    grown = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = vectors[src[lo:hi]] + rng.normal(0.0, noise / np.sqrt(dim), size=(hi - lo, dim)).astype(
            np.float32
        )
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        grown[lo:hi] = block
    grown_history = History(
        prompts=[""] * n,  # prompts are not read after embedding; keep memory for the index
        models=list(BACKENDS),
        scores=history.scores[src],
        costs=history.costs[src],
        tokens=history.tokens[src],
    )
    return grown_history, grown


def build_engine(
    history: Any, embedder: Any, vectors: np.ndarray, exact: bool, ann: dict[str, Any] | None = None
) -> tuple[Any, float, float]:
    from router_service.config import RouterConfig
    from router_service.routing.engine import RoutingEngine

    cfg = RouterConfig.model_validate(
        {
            "backends": [{"name": n, "url": "http://127.0.0.1:9", "profile": p} for n, p in BACKENDS.items()],
            "ann": {"exactBelow": len(history) + 1} if exact else (ann or {}),
        }
    )
    gc.collect()
    before = rss_mib()
    t = time.perf_counter()
    engine = RoutingEngine(
        backends=list(BACKENDS),
        history=history,
        embedder=embedder,
        history_vectors=vectors,
        cfg=cfg,
        background_fits=True,
    )
    engine.wait_for_fit()
    build = time.perf_counter() - t
    gc.collect()
    return engine, build, rss_mib() - before


def time_decisions(engine: Any, queries: list[str]) -> dict[str, float]:
    for q in queries[:20]:
        engine.rank(q)
    engine.wait_for_fit()
    total, search = [], []
    index = engine.estimator.index
    k = engine.estimator.k
    for q in queries:
        t = time.perf_counter()
        engine.rank(q)
        total.append((time.perf_counter() - t) * 1000)
        vec = engine.embedder.embed([q])
        t = time.perf_counter()
        index.search(vec, k)
        search.append((time.perf_counter() - t) * 1000)
    return {
        "n": len(queries),
        "decision_p50_ms": percentile(total, 50),
        "decision_p99_ms": percentile(total, 99),
        "search_p50_ms": percentile(search, 50),
        "search_p99_ms": percentile(search, 99),
    }


def recall(approx: Any, exact: Any, embedder: Any, queries: list[str], k: int) -> float:
    vecs = embedder.embed(queries).astype(np.float32)
    a, _ = approx.estimator.index.search(vecs, k)
    e, _ = exact.estimator.index.search(vecs, k)
    hits = sum(len(set(a[i]) & set(e[i])) for i in range(len(queries)))
    return hits / (k * len(queries))


def estimate_agreement(approx: Any, exact: Any, embedder: Any, queries: list[str]) -> dict[str, float]:
    """What the routing sees: quality estimates from approximate vs exact neighbours.

    Recall alone under-states this: grown entries around one source row share its scores, so
    swapping one near-tied neighbour for another changes nothing downstream."""
    vecs = embedder.embed(queries).astype(np.float32)
    da, _ = approx.estimator.estimate(vecs)
    de, _ = exact.estimator.estimate(vecs)
    return {
        "quality_estimate_mean_abs_diff": float(np.mean(np.abs(da - de))),
        "best_model_agreement": float(np.mean(np.argmax(da, axis=1) == np.argmax(de, axis=1))),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    history, embedder, vectors = base_history(args.dim)
    rng = np.random.default_rng(1)
    prompts = [p[:4096] for p in history.prompts]
    queries = [prompts[i] for i in rng.choice(len(prompts), size=args.queries, replace=False)]
    rows = []
    for n in args.sizes:
        grown, grown_vectors = grow(history, vectors, n, args.noise)
        print(
            f"N={n}: vectors {grown_vectors.nbytes / 2**20:.0f} MiB; building the router's index ...",
            flush=True,
        )
        faiss.omp_set_num_threads(args.build_threads)
        ann = {"hnswM": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": args.ef_search}
        engine, build_s, rss = build_engine(grown, embedder, grown_vectors, exact=False, ann=ann)
        kind = engine.estimator.index.kind
        faiss.omp_set_num_threads(args.search_threads)
        timing = time_decisions(engine, queries)
        print(f"  {kind}: build {build_s:.1f} s, +{rss:.0f} MiB, {timing}", flush=True)
        faiss.omp_set_num_threads(args.build_threads)
        exact_engine, exact_build_s, exact_rss = build_engine(grown, embedder, grown_vectors, exact=True)
        faiss.omp_set_num_threads(args.search_threads)
        exact_timing = time_decisions(exact_engine, queries[: args.exact_queries])
        print(f"  exact: build {exact_build_s:.1f} s, +{exact_rss:.0f} MiB, {exact_timing}", flush=True)
        rec = recall(engine, exact_engine, embedder, queries[: args.exact_queries], engine.estimator.k)
        agree = estimate_agreement(engine, exact_engine, embedder, queries[: args.exact_queries])
        ann = engine.cfg.ann
        rows.append(
            {
                "entries": n,
                "dim": args.dim,
                "vectors_mib": grown_vectors.nbytes / 2**20,
                "router_index": {
                    "kind": kind,
                    "hnsw_m": ann.hnsw_m,
                    "ef_construction": ann.ef_construction,
                    "ef_search": ann.ef_search,
                    "build_s": build_s,
                    "rss_added_mib": rss,
                    **timing,
                },
                "exact": {
                    "kind": "exact",
                    "build_s": exact_build_s,
                    "rss_added_mib": exact_rss,
                    **exact_timing,
                },
                "recall_at_k": rec,
                **agree,
                "k": engine.estimator.k,
            }
        )
        engine.close()
        exact_engine.close()
        del engine, exact_engine, grown, grown_vectors
        gc.collect()
    return {
        "rows": rows,
        "settings": {
            "dim": args.dim,
            "noise": args.noise,
            "queries": args.queries,
            "exact_queries": args.exact_queries,
            "build_threads": args.build_threads,
            "search_threads": args.search_threads,
        },
        "peak_rss_mib": _peak_rss_mib(),
    }


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(data: dict[str, Any], out_dir: Path) -> Path:
    table_rows = []
    for r in data["rows"]:
        for label, part in (
            ("router (" + r["router_index"]["kind"] + ")", r["router_index"]),
            ("exact baseline", r["exact"]),
        ):
            table_rows.append(
                [
                    f"{r['entries']:,}",
                    label,
                    fmt(part["build_s"], 1),
                    fmt(part["rss_added_mib"], 0),
                    fmt(part["decision_p50_ms"], 3),
                    fmt(part["decision_p99_ms"], 3),
                    fmt(part["search_p50_ms"], 3),
                    fmt(part["search_p99_ms"], 3),
                    part["n"],
                    fmt(r["recall_at_k"], 3) if label.startswith("router") else "1.000",
                    fmt(r["best_model_agreement"], 3) if label.startswith("router") else "1.000",
                    fmt(r["quality_estimate_mean_abs_diff"], 4) if label.startswith("router") else "0",
                ]
            )
    table = markdown_table(
        [
            "entries",
            "index",
            "build s",
            "RSS added MiB",
            "decision p50 ms",
            "decision p99 ms",
            "k-NN p50 ms",
            "k-NN p99 ms",
            "queries",
            f"recall@{data['rows'][0]['k']}",
            "best-model agreement",
            "mean abs diff of quality estimate",
        ],
        table_rows,
    )
    s = data["settings"]
    last = data["rows"][-1]
    ri = last["router_index"]
    body = "\n".join(
        [
            "## Setup",
            "",
            f"- History grown from the shipped 2,205 RouterBench prompts (noise {s['noise']} on unit vectors), "
            f"hashed n-gram embeddings at **{s['dim']} dimensions** (the router default is 1,024; see the "
            "script's docstring for why not here), three backends.",
            f"- Router index: faiss HNSW (M={ri['hnsw_m']}, efConstruction={ri['ef_construction']}, "
            f"efSearch={ri['ef_search']}; router defaults: M=32, efConstruction=200, efSearch=64) past "
            "`ann.exactBelow`; exact baseline: faiss "
            "IndexFlatIP on the same vectors, same run.",
            f"- Decision = `RoutingEngine.rank` on real prompts ({s['queries']} for the router's index, "
            f"{s['exact_queries']} for the exact baseline), one at a time. faiss OpenMP threads: "
            f"{s['build_threads']} for building, {s['search_threads']} for searching (a router answers one query at "
            "a time; with 2 threads on a busy 2-core machine OpenMP's spinning made single-query exact search "
            "4-5x slower in a side test). Build includes the dual-price prior fit.",
            f"- Peak RSS of the whole benchmark process: {data['peak_rss_mib']:.0f} MiB.",
            "",
            "## Results",
            "",
            table,
            "",
            "## Verdict",
            "",
            f"- At {last['entries']:,} entries: build {ri['build_s']:.0f} s, +{ri['rss_added_mib']:.0f} MiB "
            f"({last['vectors_mib']:.0f} MiB of it the vectors), decision p99 {ri['decision_p99_ms']:.3f} ms against "
            f"{last['exact']['decision_p99_ms']:.3f} ms with exact search, recall@{last['k']} {last['recall_at_k']:.3f}; "
            f"the model with the best estimated quality is the same as with exact search for "
            f"{100 * last['best_model_agreement']:.1f}% of queries (mean |delta d| "
            f"{last['quality_estimate_mean_abs_diff']:.4f}).",
            "",
        ]
    )
    fig, axes = new_figure(2, 1, size=(5.0, 3.6))
    xs = [r["entries"] for r in data["rows"]]
    axes[0][0].plot(
        xs, [r["router_index"]["decision_p99_ms"] for r in data["rows"]], "o-", label="router index p99"
    )
    axes[0][0].plot(
        xs, [r["router_index"]["decision_p50_ms"] for r in data["rows"]], "o--", label="router index p50"
    )
    axes[0][0].plot(xs, [r["exact"]["decision_p99_ms"] for r in data["rows"]], "s-", label="exact p99")
    axes[0][0].plot(xs, [r["exact"]["decision_p50_ms"] for r in data["rows"]], "s--", label="exact p50")
    axes[0][0].set_title("routing decision (ms)")
    axes[0][1].plot(
        xs, [r["router_index"]["build_s"] for r in data["rows"]], "o-", label="router index build s"
    )
    axes[0][1].plot(
        xs, [r["router_index"]["rss_added_mib"] / 1024 for r in data["rows"]], "o--", label="router index GiB"
    )
    axes[0][1].set_title("build time (s) and memory (GiB)")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("history entries")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths = write_report(
        "scale_history",
        title="Scale: a 1M-entry routing history",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )
    return paths["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scale_history.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100_000, 1_000_000]
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--noise", type=float, default=0.5, help="Gaussian noise norm around each source vector"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=200)
    parser.add_argument(
        "--build-threads", type=int, default=os.cpu_count() or 1, help="faiss threads to build"
    )
    parser.add_argument("--hnsw-m", type=int, default=16, help="ann.hnswM (router default 32)")
    parser.add_argument(
        "--ef-construction", type=int, default=64, help="ann.efConstruction (router default 200)"
    )
    parser.add_argument("--ef-search", type=int, default=64, help="ann.efSearch (router default 64)")
    parser.add_argument("--search-threads", type=int, default=1, help="faiss threads while timing decisions")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.exact_queries = [20_000, 100_000], 300, 100
    data = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
