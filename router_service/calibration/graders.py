"""Graders: how an answer is scored against a calibration line's reference, in [0, 1].

Each grader is a small pure function ``(answer, reference) -> score``:

- ``exact``: 1 when the two texts are equal after `normalise` (Unicode NFKC, case folded,
  white space collapsed, surrounding quotes and end punctuation dropped).
- ``choice``: 1 when the multiple-choice letter `extract_choice` finds in the answer is the
  reference letter (``B``, ``B)``, ``(B)``, ``B. house``, ``The answer is B`` all read as B).
- ``number``: 1 when the last number in the answer is within ``tolerance`` of the reference
  (relative to the reference's size, absolute below 1).
- ``regex``: 1 when the reference, a regular expression, matches somewhere in the answer.
- ``judge``: an LLM scores the answer against the reference with the rubric in
  ``router_service/data/judge_prompt.md``. Building its prompt (`judge_prompt`) and reading its
  verdict (`parse_judge_score`) are pure; the call itself is `client.Judge`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Literal

GraderName = Literal["exact", "choice", "number", "regex", "judge"]
DEFAULT_TOLERANCE = 1e-6
JUDGE_PROMPT_PATH = Path(__file__).resolve().parent.parent / "data" / "judge_prompt.md"


class GradingError(ValueError):
    """An answer that cannot be graded (e.g. a judge reply without a score)."""


# -- exact -----------------------------------------------------------------------------------------

_EDGE_PUNCTUATION = " \t\n\"'`.!?;:"


def normalise(text: str) -> str:
    """Text as `exact` compares it: NFKC, case folded, single spaces, no surrounding quotes or end marks."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text))
    return text.strip(_EDGE_PUNCTUATION).casefold()


def grade_exact(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


# -- choice ----------------------------------------------------------------------------------------

_CHOICE_PATTERNS = [
    # The whole answer is the letter: "B", "(B)", "B)", "B.", "**B**".
    re.compile(r"\(?([A-Za-z])\)?[.:)]?"),
    # "The answer is B", "Answer: (C)", "the correct answer is: D".
    # The last such phrase counts.
    re.compile(r".*\b(?i:answer)\s*(?:(?i:is)\s*)?:?\s*\(?([A-Z])\b(?!').*", re.DOTALL),
    # Opens with the letter as an option label: "B) house", "B. house", "(B) house", "B: house".
    re.compile(r"\(?([A-Z])[).:](?:\s.*)?", re.DOTALL),
]


def extract_choice(answer: str) -> str | None:
    """The option letter an answer gives, or None when it gives none clearly.

    Only clear forms count (see the patterns above); a letter that merely starts a sentence
    ("I do not know", "A good question") is not read as an option.
    """
    text = answer.strip().replace("*", "").strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            return match.group(1).upper()
    return None


def grade_choice(answer: str, reference: str) -> float:
    return float(extract_choice(answer) == reference.strip().upper())


# -- number ----------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers(text: str) -> list[float]:
    return [float(match.group(0).replace(",", "")) for match in _NUMBER.finditer(text)]


def extract_last_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed: ``1,234.5``), or None."""
    values = _numbers(text)
    return values[-1] if values else None


def grade_number(answer: str, reference: str, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """1 when the answer's last number is within ``tolerance * max(1, |reference|)`` of the reference's."""
    expected = extract_last_number(reference)
    if expected is None:
        raise GradingError(f"the reference {reference!r} holds no number")
    got = extract_last_number(answer)
    if got is None or not math.isfinite(got):
        return 0.0
    return float(abs(got - expected) <= tolerance * max(1.0, abs(expected)))


# -- regex -----------------------------------------------------------------------------------------


def grade_regex(answer: str, reference: str) -> float:
    """1 when the pattern `reference` matches anywhere in the answer (use ``(?i)`` etc. for flags)."""
    return float(re.search(reference, answer) is not None)


# -- judge -----------------------------------------------------------------------------------------


def judge_prompt(question: str, reference: str, answer: str, template: str) -> str:
    """The judge's user message: `template` with ``{question}``, ``{reference}``, ``{answer}`` filled in."""
    for name in ("question", "reference", "answer"):
        if "{" + name + "}" not in template:
            raise ValueError(f"the judge prompt template has no {{{name}}} placeholder")
    # One pass, so braces inside the texts (code!) are never read as placeholders.
    values = {"question": question, "reference": reference, "answer": answer}
    return re.sub(r"\{(question|reference|answer)\}", lambda m: values[m.group(1)], template)


def load_judge_template(path: str | Path = JUDGE_PROMPT_PATH) -> str:
    return Path(path).read_text(encoding="utf-8")


_SCORE = re.compile(r"SCORE\s*[:=]\s*\**\s*(\d+(?:\.\d+)?|\.\d+)", re.IGNORECASE)


def parse_judge_score(reply: str) -> float:
    """The score in [0, 1] from the judge's last ``SCORE: x`` line; `GradingError` when it gave none."""
    found = _SCORE.findall(reply)
    if not found:
        raise GradingError(f"the judge's reply has no 'SCORE: <0..1>' line: {reply[-200:]!r}")
    value = float(found[-1])
    if not 0.0 <= value <= 1.0:
        raise GradingError(f"the judge's score {value} is outside [0, 1]")
    return value


# -- dispatch --------------------------------------------------------------------------------------

PURE_GRADERS: dict[str, Callable[[str, str], float]] = {
    "exact": grade_exact,
    "choice": grade_choice,
    "regex": grade_regex,
}


def grade(grader: GraderName, answer: str, reference: str, tolerance: float | None = None) -> float:
    """Score with a pure grader (every grader but ``judge``, which needs a model)."""
    if grader == "number":
        return grade_number(answer, reference, DEFAULT_TOLERANCE if tolerance is None else tolerance)
    if grader == "judge":
        raise ValueError("the judge grader needs a model: use client.Judge")
    return PURE_GRADERS[grader](answer, reference)
