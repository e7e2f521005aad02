"""The calibration run: bounded concurrency, every pair graded once, dead backends given up on, errors shown once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router_service.calibration.client import CallFailed, Completion, Endpoint
from router_service.calibration.dataset import CalibrationItem, Dataset
from router_service.calibration.journal import Journal
from router_service.calibration.runner import (
    MAX_SHOWN_ERRORS,
    Backend,
    BackendHealth,
    RunSettings,
    run_calibration,
)

DOWN = CallFailed("cannot connect", backend_fault=True)
PROMPT = CallFailed("HTTP 400: prompt too long", backend_fault=False)


def test_down_after_n_backend_faults_in_a_row() -> None:
    health = BackendHealth(3)
    assert [health.failure(DOWN) for _ in range(4)] == [
        False,
        False,
        True,
        False,
    ]  # True once, when it happens
    assert health.down and health.down_reason == "cannot connect"


def test_a_success_resets_the_count_and_prompt_faults_do_not_count() -> None:
    health = BackendHealth(2)
    health.failure(DOWN)
    health.success()
    health.failure(DOWN)
    for _ in range(10):
        health.failure(PROMPT)
    assert not health.down
    assert health.failure(DOWN) and health.down


# -- the run, with in-memory backends -------------------------------------------------------------


class FakeClient:
    """Answers "A" to every prompt, or fails as `fail(prompt)` says; records the peak concurrency."""

    def __init__(self, name: str, fail=lambda prompt: None) -> None:  # type: ignore[no-untyped-def]
        self.endpoint = Endpoint(name, "http://unused/v1", name)
        self.fail = fail
        self.in_flight = 0
        self.peak = 0
        self.calls = 0

    async def complete(self, prompt: str, *, max_tokens: int | None, temperature: float = 0.0) -> Completion:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            error = self.fail(prompt)
            if error is not None:
                raise error
            return Completion("A", 10, 1, "stop", 0.001)
        finally:
            self.in_flight -= 1


def dataset(n: int) -> Dataset:
    items = [
        CalibrationItem(prompt=f"q{i}", reference="A" if i % 2 else "B", grader="choice", task="t")
        for i in range(n)
    ]
    return Dataset(items, ["mem"], {item.key: f"mem:{i + 1}" for i, item in enumerate(items)})


def run(ds: Dataset, clients: list[FakeClient], journal: Journal, **settings: int) -> tuple:
    said: list[str] = []
    backends = [Backend(c) for c in clients]  # type: ignore[arg-type]
    report = asyncio.run(
        run_calibration(ds, backends, journal, settings=RunSettings(**settings), say=said.append)  # type: ignore[arg-type]
    )
    return report, said


def test_every_pair_is_graded_once_within_the_concurrency_cap(tmp_path: Path) -> None:
    ds = dataset(40)
    a, b = FakeClient("a"), FakeClient("b")
    with Journal.open(tmp_path / "j.jsonl") as journal:
        report, said = run(ds, [a, b], journal, concurrency=3)
        assert report.complete and report.answered == 80 and said == []
        assert a.calls == b.calls == 40 and a.peak == b.peak == 3
        assert [journal.get(i.key, "a").score for i in ds.items[:4]] == [0.0, 1.0, 0.0, 1.0]  # type: ignore[union-attr]


def test_a_dead_backend_stops_being_asked_and_the_others_finish(tmp_path: Path) -> None:
    ds = dataset(50)
    dead = FakeClient("dead", fail=lambda p: CallFailed("cannot connect", backend_fault=True))
    live = FakeClient("live")
    with Journal.open(tmp_path / "j.jsonl") as journal:
        report, said = run(ds, [dead, live], journal, concurrency=2, give_up_after=4)
    assert live.calls == 50 and report.answered == 50
    assert dead.calls <= 4 + 2  # the threshold plus what was already in flight
    assert report.not_sent["dead"] == 50 - dead.calls and report.down == {"dead": "cannot connect"}
    assert any("declared down" in s for s in said) and not report.complete


def test_distinct_errors_are_shown_up_to_a_cap_and_all_counted(tmp_path: Path) -> None:
    ds = dataset(30)
    picky = FakeClient("picky", fail=lambda p: CallFailed(f"HTTP 400: {p} is too long", backend_fault=False))
    with Journal.open(tmp_path / "j.jsonl") as journal:
        report, said = run(ds, [picky], journal, concurrency=1)
    assert len(report.failures) == 30 and report.failures[0].where == "mem:1"
    assert len(said) == MAX_SHOWN_ERRORS + 1 and "more distinct errors" in said[-1]
    assert "q0 is too long (mem:1;" in said[0]
