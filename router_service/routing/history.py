"""The routing history: reference queries with per-model quality, cost (USD) and tokens.

Two file formats are read:

- RouterBench CSV: ``prompt`` (the text of a Python list of strings, joined with blank lines),
  ``eval_name``, one score column per model and ``<model>|total_cost``; optional
  ``<model>|model_response``. Rows with a missing cell are skipped and counted (``skipped``).
  Tokens per model are estimated as (len(prompt) + len(response)) / 4 characters per token when
  responses exist; otherwise from the cost, at the model's median USD per prompt token.
- tollway JSONL (optionally gzip-compressed, ``.jsonl.gz``): a header line
  ``{"format": "tollway-history", "version": 1, "models": [...]}`` then one object per query with
  ``prompt``, ``eval_name``, ``scores``, ``costs``, ``tokens`` (lists in model order) and an
  optional ``split`` ("history" or "stream") used by the shipped evaluation data.

`load_builtin_history()` reads the RouterBench-derived file shipped in ``router_service/data``.
Run ``python -m router_service.routing.history --out FILE CSV...`` to rebuild it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHARS_PER_TOKEN = 4.0
FORMAT = "tollway-history"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "routerbench_history.jsonl.gz"


@dataclass
class History:
    """Reference queries; matrices are [queries, models] in `models` order."""

    prompts: list[str]
    models: list[str]
    scores: np.ndarray
    costs: np.ndarray
    tokens: np.ndarray
    eval_names: list[str] = field(default_factory=list)
    split: list[str] | None = None
    skipped: int = 0
    """Rows skipped while loading because a cell was missing."""

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.models)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(n, m)
        self.costs = np.asarray(self.costs, dtype=np.float64).reshape(n, m)
        self.tokens = np.asarray(self.tokens, dtype=np.float64).reshape(n, m)
        if not self.eval_names:
            self.eval_names = [""] * n
        if len(self.eval_names) != n:
            raise ValueError(f"history: {len(self.eval_names)} eval names for {n} prompts")
        if self.split is not None and len(self.split) != n:
            raise ValueError(f"history: {len(self.split)} split labels for {n} prompts")
        if len(set(self.models)) != m:
            raise ValueError(f"history: duplicate model columns in {self.models}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> np.ndarray:
        """Estimated prompt tokens per query [n]."""
        return np.array([len(p) for p in self.prompts], dtype=np.float64) / CHARS_PER_TOKEN

    @property
    def completion_tokens(self) -> np.ndarray:
        """Tokens each model generated per query [n, m]: its total less the prompt's (never negative)."""
        return np.clip(self.tokens - self.prompt_tokens[:, None], 0.0, None)

    def model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(f"model {model!r} is not in the history; it has {self.models}") from None

    def select(self, rows: np.ndarray | Sequence[int]) -> History:
        idx = np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return History(
            prompts=[self.prompts[i] for i in idx],
            models=list(self.models),
            scores=self.scores[idx],
            costs=self.costs[idx],
            tokens=self.tokens[idx],
            eval_names=[self.eval_names[i] for i in idx],
            split=None if self.split is None else [self.split[i] for i in idx],
            skipped=self.skipped,
        )

    def columns(self, models: Sequence[str]) -> History:
        """The same queries restricted to (and ordered by) `models`."""
        cols = [self.model_index(m) for m in models]
        return History(
            prompts=self.prompts,
            models=list(models),
            scores=self.scores[:, cols],
            costs=self.costs[:, cols],
            tokens=self.tokens[:, cols],
            eval_names=self.eval_names,
            split=self.split,
            skipped=self.skipped,
        )

    def part(self, name: str) -> History:
        """Rows whose split label is `name` ("history" or "stream")."""
        if self.split is None:
            raise ValueError("this history has no split labels")
        return self.select(np.array([s == name for s in self.split]))

    def append(
        self, prompt: str, scores: np.ndarray, costs: np.ndarray, tokens: np.ndarray, eval_name: str = ""
    ) -> int:
        """Add one entry (online growth from feedback); returns its row index."""
        m = len(self.models)
        row = [np.asarray(x, dtype=np.float64).reshape(1, m) for x in (scores, costs, tokens)]
        self.prompts.append(prompt)
        self.eval_names.append(eval_name)
        if self.split is not None:
            self.split.append("history")
        self.scores = np.vstack([self.scores, row[0]])
        self.costs = np.vstack([self.costs, row[1]])
        self.tokens = np.vstack([self.tokens, row[2]])
        return len(self.prompts) - 1


