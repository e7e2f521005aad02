"""`tollway calibrate` end to end against simulators on 127.0.0.1.

The must-show test: three simulators answer a RouterBench subset like three RouterBench models
(their skill files hold the reference where that model scored 1, a wrong letter otherwise);
calibration must reproduce every per-prompt score and the true token usage, and `tollway eval`
on the calibrated history must route exactly as well as on the true columns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_service.calibration.cli import main as calibrate
from router_service.calibration.dataset import CalibrationItem, load_dataset
from router_service.calibration.graders import judge_prompt, load_judge_template
from router_service.calibration.journal import journal_path
from router_service.calibration.simulated import skill_lines, write_skill
from router_service.evaluation.cli import main as evaluate
from router_service.routing.history import History, load_builtin_history, load_history, write_jsonl
from router_service.simulator import SimulatorServer
from router_service.simulator.textgen import (
    CHAT_GENERATION_PROMPT_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    count_tokens,
)

# Our three pool models answer like these RouterBench models.
POOL = {
    "small": "mistralai/mistral-7b-chat",
    "medium": "mistralai/mixtral-8x7b-chat",
    "large": "gpt-4-1106-preview",
}
PRICES = {"small": "0.2", "medium": "0.6", "large": "10,30"}
Start = Callable[..., SimulatorServer]


def chat_tokens(text: str) -> int:
    """What the simulator's usage says for a one-message chat prompt."""
    return CHAT_GENERATION_PROMPT_TOKENS + CHAT_TOKENS_PER_MESSAGE + count_tokens(text)


def served(sim: SimulatorServer) -> float:
    """Requests the simulator finished (vllm:request_success_total)."""
    import httpx

    text = httpx.get(f"{sim.url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:request_success_total"
    )


def write_set(items: list[CalibrationItem], path: Path) -> Path:
    path.write_text("".join(i.model_dump_json(exclude_none=True) + "\n" for i in items))
    return path


@pytest.fixture(scope="module")
def subset() -> tuple[list[CalibrationItem], History]:
    """Every 21st line of the built-in set (both tasks, 91 lines) and the true columns for them."""
    items = load_dataset("builtin").items[::21]
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    truth = history.select([row[i.prompt] for i in items]).columns(list(POOL.values()))
    return items, truth


def start_pool(start_simulator: Start, tmp_path: Path, items: list[CalibrationItem], truth: History) -> dict:
    sims = {}
    for j, name in enumerate(POOL):
        skill = write_skill(skill_lines(items, truth.scores[:, j]), tmp_path / f"{name}.skill.jsonl")
        sims[name] = start_simulator(name, skill=str(skill))
    return sims


def backend_args(sims: dict[str, SimulatorServer]) -> list[str]:
    args = []
    for name, sim in sims.items():
        args += ["--backend", f"{name}={sim.url}", "--price", f"{name}={PRICES[name]}"]
    return args


