"""The answers journal: every graded answer, appended as it arrives, so a run can resume.

Next to the history ``OUT`` lives ``OUT.answers.jsonl``, one `AnswerRecord` per line (the answer
text, its score, its true token usage, the judge's cost). A rerun with the same ``--out`` reads it
and skips every (prompt, model) pair already graded under the same ``revision``; the history is
rebuilt from it at the end of every run. A line cut short by a crash is dropped on the next open.
One run at a time may write a journal (an exclusive lock on the file).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUFFIX = ".answers.jsonl"


class JournalError(RuntimeError):
    """A journal that cannot be used; the message says why and where."""


class AnswerRecord(BaseModel):
    """One model's graded answer to one calibration line."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str = Field(description="CalibrationItem.key of the line answered.")
    model: str
    revision: str = Field("", description="What was calibrated (e.g. the weights), from --revision.")
    task: str
    score: float = Field(ge=0.0, le=1.0)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    answer: str
    finish_reason: str | None = None
    seconds: float = 0.0
    judge: str | None = None
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0


def journal_path(out: str | Path) -> Path:
    return Path(str(out) + SUFFIX)


class Journal:
    """Append-only store of `AnswerRecord`s; the last record of a (key, model) pair wins."""

    def __init__(self, path: Path, records: dict[tuple[str, str], AnswerRecord], fh: IO[str]) -> None:
        self.path = path
        self.records = records
        self._fh = fh
        self.dropped_torn_line = False

    @classmethod
    def open(cls, path: str | Path) -> Journal:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (the journal owns it until close())
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise JournalError(f"{path}: another `tollway calibrate` is writing this journal") from None
        fh.seek(0)
        text = fh.read()
        torn = bool(text) and not text.endswith("\n")
        if torn:  # a crash cut the last line short: drop it before appending after it
            keep = text.rfind("\n") + 1
            fh.truncate(len(text[:keep].encode("utf-8")))
            text = text[:keep]
        records: dict[tuple[str, str], AnswerRecord] = {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = AnswerRecord.model_validate(json.loads(line))
            except (json.JSONDecodeError, ValidationError) as exc:
                fh.close()
                raise JournalError(
                    f"{path}:{lineno}: not an answer record ({exc}); move the file away to start afresh"
                ) from None
            records[(record.key, record.model)] = record
        fh.seek(0, os.SEEK_END)
        journal = cls(path, records, fh)
        journal.dropped_torn_line = torn
        return journal

    def graded(self, key: str, model: str, revision: str = "") -> AnswerRecord | None:
        """The answer of `model` to line `key` when it was graded under `revision`, else None."""
        record = self.records.get((key, model))
        return record if record is not None and record.revision == revision else None

    def done(self, key: str, model: str, revision: str = "") -> bool:
        return self.graded(key, model, revision) is not None

    def get(self, key: str, model: str) -> AnswerRecord | None:
        return self.records.get((key, model))

    def append(self, record: AnswerRecord) -> None:
        self._fh.write(record.model_dump_json() + "\n")
        self._fh.flush()
        self.records[(record.key, record.model)] = record

    def close(self) -> None:
        if not self._fh.closed:
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
