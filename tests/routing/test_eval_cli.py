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
    assert plot.stat().st_size > 1000
    assert "relative" in capsys.readouterr().out


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
