import csv

import numpy as np
import pytest

from router_service.routing.history import (
    History,
    assign_split,
    load_builtin_history,
    load_history,
    read_routerbench_csv,
    write_jsonl,
)


def write_csv(path, rows):
    header = ["", "sample_id", "prompt", "eval_name", "m1", "m2", "m1|model_response", "m2|model_response",
              "m1|total_cost", "m2|total_cost"]  # fmt: skip
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, r in enumerate(rows):
            w.writerow([i, f"s{i}", *r])


def test_routerbench_csv_parses_prompt_lists_and_skips_missing_cells(tmp_path):
    path = tmp_path / "rb.csv"
    write_csv(path, [
        ["['first part', 'second']", "task", "1.0", "0.0", "['AB']", "['ABCDEFGH']", "0.001", "0.01"],
        ["['x']", "task", "", "1.0", "['y']", "['y']", "0.001", "0.01"],  # missing score
        ["['y']", "task", "0.5", "0.5", "['y']", "['y']", "", "0.01"],  # missing cost
    ])  # fmt: skip
    h = read_routerbench_csv(path)
    assert h.models == ["m1", "m2"] and len(h) == 1 and h.skipped == 2
    assert h.prompts[0] == "first part\n\nsecond"
    np.testing.assert_allclose(h.scores, [[1.0, 0.0]])
    np.testing.assert_allclose(h.costs, [[0.001, 0.01]])
    # (len(prompt) + len(response)) / 4 characters per token
    np.testing.assert_allclose(h.tokens, [[(18 + 2) / 4, (18 + 8) / 4]])


def test_builtin_history_and_split_are_shipped():
    h = load_builtin_history()
    assert len(h) > 2000 and len(h.models) == 11 and h.skipped == 20
    hist, stream = h.part("history"), h.part("stream")
    assert len(hist) + len(stream) == len(h) and 0.19 < len(stream) / len(h) < 0.21
    assert np.all((h.scores >= 0) & (h.scores <= 1)) and np.all(h.costs > 0) and np.all(h.tokens > 0)


def test_split_is_deterministic_and_stratified():
    h = load_builtin_history().select(np.arange(300))
    a, b = assign_split(h, 0.2, seed=0), assign_split(h, 0.2, seed=0)
    assert a.split == b.split
    for task in set(h.eval_names):
        labels = [s for s, e in zip(a.split, a.eval_names, strict=True) if e == task]
        assert abs(labels.count("stream") - round(0.2 * len(labels))) == 0


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_history(tmp_path / "nope.csv")


def test_bad_jsonl_header_is_named(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="header"):
        load_history(p)


def test_write_then_read(tmp_path, history_file):
    h = load_history(history_file)
    row = h.append("new prompt", np.array([0.5, 1.0]), np.array([1e-6, 1e-5]), np.array([10.0, 100.0]), "x")
    out = tmp_path / "out.jsonl.gz"
    write_jsonl(h, out)
    again = load_history(out)
    assert len(again) == len(h) and again.prompts[row] == "new prompt"
    np.testing.assert_allclose(again.scores, h.scores)
    np.testing.assert_allclose(again.tokens, h.tokens)


def test_completion_tokens_are_the_total_less_the_prompt_and_never_negative():
    history = History(
        prompts=["x" * 40, "y" * 400],  # 10 and 100 prompt tokens
        models=["a", "b"],
        scores=np.ones((2, 2)),
        costs=np.ones((2, 2)),
        tokens=np.array([[12.0, 30.0], [150.0, 90.0]]),  # the last: a total below its prompt's tokens
        eval_names=["t", "t"],
    )
    np.testing.assert_allclose(history.completion_tokens, [[2.0, 20.0], [50.0, 0.0]])