def eval_results(history: History, tmp_path: Path, name: str) -> dict:
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(history, path)
    out = tmp_path / f"{name}.eval.json"
    algorithms = "port,tollway,greedy-perf,approx-optimum"
    argv = ["--history", str(path), "--stream", str(path), "--orders", "4", "--no-progress"]
    assert evaluate([*argv, "--algorithms", algorithms, "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_calibration_reproduces_the_true_columns_and_routes_as_well(
    start_simulator: Start, tmp_path: Path, subset: tuple[list[CalibrationItem], History]
) -> None:
    items, truth = subset
    assert {i.task for i in items} == {"arc-challenge", "winogrande"} and len(items) == 91
    sims = start_pool(start_simulator, tmp_path, items, truth)
    out, summary = tmp_path / "calibrated.jsonl", tmp_path / "summary.json"
    argv = ["--dataset", str(write_set(items, tmp_path / "set.jsonl")), *backend_args(sims)]
    argv += ["--out", str(out), "--json", str(summary), "--no-progress", "--concurrency", "6"]
    assert calibrate(argv) == 0

    # The history loads as the router and `tollway eval` load it, line for line, model for model.
    calibrated = load_history(out)
    assert calibrated.models == list(POOL) and calibrated.prompts == [i.prompt for i in items]
    assert calibrated.eval_names == [i.task for i in items] and calibrated.split == [i.split for i in items]
    np.testing.assert_array_equal(calibrated.scores, truth.scores)  # every per-prompt score, exactly
    # True tokens from the servers' usage: the chat-templated prompt plus the answer given.
    for j, name in enumerate(POOL):
        skill = (tmp_path / f"{name}.skill.jsonl").read_text().splitlines()
        answers = {line["prompt"]: line["answer"] for line in map(json.loads, skill)}
        expected = [chat_tokens(i.prompt) + count_tokens(answers[i.prompt]) for i in items]
        np.testing.assert_array_equal(calibrated.tokens[:, j], expected)
    price_in, price_out = 10.0, 30.0  # large
    prompt_tokens = np.array([chat_tokens(i.prompt) for i in items])
    np.testing.assert_allclose(
        calibrated.costs[:, 2],
        (prompt_tokens * price_in + (calibrated.tokens[:, 2] - prompt_tokens) * price_out) / 1e6,
        rtol=1e-5,
    )

    # The summary per model and task agrees with the truth.
    doc = json.loads(summary.read_text())
    assert doc["run"]["pairs_answered"] == 3 * len(items) and doc["run"]["failures"] == 0
    for j, name in enumerate(POOL):
        for task in ("arc-challenge", "winogrande"):
            rows = [k for k, i in enumerate(items) if i.task == task]
            assert doc["models"][name]["tasks"][task]["mean_score"] == pytest.approx(
                truth.scores[rows, j].mean()
            )

    # Routing quality with the calibrated history equals that with the true columns (same costs: the
    # costs are the pool's own, measured by calibration, in both).
    true_columns = History(
        prompts=truth.prompts, models=list(POOL), scores=truth.scores, costs=calibrated.costs,
        tokens=calibrated.tokens, eval_names=truth.eval_names, split=truth.split,
    )  # fmt: skip
    with_truth = eval_results(true_columns, tmp_path, "truth")
    with_calibration = eval_results(calibrated, tmp_path, "calibrated")
    for algorithm, result in with_truth.items():
        assert with_calibration[algorithm]["performance"] == pytest.approx(result["performance"], abs=1e-9)
        assert with_calibration[algorithm]["cost"] == pytest.approx(result["cost"], rel=1e-9)
    # ... and the comparison can tell: a column that is not `large`'s own (here its opposite: right
    # where large was wrong) changes it.
    borrowed = true_columns.select(range(len(true_columns)))
    borrowed.scores = borrowed.scores.copy()
    borrowed.scores[:, 2] = 1.0 - borrowed.scores[:, 2]
    with_borrowed = eval_results(borrowed, tmp_path, "borrowed")
    assert with_borrowed["tollway"]["performance"] != pytest.approx(with_truth["tollway"]["performance"])

    # Resumable: the same command again sends nothing and writes the same history.
    before = {name: served(sim) for name, sim in sims.items()}
    assert calibrate(argv) == 0
    assert {name: served(sim) for name, sim in sims.items()} == before
    assert json.loads(summary.read_text())["run"]["pairs_already_done"] == 3 * len(items)
    np.testing.assert_array_equal(load_history(out).scores, truth.scores)


def test_a_dead_backend_loses_nothing_and_a_rerun_completes(
    start_simulator: Start, tmp_path: Path, subset: tuple[list[CalibrationItem], History], capsys
) -> None:
    items, truth = subset
    items, truth = items[:20], truth.select(range(20))
    sims = start_pool(start_simulator, tmp_path, items, truth)
    large = sims.pop("large")
    large.stop()  # its port is closed: connection refused
    dataset = str(write_set(items, tmp_path / "set.jsonl"))
    out = tmp_path / "h.jsonl"
    argv = [
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--no-progress",
        "--retries",
        "0",
        "--give-up-after",
        "2",
    ]
    rc = calibrate([*argv, *backend_args(sims), "--backend", f"large={large.url}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "large: cannot connect" in err and "large: declared down after 2 failed requests" in err
    assert "rerun the same command" in err and "left out of the history (no graded answer): large" in err
    partial = load_history(out)  # the two live models' results are there
    assert partial.models == ["small", "medium"] and len(partial) == 20
    np.testing.assert_array_equal(partial.scores, truth.scores[:, :2])

    # The backend comes back (a new server, same name): only its pairs are sent.
    revived = start_simulator("large", skill=str(tmp_path / "large.skill.jsonl"))
    before = {name: served(sim) for name, sim in sims.items()}
    assert calibrate([*argv, *backend_args({**sims, "large": revived})]) == 0
    assert {name: served(sim) for name, sim in sims.items()} == before and served(revived) == 20
    np.testing.assert_array_equal(load_history(out).scores, truth.scores)


def test_a_revision_change_recalibrates_that_model_only(
    start_simulator: Start, tmp_path: Path, subset: tuple[list[CalibrationItem], History]
) -> None:
    items, truth = subset
    items, truth = items[:10], truth.select(range(10))
    sims = start_pool(start_simulator, tmp_path, items, truth)
    argv = ["--dataset", str(write_set(items, tmp_path / "set.jsonl")), "--out", str(tmp_path / "h.jsonl")]
    argv += ["--no-progress", *backend_args(sims)]
    assert calibrate([*argv, "--revision", "small=v1"]) == 0
    before = {name: served(sim) for name, sim in sims.items()}
    assert calibrate([*argv, "--revision", "small=v2"]) == 0
    after = {name: served(sim) for name, sim in sims.items()}
    assert after["small"] - before["small"] == 10
    assert all(after[name] == before[name] for name in sims if name != "small"), (before, after)


def test_judge_graded_lines_end_to_end_with_counted_judge_tokens(
    start_simulator: Start, tmp_path: Path
) -> None:
    items = load_dataset("builtin:code").items[:3]
    answers = [items[0].reference, items[1].reference, "def nope():\n    pass"]
    template = load_judge_template()
    judge_lines, expected_judge_tokens = [], 0
    for item, answer in zip(items, answers, strict=True):
        verdict = (
            "Matches the reference.\nSCORE: 1" if answer == item.reference else "Wrong function.\nSCORE: 0"
        )
        question = judge_prompt(item.prompt, item.reference, answer, template)
        judge_lines.append({"prompt": question, "answer": verdict})
        expected_judge_tokens += chat_tokens(question) + count_tokens(verdict)
    coder = start_simulator(
        "coder",
        skill=str(
            write_skill(
                [{"prompt": i.prompt, "answer": a} for i, a in zip(items, answers, strict=True)],
                tmp_path / "c.jsonl",
            )
        ),
    )
    judge = start_simulator("judge", skill=str(write_skill(judge_lines, tmp_path / "j.jsonl")))
    dataset = str(write_set(items, tmp_path / "code.jsonl"))
    out, summary = tmp_path / "h.jsonl", tmp_path / "s.json"
    argv = ["--dataset", dataset, "--backend", f"coder={coder.url}", "--out", str(out), "--no-progress"]
    assert calibrate(argv) == 2  # judge lines need a judge: nothing sent
    assert not out.exists() and not journal_path(out).exists() and served(coder) == 0
    assert calibrate([*argv, "--judge", f"judge={judge.url}", "--json", str(summary)]) == 0
    assert load_history(out).scores[:, 0].tolist() == [1.0, 1.0, 0.0]
    doc = json.loads(summary.read_text())
    assert doc["totals"]["judge_tokens"] == expected_judge_tokens == doc["run"]["judge_tokens_spent"]
    assert doc["models"]["coder"]["tasks"]["mbpp"]["judge_tokens"] == expected_judge_tokens


def test_bad_input_writes_nothing(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "reference": "A", "grader": "choice", "task": "t"}\n{"prompt": "q2"}\n')
    out = tmp_path / "h.jsonl"
    assert calibrate(["--dataset", str(bad), "--backend", "m=http://127.0.0.1:9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: reference: Field required" in err and "nothing was sent or written" in err
    assert not out.exists() and not journal_path(out).exists()
    for backend, message in [
        ("m", "expected NAME=VALUE"),
        ("m=svc:8000", "is not an http(s) URL"),
    ]:
        assert calibrate(["--dataset", "builtin", "--backend", backend, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    for second in ("m=http://127.0.0.1:10", " m =http://127.0.0.1:10"):  # the same name, spaced or not
        twice = ["--backend", "m=http://127.0.0.1:9", "--backend", second]
        assert calibrate(["--dataset", "builtin", *twice, "--out", str(out)]) == 2
        assert "--backend: 'm' given twice" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    write_jsonl(load_builtin_history().select(range(3)), foreign)
    assert (
        calibrate(["--dataset", "builtin", "--backend", "m=http://127.0.0.1:9", "--out", str(foreign)]) == 2
    )
    assert "was not written by `tollway calibrate`" in capsys.readouterr().err
    args = ["--dataset", "builtin", "--backend", "m=http://127.0.0.1:9", "--out", str(out), "--price", "x=1"]
    assert calibrate(args) == 2 and "which is no --backend" in capsys.readouterr().err


def test_the_tollway_command_dispatches_calibrate(capsys) -> None:
    from tollway_operator.cli import main as tollway

    with pytest.raises(SystemExit) as info:
        tollway(["calibrate", "--help"])
    assert info.value.code == 0 and "--backend NAME=BASE_URL" in capsys.readouterr().out


def test_calibration_through_a_router_pins_each_model(
    start_simulator: Start, tmp_path: Path, subset: tuple[list[CalibrationItem], History]
) -> None:
    """Pointed at a tollway router, each backend name pins that model (sheddable priority)."""
    import httpx

    from router_service.config import RouterConfig
    from router_service.proxy.server import BackgroundRouter

    items, truth = subset
    items, truth = items[:12], truth.select(range(12))
    sims = start_pool(start_simulator, tmp_path, items, truth)
    config = RouterConfig.model_validate(
        {"backends": [{"name": n, "url": s.url, "profile": POOL[n]} for n, s in sims.items()]}
    )
    router = BackgroundRouter(config).start()
    try:
        argv = [
            "--dataset",
            str(write_set(items, tmp_path / "set.jsonl")),
            "--out",
            str(tmp_path / "h.jsonl"),
        ]
        argv += [arg for name in POOL for arg in ("--backend", f"{name}={router.url}")]
        assert calibrate([*argv, "--no-progress"]) == 0
        np.testing.assert_array_equal(load_history(tmp_path / "h.jsonl").scores, truth.scores)
        metrics = httpx.get(f"{router.url}/metrics").text
    finally:
        router.stop(timeout=10)
    pinned = {
        s.labels["model"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "tollway_requests_total" and s.labels.get("route") == "pinned"
    }
    assert pinned == {name: 12.0 for name in POOL}
