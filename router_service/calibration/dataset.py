"""Calibration sets: the prompts a pool's models are scored on, each with its reference and grader.

A calibration set is JSONL (optionally ``.jsonl.gz``), one object per line::

    {"prompt": "...", "reference": "B", "grader": "choice", "task": "arc-challenge"}

``prompt`` is sent as the user message; ``reference`` is what the ``grader`` (see `graders`)
compares the answer with; ``task`` labels the line in summaries and becomes the history's
``eval_name``. Optional fields: ``tolerance`` (``number`` grader), ``split`` (``history`` or
``stream``, carried into the history for `tollway eval`). Other fields are kept and ignored.

`load_dataset` reads whole files before anything is sent or written: a bad line is an error that
names the file and line (up to `MAX_REPORTED_ERRORS` of them at once). ``builtin`` and
``builtin:code`` name the sets shipped in ``router_service/data`` (see `builtin`); an
``http(s)://`` URL is downloaded once into the cache (``$TOLLWAY_CACHE_DIR/calibration-sets``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router_service.calibration.graders import GraderName, extract_last_number

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_SETS: dict[str, Path] = {
    "builtin": DATA_DIR / "calibration_routerbench.jsonl.gz",
    "builtin:code": DATA_DIR / "calibration_routerbench_code.jsonl.gz",
}
MAX_REPORTED_ERRORS = 10


class DatasetError(ValueError):
    """A calibration set that cannot be used; the message names every bad file:line found."""


class CalibrationItem(BaseModel):
    """One line of a calibration set."""

    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: str = Field(min_length=1, description="Sent to every model as the user message.")
    reference: str = Field(description="What the grader compares the answer with.")
    grader: GraderName = Field(description="exact | choice | number | regex | judge")
    task: str = Field(min_length=1, description="A label (benchmark, skill); the history's eval_name.")
    tolerance: float | None = Field(None, ge=0, description="number grader: relative tolerance.")
    split: Literal["history", "stream"] | None = Field(None, description="Carried into the history.")

    @model_validator(mode="after")
    def _reference_fits_grader(self) -> CalibrationItem:
        if self.grader == "choice" and not re.fullmatch(r"\s*[A-Za-z]\s*", self.reference):
            raise ValueError(
                f"grader 'choice' needs a single option letter as reference, got {self.reference!r}"
            )
        if self.grader == "number" and extract_last_number(self.reference) is None:
            raise ValueError(f"grader 'number' needs a number in the reference, got {self.reference!r}")
        if self.grader == "regex":
            try:
                re.compile(self.reference)
            except re.error as exc:
                raise ValueError(
                    f"grader 'regex': the reference is not a regular expression ({exc})"
                ) from None
        if self.grader in {"exact", "judge"} and not self.reference.strip():
            raise ValueError(f"grader {self.grader!r} needs a non-empty reference")
        if self.tolerance is not None and self.grader != "number":
            raise ValueError("tolerance applies to the 'number' grader only")
        return self

    @property
    def key(self) -> str:
        """Identifies what is graded (prompt, reference, grader, tolerance), not where the line sits."""
        ident = json.dumps([self.prompt, self.reference, self.grader, self.tolerance], ensure_ascii=False)
        return hashlib.sha256(ident.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Dataset:
    items: list[CalibrationItem]
    sources: list[str]
    origins: dict[str, str]
    """CalibrationItem.key -> "file:line", for messages about one line."""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def tasks(self) -> list[str]:
        return sorted({item.task for item in self.items})


def resolve(name: str) -> Path:
    """A path, the file of a built-in set (``builtin``, ``builtin:code``), or a URL's download."""
    if name in BUILTIN_SETS:
        return BUILTIN_SETS[name]
    if name.startswith("builtin"):
        raise DatasetError(f"unknown built-in calibration set {name!r}; known: {', '.join(BUILTIN_SETS)}")
    if name.startswith(("http://", "https://")):
        return download(name)
    return Path(name)


def download(url: str) -> Path:
    """The set at `url`, downloaded once (keyed by the URL) into the cache directory."""
    import httpx

    from router_service.routing.embedding import cache_dir

    filename = (
        re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) or "set.jsonl"
    )
    if not filename.endswith((".jsonl", ".jsonl.gz", ".gz")):
        filename += ".jsonl"
    target = cache_dir() / "calibration-sets" / hashlib.sha256(url.encode()).hexdigest()[:16] / filename
    if target.exists():
        return target
    try:
        with httpx.Client(timeout=120, follow_redirects=True) as client:
            resp = client.get(url)
    except httpx.HTTPError as exc:
        raise DatasetError(f"calibration set {url!r}: cannot download it: {exc}") from None
    if resp.status_code != 200:
        raise DatasetError(f"calibration set {url!r}: HTTP {resp.status_code}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(resp.content)
    partial.replace(target)
    return target


def _read_lines(path: Path) -> list[str]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DatasetError(f"calibration set {str(path)!r}: cannot read it: {exc}") from None


def _problem(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(map(str, err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_dataset(names: str | Sequence[str]) -> Dataset:
    """Read and validate calibration sets (paths or built-in names), all or nothing."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise DatasetError("no calibration set given")
    items: list[CalibrationItem] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    sources = []
    for name in names:
        path = resolve(name)
        source = name if name.startswith(("http://", "https://")) else str(path)
        sources.append(source)
        for lineno, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
                item = CalibrationItem.model_validate(raw)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except TypeError as exc:
                errors.append(f"{where}: {exc}")
                continue
            except ValidationError as exc:
                errors.append(f"{where}: {_problem(exc)}")
                continue
            if item.key in seen:
                errors.append(f"{where}: repeats {seen[item.key]} (same prompt, reference and grader)")
                continue
            seen[item.key] = where
            items.append(item)
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DatasetError(
            f"{len(errors)} bad line(s) in the calibration set; nothing was sent or written:\n  "
            + "\n  ".join(shown)
            + more
        )
    if not items:
        raise DatasetError(f"the calibration set {', '.join(names)} has no lines")
    return Dataset(items, sources, seen)
