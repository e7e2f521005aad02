"""One calibration run: every pending (line, model) pair asked, graded and journaled.

Each backend gets ``concurrency`` workers that take the next pending line, ask the backend, grade
the answer (pure graders, or the judge) and append the result to the journal. A failed request
is reported once per distinct message and the run goes on; a backend that fails
``give_up_after`` requests in a row (each already retried by the client) is declared down and its
remaining lines are not sent, so a dead backend costs seconds, not one timeout per prompt. The
same rule guards the judge. Nothing graded is ever lost: the journal holds it, and a rerun picks
up what failed or was not sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from router_service.calibration.client import CallFailed, ChatClient, Judge
from router_service.calibration.dataset import CalibrationItem, Dataset
from router_service.calibration.graders import GradingError, grade
from router_service.calibration.journal import AnswerRecord, Journal

MAX_SHOWN_ERRORS = 10
"""Distinct error messages printed per model; the rest are only counted."""


@dataclass(frozen=True)
class Backend:
    client: ChatClient
    revision: str = ""

    @property
    def name(self) -> str:
        return self.client.endpoint.name


@dataclass(frozen=True)
class RunSettings:
    concurrency: int = 8
    """Requests in flight per backend (and at the judge)."""
    max_tokens: int | None = 512
    temperature: float = 0.0
    give_up_after: int = 5
    """Consecutive backend-side failures after which a backend (or the judge) is declared down."""


class BackendHealth:
    """Declares a backend down after `give_up_after` backend-side failures in a row."""

    def __init__(self, give_up_after: int) -> None:
        self.give_up_after = give_up_after
        self.consecutive = 0
        self.down_reason: str | None = None

    @property
    def down(self) -> bool:
        return self.down_reason is not None

    def success(self) -> None:
        self.consecutive = 0

    def failure(self, error: CallFailed) -> bool:
        """Count a failure; True when this one made the backend down."""
        if not error.backend_fault or self.down:
            return False
        self.consecutive += 1
        if self.consecutive >= self.give_up_after:
            self.down_reason = str(error)
            return True
        return False


@dataclass(frozen=True)
class Failure:
    model: str
    where: str
    """The calibration line, "file:line"."""
    message: str


@dataclass
class RunReport:
    pending: int = 0
    answered: int = 0
    already_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    not_sent: dict[str, int] = field(default_factory=dict)
    """Per backend: lines not sent because the backend (or the judge) was declared down."""
    down: dict[str, str] = field(default_factory=dict)
    """Backend (or ``judge NAME``) -> the failure that declared it down."""
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    """Judge tokens spent in this run (replies without a score included)."""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failures and not any(self.not_sent.values())


def _pending(dataset: Dataset, backend: Backend, journal: Journal) -> list[CalibrationItem]:
    return [item for item in dataset.items if not journal.done(item.key, backend.name, backend.revision)]


async def run_calibration(
    dataset: Dataset,
    backends: list[Backend],
    journal: Journal,
    *,
    judge: Judge | None = None,
    settings: RunSettings = RunSettings(),
    on_pair: Callable[[], None] | None = None,
    say: Callable[[str], None] = print,
) -> RunReport:
    """Ask, grade and journal every pending pair; `on_pair` is called once per pair finished."""
    if judge is None and any(item.grader == "judge" for item in dataset.items):
        raise ValueError("the calibration set has lines graded by 'judge': give a judge")
    report = RunReport()
    started = time.perf_counter()
    judge_health = BackendHealth(settings.give_up_after)
    judge_slots = asyncio.Semaphore(settings.concurrency)
    said: dict[str, set[str]] = {}

    def fail(model: str, item: CalibrationItem, message: str) -> None:
        where = dataset.origins.get(item.key, item.task)
        report.failures.append(Failure(model, where, message))
        shown = said.setdefault(model, set())
        if message in shown or len(shown) > MAX_SHOWN_ERRORS:
            return
        shown.add(message)
        if len(shown) > MAX_SHOWN_ERRORS:
            say(f"{model}: more distinct errors; they are counted in the summary (--json lists them)")
        else:
            say(f"{model}: {message} ({where}; the same error again is counted, not shown)")

    async def worker(backend: Backend, health: BackendHealth, lines: Iterator[CalibrationItem]) -> None:
        for item in lines:
            try:
                await one_pair(backend, health, item)
            finally:
                if on_pair is not None:
                    on_pair()

    async def one_pair(backend: Backend, health: BackendHealth, item: CalibrationItem) -> None:
        name = backend.name
        if health.down or (item.grader == "judge" and judge_health.down):
            report.not_sent[name] = report.not_sent.get(name, 0) + 1
            return
        try:
            answer = await backend.client.complete(
                item.prompt, max_tokens=settings.max_tokens, temperature=settings.temperature
            )
        except CallFailed as exc:
            if health.failure(exc):
                report.down[name] = str(exc)
                say(
                    f"{name}: declared down after {settings.give_up_after} failed requests in a row ({exc}); "
                    "its remaining lines are not sent; rerun the same command to retry them"
                )
            fail(name, item, str(exc))
            return
        health.success()
        judge_name, judge_tokens = None, (0, 0)
        if item.grader == "judge":
            assert judge is not None
            try:
                async with judge_slots:
                    verdict = await judge.score(item.prompt, item.reference, answer.text)
            except CallFailed as exc:
                if judge_health.failure(exc):
                    report.down[f"judge {judge.name}"] = str(exc)
                    say(f"judge {judge.name}: declared down ({exc}); lines graded by 'judge' are not sent")
                fail(name, item, f"judge {judge.name}: {exc}")
                return
            judge_health.success()
            report.judge_prompt_tokens += verdict.prompt_tokens
            report.judge_completion_tokens += verdict.completion_tokens
            if verdict.score is None:
                fail(name, item, verdict.problem)
                return
            score, judge_name = verdict.score, judge.name
            judge_tokens = (verdict.prompt_tokens, verdict.completion_tokens)
        else:
            try:
                score = grade(item.grader, answer.text, item.reference, item.tolerance)
            except GradingError as exc:
                fail(name, item, f"cannot grade: {exc}")
                return
        journal.append(
            AnswerRecord(
                key=item.key,
                model=name,
                revision=backend.revision,
                task=item.task,
                score=score,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                answer=answer.text,
                finish_reason=answer.finish_reason,
                seconds=round(answer.seconds, 4),
                judge=judge_name,
                judge_prompt_tokens=judge_tokens[0],
                judge_completion_tokens=judge_tokens[1],
            )
        )
        report.answered += 1

    tasks = []
    for backend in backends:
        pending = _pending(dataset, backend, journal)
        report.pending += len(pending)
        report.already_done += len(dataset.items) - len(pending)
        health = BackendHealth(settings.give_up_after)
        lines = iter(pending)  # shared by this backend's workers: each line is taken once
        tasks += [asyncio.create_task(worker(backend, health, lines)) for _ in range(settings.concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        report.seconds = time.perf_counter() - started
    return report


def count_pending(dataset: Dataset, backends: list[Backend], journal: Journal) -> int:
    return sum(len(_pending(dataset, b, journal)) for b in backends)
