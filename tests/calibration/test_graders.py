"""Graders: pure functions from (answer, reference) to a score in [0, 1]."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_service.calibration.graders import (
    GradingError,
    extract_choice,
    extract_last_number,
    grade,
    grade_choice,
    grade_exact,
    grade_number,
    grade_regex,
    judge_prompt,
    load_judge_template,
    normalise,
    parse_judge_score,
)


@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("Paris", "paris", 1.0),
        ("  Paris.\n", "Paris", 1.0),
        ('"Paris"', "Paris", 1.0),
        ("New   York", "new york", 1.0),
        ("ﬁne", "fine", 1.0),  # NFKC folds the ligature
        ("Paris, France", "Paris", 0.0),
        ("Lyon", "Paris", 0.0),
    ],
)
def test_exact_compares_normalised_text(answer: str, reference: str, score: float) -> None:
    assert grade_exact(answer, reference) == score


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("B\n", "B"),
        (" (C) ", "C"),
        ("D)", "D"),
        ("A.", "A"),
        ("**B**", "B"),
        ("b", "B"),
        ("B) house", "B"),
        ("(A) Kyle", "A"),
        ("C. cooling of flowing magma", "C"),
        ("The answer is D.", "D"),
        ("Answer: (B)", "B"),
        ("I first thought A, but the correct answer is: C", "C"),
        ("I do not know", None),  # a sentence starting with a capital letter is no option
        ("A good question; I cannot tell", None),
        ("Unfortunately I cannot answer", None),
        ("", None),
        ("AB", None),
    ],
)
def test_choice_reads_the_option_letter(answer: str, letter: str | None) -> None:
    assert extract_choice(answer) == letter


def test_choice_grades_against_the_reference_letter() -> None:
    assert grade_choice("B) house", "B") == 1.0
    assert grade_choice("B) house", " b ") == 1.0
    assert grade_choice("A", "B") == 0.0
    assert grade_choice("I do", "I") == 0.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("42", 42.0),
        ("Step 1: 3 + 4 = 7. The answer is 7.", 7.0),
        ("It costs $1,234.50 in total", 1234.5),
        ("-3.5 degrees", -3.5),
        ("about 1e3 items", 1000.0),
        ("between 1,2,3", 3.0),
        (".5 of it", 0.5),
        ("no digits here", None),
    ],
)
def test_last_number(text: str, number: float | None) -> None:
    assert extract_last_number(text) == number


def test_number_tolerance_is_relative_above_one_absolute_below() -> None:
    assert grade_number("The answer is 1000.0004", "1000") == 1.0  # within 1e-6 relative
    assert grade_number("The answer is 1000.01", "1000") == 0.0
    assert grade_number("1000.01", "1000", tolerance=1e-4) == 1.0
    assert grade_number("0.0000009", "0") == 1.0
    assert grade_number("0.00001", "0") == 0.0
    assert grade_number("no number", "5") == 0.0
    with pytest.raises(GradingError):
        grade_number("5", "five")


def test_regex_searches_the_answer() -> None:
    assert grade_regex("The capital is Paris.", r"\bParis\b") == 1.0
    assert grade_regex("the capital is paris", r"(?i)\bParis\b") == 1.0
    assert grade_regex("Parisian", r"\bParis\b") == 0.0


def test_grade_dispatches_and_refuses_the_judge() -> None:
    assert grade("exact", "yes", "Yes") == 1.0
    assert grade("number", "3.0001", "3", tolerance=1e-3) == 1.0
    assert grade("choice", "C", "C") == 1.0
    # Each name reaches its own grader: answers only that grader accepts.
    assert grade("choice", "The answer is (C).", "C") == 1.0
    assert grade("exact", "The answer is (C).", "C") == 0.0
    assert grade("exact", "3.0001", "3") == 0.0
    with pytest.raises(ValueError, match="judge"):
        grade("judge", "x", "y")


@given(st.text(max_size=40), st.text(max_size=40))
def test_every_pure_grader_scores_in_unit_interval(answer: str, reference: str) -> None:
    assert grade_exact(answer, reference) in (0.0, 1.0)
    assert grade_choice(answer, reference) in (0.0, 1.0)
    assert normalise(normalise(answer)) == normalise(answer)


def test_judge_prompt_fills_the_template_once_and_keeps_braces() -> None:
    template = load_judge_template()
    code = "def f(x):\n    return {'question': x}  # {answer}"
    prompt = judge_prompt("Write f.", "def f(x): return {}", code, template)
    assert "Write f." in prompt and code in prompt and "def f(x): return {}" in prompt
    assert "{question}" not in prompt.replace(code, "")  # the code's own "{answer}" text stays as is
    with pytest.raises(ValueError, match="placeholder"):
        judge_prompt("q", "r", "a", "no placeholders here")


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("The code is right.\nSCORE: 1", 1.0),
        ("Wrong result.\nSCORE: 0", 0.0),
        ("Half right.\nscore = 0.5", 0.5),
        ("Considered SCORE: 0 at first... **SCORE: 1**", 1.0),  # the last one counts
        ("SCORE: .25", 0.25),
    ],
)
def test_judge_score_is_read_from_the_last_score_line(reply: str, score: float) -> None:
    assert parse_judge_score(reply) == score


@pytest.mark.parametrize("reply", ["Looks correct to me.", "SCORE: 7", "SCORE: 10", "SCORE: high"])
def test_judge_reply_without_a_valid_score_is_an_error(reply: str) -> None:
    with pytest.raises(GradingError):
        parse_judge_score(reply)
