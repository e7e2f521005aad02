import math

import numpy as np
import pytest

from router_service.config import RouterConfig
from router_service.routing.engine import Candidate, RoutingEngine
from router_service.routing.ledger import BudgetLedger


def config(history_file, **over) -> RouterConfig:
    doc = {
        "backends": [
            {"name": "small", "url": "http://small:8000", "profile": "org/small-model"},
            {"name": "big", "url": "http://big:8000", "profile": "org/big-model"},
        ],
        "history": {"path": str(history_file)},
        "ann": {"k": 5},
        "learning": {"expectedQueries": 200, "warmupFraction": 0.05, "refitEvery": 20},
    }
    for key, value in over.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return RouterConfig.model_validate(doc)


def test_without_budgets_the_best_quality_wins_and_costs_are_tokens(history_file):
    engine = RoutingEngine.from_config(config(history_file), background_fits=False)
    code = engine.rank("python code to sort a list quickly")
    assert [c.model for c in code.candidates] == ["big", "small"]
    assert isinstance(code.candidates[0], Candidate)
    big = code.candidates[0]
    prompt_tokens = len("python code to sort a list quickly") / 4
    assert big.est_tokens == pytest.approx(prompt_tokens + 200, abs=0.1)  # own prompt + neighbours completion
    assert big.quality == 1.0 and code.decision_seconds > 0
    trivia = engine.rank("what is the capital of italy")
    # both are perfect on trivia and gamma is 0 without budgets: ties go by quality then listed order
    assert trivia.candidates[0].quality == 1.0
    assert engine.gamma == {"small": 0.0, "big": 0.0}


def test_tight_big_budget_prices_big_and_sends_trivia_to_small(history_file):
    cfg = config(history_file, budgets={"tokens": {"big": 200 * 60}})  # ~60 big queries of 200
    engine = RoutingEngine.from_config(cfg, BudgetLedger(cfg.budgets), background_fits=False)
    assert engine.gamma["big"] > 0 and engine.gamma["small"] == 0  # fitted on the history prior
    assert engine.phase == "warmup"
    trivia = engine.rank("who painted the sistine chapel")
    assert trivia.candidates[0].model == "small"
    code = engine.rank("python code to merge two lists")
    assert code.candidates[0].model == "big"  # small scores 0 on code: big is worth its price


def test_warmup_then_routed_and_refits(history_file):
    cfg = config(history_file, budgets={"tokens": {"big": 200 * 60}})
    ledger = BudgetLedger(cfg.budgets)
    engine = RoutingEngine.from_config(cfg, ledger, background_fits=False)
    assert engine.controller.warmup_queries == 10
    for i in range(10):
        assert engine.rank(f"python code number {i}").phase == "warmup"
    assert engine.phase == "routed" and engine.controller.fits == 1
    for i in range(20):
        engine.rank(f"capital of country {i}")
    assert engine.controller.fits == 2  # refitEvery 20
    # Spending the big budget raises its price at the next fit.
    before = engine.gamma["big"]
    ledger.charge("big", ledger.remaining("big") * 0.99)
    after = engine.fit_duals()["big"]
    assert after > before


def test_background_fit_does_not_block_and_finishes(history_file):
    cfg = config(history_file, budgets={"tokens": {"big": 12000}})
    engine = RoutingEngine.from_config(cfg, BudgetLedger(cfg.budgets))
    for i in range(10):
        engine.rank(f"python code number {i}")
    engine.wait_for_fit(10)
    engine.close()
    assert engine.controller.fits == 1 and engine.status()["last_fit_error"] is None


def test_port_mode_warmup_is_random_then_fitted(history_file):
    cfg = config(
        history_file, objective={"algorithm": "port"}, budgets={"tokens": {"big": 12000, "small": 10**6}}
    )
    engine = RoutingEngine.from_config(cfg, background_fits=False)
    firsts = {engine.rank("python code to sort a list").candidates[0].model for _ in range(10)}
    assert firsts == {"small", "big"}  # uniformly random during warm-up
    assert engine.phase == "routed" and engine.controller.fits == 1
    assert all(0.0 <= g <= 1.0 for g in engine.gamma.values())


def test_reject_option_spares_critical(history_file):
    cfg = config(history_file, objective={"rejectBelow": 5.0})
    engine = RoutingEngine.from_config(cfg, background_fits=False)
    assert engine.rank("python code").reject is True
    assert engine.rank("python code", priority="critical").reject is False


def test_feedback_grows_the_history(history_file):
    cfg = config(history_file, history={"path": str(history_file), "learnFromTraffic": True})
    engine = RoutingEngine.from_config(cfg, background_fits=False)
    n = engine.history_size
    prompt = "zebra quantum origami " * 3
    for _ in range(5):
        assert engine.add_learned([engine.make_learned(prompt, "small", 0.0, tokens=50)]) == 1
    assert engine.history_size == n + 5
    d, g, _ = engine.estimate(prompt)
    assert d[0] == 0.0 and g[0] == pytest.approx(50.0)
    with pytest.raises(KeyError, match="unknown backend"):
        engine.make_learned(prompt, "nope", 1.0)
    # Whether feedback is taken at all (history.learnFromTraffic) is the router's call:
    # tests/router/test_shared_state.py::test_feedback_is_refused_when_learning_is_off.


