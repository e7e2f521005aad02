"""The simulator's skill: scripted answers to known prompts, so graders can be tested end to end.

A skill file is JSONL, one ``{"prompt": str, "answer": str}`` per line (other fields are
ignored). When the last user message of a chat request equals a ``prompt``, the simulator
answers with that ``answer`` instead of generated text; timing, streaming and ``usage`` work as
for any other answer (the answer's tokens are counted with the simulator's tokenizer). Other
prompts are answered as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError


class SkillFileError(ValueError):
    """A skill file that cannot be used; the message names the file and line."""


class SkillLine(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    answer: str


@dataclass(frozen=True)
class Skill:
    """Answers by exact prompt text."""

    answers: dict[str, str]
    source: str

    def answer_for(self, prompt: str | None) -> str | None:
        return None if prompt is None else self.answers.get(prompt)

    def __len__(self) -> int:
        return len(self.answers)


def load_skill(path: str | Path) -> Skill:
    """Read a skill file; raises `SkillFileError` naming the file and line of the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SkillFileError(f"skill file {str(path)!r}: cannot read it: {exc}") from None
    answers: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = SkillLine.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SkillFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()
            )
            raise SkillFileError(f"{path}:{lineno}: {problems}") from None
        if entry.prompt in answers and answers[entry.prompt] != entry.answer:
            raise SkillFileError(
                f"{path}:{lineno}: this prompt already has a different answer (line {first_line[entry.prompt]})"
            )
        answers[entry.prompt] = entry.answer
        first_line.setdefault(entry.prompt, lineno)
    return Skill(answers, str(path))
