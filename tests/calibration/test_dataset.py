"""Calibration sets: validation with file:line errors, all or nothing; the shipped sets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from router_service.calibration.dataset import (
    BUILTIN_SETS,
    MAX_REPORTED_ERRORS,
    CalibrationItem,
    DatasetError,
    load_dataset,
)
from router_service.routing.history import load_builtin_history

GOOD = {"prompt": "2+2?", "reference": "4", "grader": "number", "task": "math"}


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_good_lines_load_with_extras_kept(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "set.jsonl",
        [GOOD, "", {**GOOD, "prompt": "3+3?", "reference": "6", "source": "mine", "tolerance": 0.01}],
    )
    ds = load_dataset(str(path))
    assert len(ds) == 2 and ds.tasks == ["math"]
    assert ds.items[1].tolerance == 0.01 and ds.items[1].model_extra == {"source": "mine"}
    assert ds.origins[ds.items[1].key] == f"{path}:3"


def test_gzip_sets_and_several_files(tmp_path: Path) -> None:
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(json.dumps(GOOD) + "\n")
    plain = write_lines(tmp_path / "b.jsonl", [{**GOOD, "prompt": "5+5?", "reference": "10"}])
    ds = load_dataset([str(gz), str(plain)])
    assert [i.prompt for i in ds.items] == ["2+2?", "5+5?"] and ds.sources == [str(gz), str(plain)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({**GOOD, "prompt": ""}, "prompt: String should have at least 1 character"),
        ({k: v for k, v in GOOD.items() if k != "task"}, "task: Field required"),
        (
            {**GOOD, "grader": "vibes"},
            "grader: Input should be 'exact', 'choice', 'number', 'regex' or 'judge'",
        ),
        ({**GOOD, "grader": "choice", "reference": "Paris"}, "single option letter"),
        ({**GOOD, "reference": "four"}, "needs a number"),
        ({**GOOD, "grader": "regex", "reference": "(unclosed"}, "not a regular expression"),
        ({**GOOD, "grader": "exact", "reference": "  "}, "non-empty reference"),
        ({**GOOD, "grader": "exact", "tolerance": 0.1}, "tolerance applies to the 'number' grader only"),
        ({**GOOD, "split": "train"}, "split: Input should be 'history' or 'stream'"),
    ],
)
def test_a_bad_line_names_file_and_line(tmp_path: Path, line: object, message: str) -> None:
    path = write_lines(tmp_path / "set.jsonl", [GOOD, line])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path))
    assert f"{path}:2: " in str(info.value) and message in str(info.value)
    assert "nothing was sent or written" in str(info.value)


def test_every_bad_line_is_reported_up_to_a_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "set.jsonl", [GOOD, *(["{"] * (MAX_REPORTED_ERRORS + 3))])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path))
    text = str(info.value)
    assert f"{MAX_REPORTED_ERRORS + 3} bad line(s)" in text and f"{path}:2:" in text and "and 3 more" in text


def test_repeated_lines_and_missing_files(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "set.jsonl", [GOOD, {**GOOD, "task": "other"}])
    with pytest.raises(DatasetError, match=r"set\.jsonl:2: repeats .*set\.jsonl:1"):
        load_dataset(str(path))
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="no lines"):
        load_dataset(str(write_lines(tmp_path / "empty.jsonl", [""])))
    with pytest.raises(DatasetError, match="unknown built-in"):
        load_dataset("builtin:nope")


def test_the_key_follows_what_is_graded_not_the_task() -> None:
    a = CalibrationItem.model_validate(GOOD)
    assert a.key == CalibrationItem.model_validate({**GOOD, "task": "renamed", "note": "x"}).key
    assert a.key != CalibrationItem.model_validate({**GOOD, "reference": "4.0"}).key
    assert a.key != CalibrationItem.model_validate({**GOOD, "prompt": "2+2 ?"}).key


def test_the_shipped_sets_are_the_shipped_history_s_prompts() -> None:
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    default = load_dataset("builtin")
    code = load_dataset("builtin:code")
    assert str(BUILTIN_SETS["builtin"]) in default.sources
    assert default.tasks == ["arc-challenge", "winogrande"] and code.tasks == ["mbpp"]
    assert {i.grader for i in default.items} == {"choice"} and {i.grader for i in code.items} == {"judge"}
    for item in [*default.items, *code.items]:
        i = row[item.prompt]  # every prompt is a history prompt, with its task and split
        assert history.eval_names[i] == item.task and history.split is not None
        assert history.split[i] == item.split
    # A reference comes from the responses that scored 1, so no line has a reference nobody reached.
    assert all(history.scores[row[i.prompt]].max() == 1.0 for i in [*default.items, *code.items])
    assert len(default) > 0.95 * sum(t in {"arc-challenge", "winogrande"} for t in history.eval_names)


def test_a_set_from_a_url_is_downloaded_once_and_errors_name_the_url(tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    write_lines(served / "set.jsonl", [GOOD, {**GOOD, "prompt": "3+3?", "reference": "6"}])
    write_lines(served / "bad.jsonl", [GOOD, {**GOOD, "grader": "vibes"}])
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        first = load_dataset(f"{base}/set.jsonl")
        assert [i.prompt for i in first.items] == ["2+2?", "3+3?"] and first.sources == [f"{base}/set.jsonl"]
        again = load_dataset(f"{base}/set.jsonl")
        assert again.items == first.items and requests.count("/set.jsonl") == 1  # cached by URL
        with pytest.raises(DatasetError, match=rf"{base}/bad.jsonl:2: grader"):
            load_dataset(f"{base}/bad.jsonl")
        with pytest.raises(DatasetError, match="HTTP 404"):
            load_dataset(f"{base}/missing.jsonl")
    finally:
        server.shutdown()
        server.server_close()