def concat(histories: Sequence[History]) -> History:
    """Stack histories over the same models (in the first one's order)."""
    if not histories:
        raise ValueError("no history files given")
    models = histories[0].models
    parts = [h.columns(models) for h in histories]
    splits = [h.split for h in parts]
    return History(
        prompts=[p for h in parts for p in h.prompts],
        models=list(models),
        scores=np.vstack([h.scores for h in parts]),
        costs=np.vstack([h.costs for h in parts]),
        tokens=np.vstack([h.tokens for h in parts]),
        eval_names=[e for h in parts for e in h.eval_names],
        split=None if any(s is None for s in splits) else [x for s in splits for x in s],  # type: ignore[union-attr]
        skipped=sum(h.skipped for h in parts),
    )


# -- RouterBench CSV ------------------------------------------------------------------------------


def join_routerbench_cell(cell: str) -> str:
    """RouterBench stores a prompt or a response as the text of a Python list of strings (turns):
    their text, joined by blank lines (a cell that is not such a list, as it is)."""
    text = cell.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, list):
            return "\n\n".join(str(v) for v in value)
    return text


def read_routerbench_csv(path: str | Path) -> History:
    """A RouterBench-schema CSV; see the module docstring."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for required in ("prompt", "eval_name"):
            if required not in header:
                raise ValueError(f"{path}: missing column {required!r} (RouterBench schema)")
        models = [c[: -len("|total_cost")] for c in header if c.endswith("|total_cost")]
        models = [m for m in models if m in header]
        if not models:
            raise ValueError(f"{path}: no model columns (need '<model>' and '<model>|total_cost')")
        has_resp = all(f"{m}|model_response" in header for m in models)
        prompts: list[str] = []
        evals: list[str] = []
        scores: list[list[float]] = []
        costs: list[list[float]] = []
        resp_len: list[list[float]] = []
        skipped = 0
        for row in reader:
            cells = [row.get("prompt"), row.get("eval_name")]
            cells += [row.get(m) for m in models] + [row.get(f"{m}|total_cost") for m in models]
            if has_resp:
                cells += [row.get(f"{m}|model_response") for m in models]
            if any(c is None or c.strip() == "" for c in cells):
                skipped += 1
                continue
            try:
                s = [float(row[m]) for m in models]
                c = [float(row[f"{m}|total_cost"]) for m in models]
            except ValueError:
                skipped += 1
                continue
            prompts.append(join_routerbench_cell(row["prompt"]))
            evals.append(row["eval_name"])
            scores.append(s)
            costs.append(c)
            if has_resp:
                resp_len.append([len(join_routerbench_cell(row[f"{m}|model_response"])) for m in models])
    n, m = len(prompts), len(models)
    cost_arr = np.array(costs, dtype=np.float64).reshape(n, m)
    prompt_tokens = np.array([len(p) for p in prompts], dtype=np.float64) / CHARS_PER_TOKEN
    if has_resp:
        tokens = prompt_tokens[:, None] + np.array(resp_len, dtype=np.float64).reshape(n, m) / CHARS_PER_TOKEN
    else:
        # USD per prompt token at the model's median; tokens follow the query's cost.
        rate = np.median(cost_arr / np.maximum(prompt_tokens, 1.0)[:, None], axis=0) if n else np.ones(m)
        tokens = cost_arr / np.where(rate > 0, rate, 1.0)
    return History(prompts, models, np.array(scores).reshape(n, m), cost_arr, tokens, evals, None, skipped)


# -- tollway JSONL --------------------------------------------------------------------------------


def _open_text(path: Path, mode: str) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: str | Path) -> History:
    path = Path(path)
    with _open_text(path, "r") as fh:
        lines = iter(fh)
        try:
            header = json.loads(next(lines))
        except StopIteration:
            raise ValueError(f"{path}: empty file") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path}: first line must be the header {{'format': '{FORMAT}', ...}}")
        models = list(header["models"])
        prompts, evals, scores, costs, tokens, split = [], [], [], [], [], []
        skipped = int(header.get("skipped", 0))
        for lineno, line in enumerate(lines, start=2):
            if not line.strip():
                continue
            rec = json.loads(line)
            try:
                s, c, t = rec["scores"], rec["costs"], rec["tokens"]
                if (
                    not (len(s) == len(c) == len(t) == len(models))
                    or any(v is None for v in (*s, *c, *t))
                    or not rec["prompt"]
                ):
                    skipped += 1
                    continue
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: bad record ({exc})") from exc
            prompts.append(rec["prompt"])
            evals.append(rec.get("eval_name", ""))
            scores.append(s)
            costs.append(c)
            tokens.append(t)
            split.append(rec.get("split"))
    n, m = len(prompts), len(models)
    labels = None if all(s is None for s in split) else [s or "history" for s in split]
    return History(
        prompts, models, np.array(scores, dtype=np.float64).reshape(n, m),
        np.array(costs, dtype=np.float64).reshape(n, m), np.array(tokens, dtype=np.float64).reshape(n, m),
        evals, labels, skipped,
    )  # fmt: skip


def write_jsonl(history: History, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "w") as fh:
        header = {"format": FORMAT, "version": 1, "models": history.models, "skipped": history.skipped}
        fh.write(json.dumps(header) + "\n")
        for i, prompt in enumerate(history.prompts):
            rec = {
                "prompt": prompt,
                "eval_name": history.eval_names[i],
                "scores": [round(float(x), 6) for x in history.scores[i]],
                "costs": [float(f"{x:.6g}") for x in history.costs[i]],
                "tokens": [round(float(x), 1) for x in history.tokens[i]],
            }
            if history.split is not None:
                rec["split"] = history.split[i]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def load_history(path: str | Path) -> History:
    """Read either format, chosen by extension (.csv, else JSONL)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"history file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        return read_routerbench_csv(path)
    return read_jsonl(path)


