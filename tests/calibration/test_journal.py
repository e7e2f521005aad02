"""The answers journal: resumable, crash-tolerant, one writer at a time, revisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_service.calibration.journal import AnswerRecord, Journal, JournalError, journal_path


def record(key: str, model: str = "m", score: float = 1.0, revision: str = "") -> AnswerRecord:
    return AnswerRecord(
        key=key, model=model, revision=revision, task="t", score=score, prompt_tokens=10,
        completion_tokens=2, answer="B",
    )  # fmt: skip


def test_records_survive_reopening_and_the_last_one_wins(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "h.jsonl")
    assert path.name == "h.jsonl.answers.jsonl"
    with Journal.open(path) as journal:
        journal.append(record("a"))
        journal.append(record("b", score=0.0))
        journal.append(record("b", score=1.0))
    with Journal.open(path) as journal:
        assert journal.done("a", "m") and journal.done("b", "m") and not journal.done("c", "m")
        assert not journal.done("a", "other")
        assert journal.get("b", "m") == record("b", score=1.0)


def test_a_revision_change_makes_a_pair_pending_again(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal.open(path) as journal:
        journal.append(record("a", revision="weights-v1"))
        assert journal.done("a", "m", "weights-v1") and not journal.done("a", "m", "weights-v2")


def test_a_line_cut_short_by_a_crash_is_dropped_and_appending_continues(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal.open(path) as journal:
        journal.append(record("a"))
    with open(path, "a") as fh:
        fh.write('{"key": "b", "model": "m", "sco')  # the crash
    with Journal.open(path) as journal:
        assert journal.dropped_torn_line and journal.done("a", "m") and not journal.done("b", "m")
        journal.append(record("c"))
    with Journal.open(path) as journal:
        assert not journal.dropped_torn_line and journal.done("c", "m")
    assert all(line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines())


def test_a_corrupt_middle_line_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text(record("a").model_dump_json() + "\nnot json\n" + record("b").model_dump_json() + "\n")
    with pytest.raises(JournalError, match=r"j\.jsonl:2: not an answer record"):
        Journal.open(path)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal.open(path), pytest.raises(JournalError, match="another `tollway calibrate`"):
        Journal.open(path)
    with Journal.open(path) as journal:  # released on close
        assert journal.records == {}
