import numpy as np
import pytest

from router_service.routing.history import History, write_jsonl


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Embedding caches go to the test's own directory, never to ~/.cache."""
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))


CODE = [
    "write a python function to sort a list",
    "python code to reverse a string",
    "implement binary search in python",
]
TRIVIA = ["what is the capital of france", "who painted the mona lisa", "which planet is the largest"]


def synthetic_history(copies: int = 20) -> History:
    """Two task clusters: 'small' is good at trivia only, 'big' is good at both and 10x the tokens."""
    prompts, scores, tokens = [], [], []
    for c in range(copies):
        for p in CODE:
            prompts.append(f"{p} variant {c}")
            scores.append([0.0, 1.0])
            tokens.append([20 + len(prompts[-1]) / 4, 200 + len(prompts[-1]) / 4])
        for p in TRIVIA:
            prompts.append(f"{p} variant {c}")
            scores.append([1.0, 1.0])
            tokens.append([20 + len(prompts[-1]) / 4, 200 + len(prompts[-1]) / 4])
    tokens_arr = np.array(tokens)
    return History(
        prompts=prompts,
        models=["org/small-model", "org/big-model"],
        scores=np.array(scores),
        costs=tokens_arr * np.array([1e-7, 1e-6]),
        tokens=tokens_arr,
        eval_names=["code" if "python" in p else "trivia" for p in prompts],
    )


@pytest.fixture
def history_file(tmp_path):
    path = tmp_path / "history.jsonl"
    write_jsonl(synthetic_history(), path)
    return path
