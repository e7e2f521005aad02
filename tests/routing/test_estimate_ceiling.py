"""The analysis functions of benchmarks/estimate_ceiling.py: they must tell a neighbourhood that
carries per-query signal from one that only knows the task, and recover known prices."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from router_service.routing.history import History


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "estimate_ceiling.py"
    spec = importlib.util.spec_from_file_location("tollway_bench_estimate_ceiling", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ceiling = _load()


def test_question_only_drops_the_worked_examples() -> None:
    prompt = "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4\n\nQ: 3+3?\nAnswer:\n"
    assert ceiling.question_only(prompt) == "Q: 3+3?\nAnswer:"
    assert ceiling.question_only("Write a function.") == "Write a function."


def test_leave_one_out_task_means_exclude_the_query_itself() -> None:
    tasks = np.array(["a", "a", "a", "b", "b"])
    scores = np.array([[1.0], [0.0], [0.0], [1.0], [0.0]])
    np.testing.assert_allclose(
        ceiling.leave_one_out_task_means(tasks, scores), [[0.0], [0.5], [0.5], [0.0], [1.0]]
    )


def _pairs(rng: np.random.Generator, n_pairs: int, twins_agree: bool) -> tuple[np.ndarray, np.ndarray]:
    """Queries in pairs of near-identical vectors; twins share their scores or draw their own."""
    centres = rng.normal(size=(n_pairs, 16))
    vectors = np.repeat(centres, 2, axis=0) + 1e-3 * rng.normal(size=(2 * n_pairs, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    own = (rng.random((2 * n_pairs, 3)) < 0.5).astype(float)
    scores = np.repeat(own[::2], 2, axis=0) if twins_agree else own
    return vectors, scores


def test_neighbour_signal_tells_informative_neighbours_from_task_only_ones() -> None:
    rng = np.random.default_rng(0)
    tasks = np.array(["t"] * 400)
    informative = ceiling.neighbour_signal(*_pairs(rng, 200, twins_agree=True), tasks, ks=(1, 20))
    blind = ceiling.neighbour_signal(*_pairs(rng, 200, twins_agree=False), tasks, ks=(1, 20))
    assert informative["nearest_residual_correlation"] > 0.95
    assert informative["squared_error"][1] == 0.0
    assert abs(blind["nearest_residual_correlation"]) < 0.1
    assert blind["squared_error"][1] > 0.4  # two independent coin flips disagree half the time


def test_usd_per_token_recovers_the_prices_costs_were_made_with() -> None:
    rng = np.random.default_rng(1)
    n, prices = 300, np.array([[1e-6, 2e-6], [10e-6, 30e-6]])
    prompts = ["x" * int(c) for c in rng.integers(40, 4000, n)]
    prompt_tokens = np.array([len(p) for p in prompts]) / 4.0
    completion = rng.integers(1, 400, (n, 2)).astype(float)
    costs = prompt_tokens[:, None] * prices[:, 0] + completion * prices[:, 1]
    history = History(
        prompts, ["cheap", "dear"], np.ones((n, 2)), costs, prompt_tokens[:, None] + completion, ["t"] * n
    )
    np.testing.assert_allclose(ceiling.usd_per_token(history), prices, rtol=1e-6)
