"""Calibrated columns replace a backend's borrowed profile where it was measured (routing.calibrated)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CODE, synthetic_history
from test_engine import config

from router_service.routing.calibrated import applicable, fingerprint, join_calibrations
from router_service.routing.engine import RoutingEngine
from router_service.routing.history import History
from router_service.store.base import CalibratedRow, Calibration


def columns(history: History) -> History:
    """The synthetic history with backend names as columns (what the engine joins onto)."""
    return History(
        prompts=history.prompts,
        models=["small", "big"],
        scores=history.scores,
        costs=history.costs,
        tokens=history.tokens,
        eval_names=history.eval_names,
    )


def calibrated(
    model: str, rows: dict[str, float], completion: float = 7.0, revision: str = "r1"
) -> Calibration:
    return Calibration(
        model=model,
        revision=revision,
        rows=tuple(CalibratedRow(p, s, 100.0, completion, "t") for p, s in rows.items()),
    )


def code_prompts(history: History) -> list[str]:
    return [p for p in history.prompts if "python" in p]


def test_measured_rows_replace_the_profile_and_the_rest_keeps_it():
    history = columns(synthetic_history(copies=4))
    code = code_prompts(history)
    measured = {p: 1.0 for p in code[:5]}  # small is measured good at five code prompts
    joined = join_calibrations(history, {"small": calibrated("small", measured, completion=3.0)})
    out = joined.history
    for i, prompt in enumerate(out.prompts):
        if prompt in measured:
            assert out.scores[i, 0] == 1.0  # the borrowed column said 0.0
            completion = out.tokens[i, 0] - out.prompt_tokens[i]
            assert completion == pytest.approx(3.0)  # the true completion tokens
        else:
            assert out.scores[i, 0] == history.scores[i, 0]  # the prior where nothing was measured
            assert out.tokens[i, 0] == history.tokens[i, 0]
    np.testing.assert_array_equal(out.scores[:, 1], history.scores[:, 1])  # big was not calibrated
    assert joined.matched == {"small": 5} and joined.added == {"small": 0} and joined.extra == []
    assert history.scores[history.prompts.index(code[0]), 0] == 0.0  # the input is not modified


def test_prompts_the_history_lacks_become_entries_with_what_was_measured():
    history = columns(synthetic_history(copies=2))
    new = "write a haskell function that folds a tree"
    joined = join_calibrations(
        history,
        {
            "small": calibrated("small", {new: 1.0, history.prompts[0]: 1.0}),
            "big": calibrated("big", {new: 0.0}),
        },
    )
    assert joined.added == {"small": 1, "big": 1} and joined.matched == {"small": 1, "big": 0}
    (entry,) = joined.extra
    assert entry.prompt == new
    assert entry.quality == {"small": 1.0, "big": 0.0} and entry.completion == {"small": 7.0, "big": 7.0}


def test_lines_sharing_a_prompt_are_averaged():
    history = columns(synthetic_history(copies=1))
    prompt = code_prompts(history)[0]
    calibration = Calibration(
        "small",
        "r1",
        (CalibratedRow(prompt, 1.0, 10, 4, "a"), CalibratedRow(prompt, 0.0, 10, 8, "b")),
    )
    out = join_calibrations(history, {"small": calibration}).history
    i = out.prompts.index(prompt)
    assert out.scores[i, 0] == 0.5
    assert out.tokens[i, 0] - out.prompt_tokens[i] == pytest.approx(6.0)


def test_a_backend_uses_only_the_revision_it_expects(history_file):
    cfg = config(history_file)
    small = cfg.backend("small")
    assert small is not None
    stale = {"small": calibrated("small", {"x": 1.0}, revision="old")}
    assert set(applicable(stale, cfg.backends)) == {"small"}  # no revision named: any is used
    pinned = small.model_copy(update={"calibration_revision": "new"})
    assert applicable(stale, [pinned]) == {}
    assert fingerprint(stale, [pinned]) == ""
    current = {"small": calibrated("small", {"x": 1.0}, revision="new")}
    assert set(applicable(current, [pinned])) == {"small"}
    assert fingerprint(current, [pinned]) != fingerprint(stale, cfg.backends) != ""


def test_routing_follows_the_calibrated_column_not_the_borrowed_one(history_file):
    """The profile says small scores 0 on code; its calibration says 1 and big's says 0. A router
    still using the borrowed columns would send code to big."""
    history = synthetic_history()
    cfg = config(history_file)
    query = "python code to sort a list quickly"
    before = RoutingEngine.from_config(cfg, background_fits=False)
    assert before.rank(query).candidates[0].model == "big"
    code = code_prompts(history)
    calibrations = {
        "small": calibrated("small", {p: 1.0 for p in code}),
        "big": calibrated("big", {p: 0.0 for p in code}),
    }
    after = RoutingEngine.from_config(cfg, background_fits=False, calibrations=calibrations)
    best = after.rank(query).candidates[0]
    assert best.model == "small" and best.quality == 1.0
    assert after.calibrated["small"]["history_rows_replaced"] == len(code)
    assert after.status()["columns"] == {"small": "calibrated", "big": "calibrated"}
    assert not after.calibration_outdated(calibrations)
    assert after.calibration_outdated({"small": calibrations["small"]})
    assert before.calibration_outdated(calibrations)


def test_a_calibrated_prompt_the_history_lacks_is_found_as_a_neighbour(history_file):
    cfg = config(history_file)
    unusual = "compose a limerick about a very sleepy walrus named boris"
    engine = RoutingEngine.from_config(
        cfg,
        background_fits=False,
        calibrations={"small": calibrated("small", {unusual: 1.0}), "big": calibrated("big", {unusual: 0.0})},
    )
    assert engine.history_size == len(synthetic_history()) + 1
    assert engine.calibrated["big"]["entries_added"] == 1
    ids = engine.estimator.neighbours(engine.embedder.embed([unusual]))
    assert len(synthetic_history()) in ids[0]  # the added entry is the query's own neighbour


def test_uncalibrated_backends_keep_their_profile_everywhere(history_file):
    cfg = config(history_file)
    plain = RoutingEngine.from_config(cfg, background_fits=False)
    some = RoutingEngine.from_config(
        cfg, background_fits=False, calibrations={"small": calibrated("small", {CODE[0] + " variant 0": 1.0})}
    )
    q = "who painted the mona lisa again"
    d_plain, _, _ = plain.estimate(q)
    d_some, _, _ = some.estimate(q)
    assert d_some[1] == d_plain[1]  # big
    assert some.status()["columns"] == {"small": "calibrated", "big": "org/big-model"}


def test_the_builtin_set_joins_row_for_row_onto_the_builtin_history():
    """The built-in calibration set's prompts are the shipped history's: calibrating a model on it
    replaces its profile's values on every history row the set covers; the set's held-out
    (`stream`) lines, which the router's history leaves out, come in as entries."""
    from router_service.calibration.dataset import load_dataset
    from router_service.config import RouterConfig
    from router_service.routing.history import load_builtin_history

    items = load_dataset("builtin").items
    history = load_builtin_history("history")
    covered = {i.prompt for i in items} & set(history.prompts)
    held_out = {i.prompt for i in items} - set(history.prompts)
    assert len(covered) > 1000 and held_out == {i.prompt for i in items if i.split == "stream"}
    cfg = RouterConfig.model_validate(
        {"backends": [{"name": "mine", "url": "http://m:8000", "profile": "gpt-4-1106-preview"}]}
    )
    measured = Calibration(
        "mine", "r", tuple(CalibratedRow(i.prompt, 0.0, 100.0, 1.0, i.task) for i in items)
    )
    engine = RoutingEngine.from_config(cfg, background_fits=False, calibrations={"mine": measured})
    info = engine.calibrated["mine"]
    assert info["history_rows_replaced"] == sum(p in covered for p in history.prompts)
    assert info["entries_added"] == len(held_out)
    d, _, _ = engine.estimate(items[0].prompt)
    assert d[0] == 0.0  # gpt-4's column said otherwise for ARC/Winogrande; the measurement wins
