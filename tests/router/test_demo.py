"""The demo's scenario and scoring (the replay itself is exercised by `tollway demo`)."""

from __future__ import annotations

import numpy as np

from router_service.demo import (
    Job,
    PolicyRun,
    Result,
    arrivals,
    build_jobs,
    example_models,
    router_config,
    summarize,
)
from router_service.routing.history import load_builtin_history


def test_arrival_rate_rises() -> None:
    times = arrivals(60.0, 2.0, 20.0, np.random.default_rng(0))
    first, last = sum(t < 10 for t in times), sum(t >= 50 for t in times)
    assert 10 <= first <= 50 and 140 <= last <= 240  # ~30 then ~185 expected
    assert times == sorted(times) and times[-1] < 60


def test_jobs_are_reproducible_and_use_held_out_prompts() -> None:
    stream = load_builtin_history("stream")
    a = build_jobs(stream, 10, 2, 6, seed=3)
    assert a == build_jobs(stream, 10, 2, 6, seed=3)
    assert {j.priority for j in a} <= {"critical", "standard", "sheddable"}
    assert all(8 <= j.max_tokens <= 256 and 0 <= j.prompt_row < len(stream) for j in a)
    history_prompts = set(load_builtin_history("history").prompts)
    assert not any(stream.prompts[j.prompt_row] in history_prompts for j in a)


def test_example_models_and_router_config_validate() -> None:
    from router_service.config import RouterConfig

    models = example_models()
    assert [m.name for m in models] == ["small", "medium", "large"]  # cheapest first, strongest last
    cfg = router_config(
        models,
        {m.name: f"http://127.0.0.1:{9000 + i}" for i, m in enumerate(models)},
        {"objective": {"alpha": 1.0}},
        {"large": 100},
        60.0,
        50,
    )
    parsed = RouterConfig.model_validate(cfg)
    assert parsed.budgets.tokens == {"large": 100}
    assert parsed.learning.expected_queries == 50
    # --replicas 2: each model's simulators become its static endpoints.
    urls = {m.name: [f"http://127.0.0.1:{9000 + 2 * i + r}" for r in range(2)] for i, m in enumerate(models)}
    replicated = RouterConfig.model_validate(router_config(models, urls, {}, {}, 60.0, 50))
    assert [b.urls for b in replicated.backends] == list(urls.values())
    assert all(b.replicas == 2 and b.url is None for b in replicated.backends)


def test_summary_scores_served_requests_with_true_quality() -> None:
    stream = load_builtin_history("stream")
    models = example_models()
    job = Job(at=0.0, prompt_row=0, max_tokens=10, priority="standard", stream=False)
    run = PolicyRun(
        "tollway",
        results=[
            Result(
                job,
                0.0,
                latency=0.5,
                status=200,
                model="large",
                route="routed",
                prompt_tokens=100,
                completion_tokens=10,
            ),
            Result(
                job,
                0.1,
                latency=9.0,
                status=200,
                model="small",
                route="degraded",
                prompt_tokens=100,
                completion_tokens=10,
            ),
            Result(job, 0.2, latency=0.01, status=429, code="rate_limit_exceeded"),
        ],
    )
    s = summarize(run, stream, models, slo=5.0)
    expected_quality = float(stream.scores[0, stream.model_index("gpt-4-1106-preview")])
    assert (s["requests"], s["served"], s["within_slo"], s["degraded"], s["shed"]) == (3, 2, 1, 1, 1)
    assert s["quality"] == round(expected_quality, 3)
    assert s["cost"] == round((100 * 10 + 10 * 30 + 100 * 0.2 + 10 * 0.2) / 1e6, 6)
    assert s["served_by_model"] == {"small": 1, "medium": 0, "large": 1}


def test_shipped_demo_router_config_is_valid() -> None:
    from pathlib import Path

    import router_service
    from router_service.config import load_router_config

    cfg = load_router_config(Path(router_service.__file__).parent / "data" / "demo-router.yaml")
    assert [b.name for b in cfg.backends] == ["small", "medium", "large"]
    assert cfg.budgets.tokens["large"] < cfg.budgets.tokens["small"]
