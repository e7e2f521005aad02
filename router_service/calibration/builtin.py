"""The shipped calibration sets, and how they are derived from the RouterBench train CSVs.

Run ``python -m router_service.calibration.builtin --csv-dir DIR`` to rebuild them (it prints
the counts quoted in the README). The prompts are exactly the shipped history's prompts (same
joining of RouterBench's prompt lists), each line carries that history's ``split`` label and
RouterBench's ``sample_id``.

``builtin`` (ARC-Challenge and Winogrande, grader ``choice``): the reference is the option letter
the responses scoring 1 give (`graders.extract_choice`). Rows where no model scored 1, or where
the correct responses name different letters, have no trustworthy reference and are left out.
The build reports how often the ``choice`` grader agrees with RouterBench's own 0/1 labels.

``builtin:code`` (MBPP, grader ``judge``): RouterBench scored code by running MBPP's tests, which
the CSVs do not carry, and running untrusted code inside a calibration Job would need a sandbox;
exact matching cannot grade code. So MBPP is not in the default set; this opt-in set takes as
reference the code of one response that passed (the strongest model that did: GPT-4, then
Claude 2, GPT-3.5, ...) for an LLM judge to compare against. Rows no model passed are left out.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from router_service.calibration.dataset import BUILTIN_SETS
from router_service.calibration.graders import extract_choice, grade_choice
from router_service.routing.history import join_routerbench_cell, load_builtin_history

CHOICE_FILES = {"arc-challenge": "arc_challenge_train.csv", "winogrande": "winograde_train.csv"}
CODE_FILES = {"mbpp": "mbpp_train.csv"}
# Whose passing answer becomes the code reference, strongest first.
CODE_REFERENCE_PREFERENCE = [
    "gpt-4-1106-preview",
    "claude-v2",
    "gpt-3.5-turbo-1106",
    "claude-v1",
    "claude-instant-v1",
    "mistralai/mixtral-8x7b-chat",
    "meta/code-llama-instruct-34b-chat",
    "zero-one-ai/Yi-34B-Chat",
    "meta/llama-2-70b-chat",
    "WizardLM/WizardLM-13B-V1.2",
    "mistralai/mistral-7b-chat",
]


def _models(header: list[str]) -> list[str]:
    return [c[: -len("|model_response")] for c in header if c.endswith("|model_response")]


def _rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return rows, _models(list(reader.fieldnames or []))


def choice_reference(row: dict[str, str], models: list[str]) -> str | None:
    """The one letter the responses scoring 1 give; None when none scored 1 or they name different letters."""
    letters = {
        extract_choice(join_routerbench_cell(row[f"{m}|model_response"]))
        for m in models
        if row.get(m, "").strip() == "1.0"
    } - {None}
    return letters.pop() if len(letters) == 1 else None


def code_of(response: str) -> str:
    """The code in a response: its first fenced block, code-llama's [PYTHON] block, or all of it."""
    fenced = re.search(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)```", response, re.DOTALL)
    if fenced:
        return fenced.group(1).strip("\n")
    tagged = re.search(r"\[PYTHON\](.*?)\[/PYTHON\]", response, re.DOTALL)
    if tagged:
        return tagged.group(1).strip("\n")
    return response.strip()


def code_reference(row: dict[str, str], models: list[str]) -> str | None:
    for model in [m for m in CODE_REFERENCE_PREFERENCE if m in models]:
        if row.get(model, "").strip() == "1.0":
            return code_of(join_routerbench_cell(row[f"{model}|model_response"]))
    return None


def build(csv_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(choice lines, code lines, counts) from the RouterBench train CSVs in `csv_dir`."""
    history = load_builtin_history()
    split_of = dict(zip(history.prompts, history.split or [], strict=True))
    stats: dict[str, Any] = {}
    choice_lines: list[dict[str, Any]] = []
    code_lines: list[dict[str, Any]] = []
    for task, filename in {**CHOICE_FILES, **CODE_FILES}.items():
        rows, models = _rows(csv_dir / filename)
        counts: Counter[str] = Counter(rows=len(rows))
        agree = Counter[str]()
        for row in rows:
            prompt = join_routerbench_cell(row["prompt"])
            if prompt not in split_of:
                counts["not_in_shipped_history"] += 1
                continue
            if task in CHOICE_FILES:
                reference = choice_reference(row, models)
                grader = "choice"
            else:
                reference = code_reference(row, models)
                grader = "judge"
            if reference is None:
                counts["no_reference"] += 1
                continue
            counts["kept"] += 1
            line = {"prompt": prompt, "reference": reference, "grader": grader, "task": task}
            line |= {"split": split_of[prompt], "sample_id": row["sample_id"]}
            (choice_lines if grader == "choice" else code_lines).append(line)
            if grader == "choice":
                for m in models:
                    label = row.get(m, "").strip()
                    if label in {"0.0", "1.0"}:
                        mine = grade_choice(join_routerbench_cell(row[f"{m}|model_response"]), reference)
                        agree["same" if mine == float(label) else "different"] += 1
        stats[task] = dict(counts)
        if agree:
            total = agree["same"] + agree["different"]
            stats[task]["choice_grader_agrees_with_routerbench"] = f"{agree['same']}/{total}"
    return choice_lines, code_lines, stats


def write_set(lines: list[dict[str, Any]], path: Path) -> None:
    """gzip JSONL with a fixed timestamp, so rebuilding gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        fh.write(payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router_service.calibration.builtin",
        description="Rebuild the shipped calibration sets from the RouterBench train CSVs.",
    )
    parser.add_argument("--csv-dir", required=True, type=Path, help="folder with the *_train.csv files")
    args = parser.parse_args(argv)
    choice_lines, code_lines, stats = build(args.csv_dir)
    write_set(choice_lines, BUILTIN_SETS["builtin"])
    write_set(code_lines, BUILTIN_SETS["builtin:code"])
    print(json.dumps(stats, indent=2))
    print(f"wrote {BUILTIN_SETS['builtin']} ({len(choice_lines)} lines)")
    print(f"wrote {BUILTIN_SETS['builtin:code']} ({len(code_lines)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