def test_unknown_profile_is_named(history_file):
    cfg = config(history_file)
    cfg.backends[0].profile = "org/unknown"
    with pytest.raises(ValueError, match=r"backends\[small\]\.profile 'org/unknown'"):
        RoutingEngine.from_config(cfg)


def test_builtin_history_engine_ranks_fast():
    cfg = RouterConfig.model_validate({
        "backends": [
            {"name": "mistral", "url": "http://a", "profile": "mistralai/mistral-7b-chat"},
            {"name": "gpt4", "url": "http://b", "profile": "gpt-4-1106-preview"},
        ],
        "history": {"builtin": True},
        "budgets": {"tokens": {"gpt4": 100000}},
    })  # fmt: skip
    engine = RoutingEngine.from_config(cfg, background_fits=False)
    r = engine.rank("Write a function to remove all elements from a given list present in another list.")
    assert {c.model for c in r.candidates} == {"mistral", "gpt4"}
    assert all(math.isfinite(c.score) and c.est_tokens > 0 for c in r.candidates)
    assert engine.history_size == 1764
    assert np.isfinite(list(engine.gamma.values())).all()


def test_learned_entries_replay_into_another_engine_and_fill_new_backends(history_file):
    cfg = config(history_file, history={"path": str(history_file), "learnFromTraffic": True})
    first = RoutingEngine.from_config(cfg, background_fits=False)
    prompt = "zebra quantum origami " * 3
    entry = first.make_learned(prompt, "small", 0.0, tokens=50)
    assert entry.quality["small"] == 0.0 and set(entry.quality) == {"small", "big"}
    first.add_learned([entry] * 5)
    # Another replica (or the next engine after a reload) adds the same entries: same estimates.
    second = RoutingEngine.from_config(cfg, background_fits=False)
    n = second.history_size
    assert second.add_learned([entry] * 5) == 5 and second.history_size == n + 5
    assert second.estimate(prompt)[0][0] == first.estimate(prompt)[0][0] == 0.0
    assert second.estimate(prompt)[1][0] == pytest.approx(50.0)
    # An entry written before a backend existed gets this engine's estimate for it.
    partial = type(entry)(prompt, {"small": 0.0}, {"small": 40.0}, "uid-1")
    assert second.add_learned([partial]) == 1
    with pytest.raises(ValueError, match="within"):
        first.make_learned(prompt, "small", 1.5)


def test_adopted_prices_are_used_but_are_not_own_fits(history_file):
    engine = RoutingEngine.from_config(config(history_file), background_fits=False)
    engine.adopt_gamma({"big": 0.5, "small": 0.0, "gone": 9.0})
    assert engine.gamma == {"small": 0.0, "big": 0.5}
    assert engine.local_fits == 0 and engine.controller.adopted == 1
    engine.adopt_gamma({"big": float("nan")})  # nonsense is ignored, not installed
    assert engine.gamma["big"] == 0.5


def test_a_new_replica_share_rescales_the_expected_volume_in_place(history_file):
    cfg = config(history_file, budgets={"tokens": {"big": 1000}, "replicaShare": 0.5})
    ledger = BudgetLedger(cfg.budgets)
    engine = RoutingEngine.from_config(cfg, ledger, background_fits=False)
    assert engine.controller.expected_queries == 100  # 200 x 0.5
    engine.set_replica_share(0.25)  # the router was scaled from 2 to 4 replicas
    assert engine.controller.expected_queries == 50
    assert engine.controller.warmup_queries == math.ceil(0.05 * 50)


def test_estimator_settings_shape_the_engines_estimates(history_file):
    uniform = RoutingEngine.from_config(
        config(history_file, ann={"k": 100}, estimator={"weighting": "uniform"}), background_fits=False
    )
    kernel = RoutingEngine.from_config(
        config(history_file, ann={"k": 100}, estimator={"weighting": "similarity", "temperature": 0.05}),
        background_fits=False,
    )
    prompt = "python code to sort a list quickly"
    d_u, _, _ = uniform.estimate(prompt)
    d_k, _, _ = kernel.estimate(prompt)
    # 100 neighbours reach past the 60 code entries into trivia (small scores 1 there); the kernel
    # discounts those far neighbours.
    assert d_u[0] > d_k[0] and d_k[0] < 0.2
    chosen = RoutingEngine.from_config(
        config(history_file, ann={"k": 100}, estimator={"chooseK": True}), background_fits=False
    )
    assert chosen.estimator.k in {5, 10, 20, 50, 100} and set(chosen.k_errors) == {5, 10, 20, 50, 100}
    assert chosen.status()["k"] == chosen.estimator.k
