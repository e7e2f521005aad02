import json

import pytest

from router_service.evaluation.cli import main
from router_service.routing.history import load_builtin_history, write_jsonl


def test_eval_json_shape_and_ordering_on_shipped_data(tmp_path, capsys):
    out = tmp_path / "eval.json"
    plot = tmp_path / "eval.png"
    rc = main([
        "--orders", "3", "--budget", "1.0", "--json", str(out), "--plot", str(plot), "--no-progress",
        "--algorithms", "port,tollway,greedy-perf,knn-perf,approx-optimum,optimum",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["n"] == 441 and len(doc["models"]) == 11 and doc["budget"] == 1.0
    results = doc["results"]
    assert set(results) == {"port", "tollway", "greedy-perf", "knn-perf", "approx-optimum", "optimum"}
    for r in results.values():
        assert {"performance", "cost", "served", "relative_performance", "performance_per_cost"} <= set(r)
    assert results["approx-optimum"]["relative_performance"] == pytest.approx(1.0)
    assert results["port"]["performance"] > results["greedy-perf"]["performance"]
    assert results["port"]["performance"] > results["knn-perf"]["performance"]
    assert results["tollway"]["relative_performance"] > results["port"]["relative_performance"]
    assert results["optimum"]["performance"] >= results["approx-optimum"]["performance"]
    # Quality served as a share of the oracle (the LP on true values).
    assert results["optimum"]["of_optimum"] == pytest.approx(1.0)
    for r in results.values():
        assert r["of_optimum"] == pytest.approx(r["performance"] / results["optimum"]["performance"])
    # The estimates' own error, and the router's defaults.
    est = doc["estimates"]
    assert set(est["mae_per_model"]) == set(doc["models"])
    assert 0 < est["mae"] < 0.5 and 0 < est["brier"] < 0.25 and 0.5 < est["top1_agreement"] <= 1
    assert doc["k"] == 50 and doc["estimator"]["weighting"] == "uniform"
    assert doc["embedder"].startswith("hashed-ngram-d256")
    assert plot.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "of optimum" in out and "quality MAE" in out


def test_eval_estimator_flags_change_the_estimates(tmp_path):
    runs = {}
    for name, flags in {
        "port": ["--k", "5"],
        "shrunk": ["--k", "5", "--shrinkage", "20", "--prior", "global"],
        "loo": ["--k", "100", "--choose-k", "--weighting", "similarity"],
    }.items():
        out = tmp_path / f"{name}.json"
        args = [
            "--orders",
            "1",
            "--algorithms",
            "approx-optimum,optimum",
            "--no-progress",
            "--json",
            str(out),
        ]
        assert main([*args, *flags]) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["port"]["k"] == 5 and runs["port"]["estimator"]["weighting"] == "uniform"
    # Shrinking 5 neighbours toward the global mean with 20 pseudo-neighbours smooths the estimates.
    assert runs["shrunk"]["estimates"]["brier"] < runs["port"]["estimates"]["brier"]
    assert runs["loo"]["k"] in {5, 10, 20, 50, 100} and runs["loo"]["estimator"]["chooseK"]
    assert runs["loo"]["estimator"]["weighting"] == "similarity"
    assert main(["--k", "0", "--orders", "1"]) == 2
    assert main(["--temperature", "0", "--orders", "1"]) == 2


def test_eval_on_separate_files_and_bad_algorithm(tmp_path):
    hist = load_builtin_history("history").select(range(0, 1764, 4))
    stream = load_builtin_history("stream").select(range(0, 441, 4))
    hist.split = None
    stream.split = None
    write_jsonl(hist, tmp_path / "h.jsonl")
    write_jsonl(stream, tmp_path / "s.jsonl")
    out = tmp_path / "o.json"
    args = ["--history", str(tmp_path / "h.jsonl"), "--stream", str(tmp_path / "s.jsonl"), "--orders", "2"]
    assert main([*args, "--algorithms", "random,approx-optimum", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["n"] == 111
    with pytest.raises(SystemExit):
        main([*args, "--algorithms", "nope"])
