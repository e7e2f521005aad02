"""Skill files that make simulators answer like the models of a known history (tests, benchmarks).

For a calibration line and a model whose true score on it is 1, the scripted answer is the line's
reference; otherwise it is a wrong answer for the line's grader (`wrong_answer`). Simulators given
these files (``tollway simulate --skill``) are models whose calibration must reproduce the history.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from router_service.calibration.dataset import CalibrationItem
from router_service.calibration.graders import extract_last_number, grade


def wrong_answer(item: CalibrationItem) -> str:
    """An answer the line's grader scores 0 (for ``judge``: a non-answer)."""
    if item.grader == "choice":
        return "B" if item.reference.strip().upper() == "A" else "A"
    if item.grader == "number":
        expected = extract_last_number(item.reference) or 0.0
        return f"The answer is {expected + 1 + abs(expected):g}."
    if item.grader == "judge":
        return "I do not know."
    answer = "none of these"
    if grade(item.grader, answer, item.reference, item.tolerance) != 0.0:
        raise ValueError(f"no wrong answer known for this {item.grader!r} line: {item.prompt[:60]!r}")
    return answer


def right_answer(item: CalibrationItem) -> str:
    if item.grader == "regex":
        raise ValueError("a regex line has no canonical right answer")
    return item.reference


def skill_lines(items: Sequence[CalibrationItem], scores: Sequence[float]) -> list[dict[str, str]]:
    """One {prompt, answer} per line: the right answer where the score is 1, a wrong one where it is 0."""
    lines = []
    for item, score in zip(items, scores, strict=True):
        if score not in (0.0, 1.0):
            raise ValueError(f"only 0/1 scores can be scripted, got {score}")
        lines.append(
            {"prompt": item.prompt, "answer": right_answer(item) if score == 1.0 else wrong_answer(item)}
        )
    return lines


def write_skill(lines: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path
