"""What a calibration produces: the routing history, and the summary per model and task.

The history has the format of the shipped one (`routing.history`: header + one record per line
with ``prompt``, ``eval_name``, per-model ``scores``, ``costs``, ``tokens``), so the router's
``history.path`` and ``tollway eval`` read it directly. Per model and line: ``score`` the grade,
``tokens`` the true prompt + completion tokens from the server's ``usage``, ``costs`` those tokens
at the model's price (USD per million tokens; $1/M in and out when no price is given). The
``eval_name`` is the line's task, and ``split`` is carried over when every line has one.

A history is a full matrix, so it holds the lines graded for every model in it; a model with no
graded line at all (a dead backend) is left out rather than emptying the history. The journal
keeps everything else for the next run.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router_service.calibration.dataset import Dataset
from router_service.calibration.journal import AnswerRecord, Journal
from router_service.calibration.runner import RunReport
from router_service.routing.history import History, write_jsonl

MAX_LISTED_FAILURES = 200


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float = 1.0
    output: float = 1.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass
class Assembly:
    history: History | None
    models_left_out: list[str] = field(default_factory=list)
    lines_left_out: int = 0
    """Lines missing a graded answer from at least one model of the history."""


def assemble_history(
    dataset: Dataset, models: list[tuple[str, str]], journal: Journal, prices: dict[str, Price]
) -> Assembly:
    """The history of the lines graded for every model; `models` are (name, revision) pairs."""
    columns = [
        (name, rev) for name, rev in models if any(journal.graded(i.key, name, rev) for i in dataset.items)
    ]
    left_out = [name for name, rev in models if (name, rev) not in columns]
    rows: list[list[AnswerRecord]] = []
    items = []
    for item in dataset.items:
        answers = [journal.graded(item.key, name, rev) for name, rev in columns]
        if columns and all(a is not None for a in answers):
            rows.append(answers)  # type: ignore[arg-type]
            items.append(item)
    lines_left_out = len(dataset.items) - len(items)
    if not rows:
        return Assembly(None, left_out, lines_left_out)
    names = [name for name, _ in columns]
    price = [prices.get(name, Price()) for name in names]
    scores = np.array([[a.score for a in row] for row in rows])
    tokens = np.array([[a.prompt_tokens + a.completion_tokens for a in row] for row in rows], dtype=float)
    costs = np.array(
        [
            [p.cost(a.prompt_tokens, a.completion_tokens) for a, p in zip(row, price, strict=True)]
            for row in rows
        ]
    )
    splits = [item.split for item in items]
    history = History(
        prompts=[item.prompt for item in items],
        models=names,
        scores=scores,
        costs=costs,
        tokens=tokens,
        eval_names=[item.task for item in items],
        split=None if any(s is None for s in splits) else [str(s) for s in splits],
    )
    return Assembly(history, left_out, lines_left_out)


def write_history_atomically(history: History, out: str | Path) -> None:
    """Write next to `out`, then rename: a reader never sees half a history."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{''.join(out.suffixes)}")
    try:
        write_jsonl(history, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# -- summary ---------------------------------------------------------------------------------------


def summarise(
    dataset: Dataset, models: list[tuple[str, str]], journal: Journal, report: RunReport
) -> dict[str, Any]:
    """Per model and task: lines graded, mean score, mean tokens; plus totals and the run's counts."""
    failures: dict[tuple[str, str], int] = defaultdict(int)
    task_of_where = {dataset.origins[i.key]: i.task for i in dataset.items}
    for f in report.failures:
        failures[(f.model, task_of_where.get(f.where, "?"))] += 1
    per_model: dict[str, Any] = {}
    for name, rev in models:
        tasks: dict[str, Any] = {}
        for task in dataset.tasks:
            items = [i for i in dataset.items if i.task == task]
            recs = [r for i in items if (r := journal.graded(i.key, name, rev)) is not None]
            tasks[task] = {
                "lines": len(items),
                "graded": len(recs),
                "failed_this_run": failures[(name, task)],
                "mean_score": float(np.mean([r.score for r in recs])) if recs else None,
                "prompt_tokens": int(sum(r.prompt_tokens for r in recs)),
                "completion_tokens": int(sum(r.completion_tokens for r in recs)),
                "judge_tokens": int(sum(r.judge_prompt_tokens + r.judge_completion_tokens for r in recs)),
            }
        graded_all = sum(t["graded"] for t in tasks.values())
        per_model[name] = {
            "revision": rev,
            "tasks": tasks,
            "graded": graded_all,
            "mean_score": (
                sum((t["mean_score"] or 0.0) * t["graded"] for t in tasks.values()) / graded_all
                if graded_all
                else None
            ),
            "prompt_tokens": sum(t["prompt_tokens"] for t in tasks.values()),
            "completion_tokens": sum(t["completion_tokens"] for t in tasks.values()),
            "judge_tokens": sum(t["judge_tokens"] for t in tasks.values()),
            "not_sent_this_run": report.not_sent.get(name, 0),
            "down": report.down.get(name),
        }
    return {
        "dataset": {"sources": dataset.sources, "lines": len(dataset), "tasks": dataset.tasks},
        "models": per_model,
        "totals": {
            "model_tokens": sum(m["prompt_tokens"] + m["completion_tokens"] for m in per_model.values()),
            "judge_tokens": sum(m["judge_tokens"] for m in per_model.values()),
        },
        "run": {
            "pairs_pending": report.pending,
            "pairs_answered": report.answered,
            "pairs_already_done": report.already_done,
            "failures": len(report.failures),
            "not_sent": dict(report.not_sent),
            "down": dict(report.down),
            "judge_tokens_spent": report.judge_prompt_tokens + report.judge_completion_tokens,
            "seconds": round(report.seconds, 3),
            "answers_per_second": round(report.answered / report.seconds, 2) if report.seconds > 0 else None,
            "failure_list": [
                {"model": f.model, "line": f.where, "message": f.message}
                for f in report.failures[:MAX_LISTED_FAILURES]
            ],
        },
    }


def render_table(summary: dict[str, Any]) -> Any:
    """A rich Table of the summary: one row per model and task."""
    from rich.table import Table

    table = Table(title="calibration: per model and task", title_justify="left")
    for column, justify in [
        ("model", "left"),
        ("task", "left"),
        ("graded", "right"),
        ("failed", "right"),
        ("mean score", "right"),
        ("prompt tok/line", "right"),
        ("completion tok/line", "right"),
        ("judge tokens", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, model in summary["models"].items():
        for task, t in model["tasks"].items():
            n = t["graded"]
            table.add_row(
                name,
                task,
                f"{n}/{t['lines']}",
                str(t["failed_this_run"]),
                "-" if t["mean_score"] is None else f"{t['mean_score']:.3f}",
                f"{t['prompt_tokens'] / n:.1f}" if n else "-",
                f"{t['completion_tokens'] / n:.1f}" if n else "-",
                str(t["judge_tokens"]),
            )
        table.add_section()
    return table


# -- compact summary (a Kubernetes termination message) -------------------------------------------

SUMMARY_LIMIT_BYTES = 4096
"""What the kubelet keeps of a container's termination message."""


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def compact_summary(summary: dict[str, Any], pushes: list[Any], exit_status: int) -> dict[str, Any]:
    """The summary in at most `SUMMARY_LIMIT_BYTES` of JSON: per model the lines graded and mean
    score (overall and per task), tokens, failures, and where it was pushed. When it does not fit,
    tasks are dropped (the largest kept; `tasksOmitted` counts the rest), then push details."""
    models: dict[str, Any] = {}
    for name, m in summary["models"].items():
        tasks = {
            task: {"graded": t["graded"], "meanScore": _round(t["mean_score"])}
            for task, t in sorted(m["tasks"].items(), key=lambda kv: -kv[1]["lines"])
        }
        models[name] = {
            "revision": m["revision"],
            "lines": sum(t["lines"] for t in m["tasks"].values()),
            "graded": m["graded"],
            "failed": sum(t["failed_this_run"] for t in m["tasks"].values()),
            "meanScore": _round(m["mean_score"]),
            "tokens": m["prompt_tokens"] + m["completion_tokens"],
            "judgeTokens": m["judge_tokens"],
            "tasks": tasks,
        }
        if m.get("down"):
            models[name]["down"] = str(m["down"])[:300]
    out: dict[str, Any] = {
        "exit": exit_status,
        "seconds": summary["run"]["seconds"],
        "models": models,
        "pushes": [
            {"router": p.target, "model": p.model, "ok": p.ok, "inUse": p.in_use, "detail": p.detail[:200]}
            for p in pushes
        ],
    }
    return fit_summary(out)


def _size(doc: dict[str, Any]) -> int:
    return len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())


def fit_summary(doc: dict[str, Any], limit: int = SUMMARY_LIMIT_BYTES) -> dict[str, Any]:
    """Drop detail from a compact summary until its JSON fits in `limit` bytes."""
    keep = max((len(m.get("tasks", {})) for m in doc.get("models", {}).values()), default=0)
    while _size(doc) > limit and keep > 0:
        keep //= 2
        for m in doc["models"].values():
            tasks = m.get("tasks", {})
            if len(tasks) > keep:
                m["tasksOmitted"] = m.get("tasksOmitted", 0) + len(tasks) - keep
                m["tasks"] = dict(list(tasks.items())[:keep])
    if _size(doc) > limit:
        for p in doc.get("pushes", []):
            p["detail"] = p["detail"][:40]
    if _size(doc) > limit:
        doc["pushes"] = [
            {"router": p["router"], "model": p["model"], "ok": p["ok"]} for p in doc.get("pushes", [])
        ]
    if _size(doc) > limit and "error" in doc:
        doc["error"] = str(doc["error"])[:1000]
    return doc


def write_summary_file(path: str | Path, doc: dict[str, Any]) -> None:
    """Write a compact summary (cut to the limit: a termination message longer than it is lost)."""
    text = json.dumps(fit_summary(doc), separators=(",", ":"), ensure_ascii=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode()[:SUMMARY_LIMIT_BYTES])