def load_histories(paths: Iterable[str | Path]) -> History:
    return concat([load_history(p) for p in paths])


def load_builtin_history(part: str | None = None) -> History:
    """The shipped RouterBench-derived history; `part` = "history" or "stream" for the eval split,
    None for all of it."""
    history = read_jsonl(BUILTIN_PATH)
    return history if part is None else history.part(part)


def assign_split(history: History, stream_fraction: float = 0.2, seed: int = 0) -> History:
    """Label a deterministic random `stream_fraction` of rows "stream", the rest "history"
    (stratified per eval_name so both parts have the same task mix)."""
    rng = np.random.default_rng(seed)
    labels = ["history"] * len(history)
    by_task: dict[str, list[int]] = {}
    for i, name in enumerate(history.eval_names):
        by_task.setdefault(name, []).append(i)
    for name in sorted(by_task):
        rows = np.array(by_task[name])
        chosen = rng.permutation(len(rows))[: round(stream_fraction * len(rows))]
        for i in rows[chosen]:
            labels[i] = "stream"
    out = history.select(np.arange(len(history)))
    out.split = labels
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router_service.routing.history",
        description="Convert RouterBench CSVs into tollway's compact history (with a history/stream split).",
    )
    parser.add_argument("csv", nargs="+", help="RouterBench-schema CSV files")
    parser.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    parser.add_argument("--stream-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    history = assign_split(load_histories(args.csv), args.stream_fraction, args.seed)
    write_jsonl(history, args.out)
    n_stream = sum(s == "stream" for s in history.split or [])
    print(
        f"wrote {args.out}: {len(history)} queries ({len(history) - n_stream} history, {n_stream} stream), "
        f"{len(history.models)} models, {history.skipped} rows skipped for missing cells"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
