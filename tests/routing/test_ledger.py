import json
import threading

import pytest

from router_service.config import BudgetConfig
from router_service.routing.ledger import BudgetLedger


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tokens=None, **kw) -> tuple[BudgetLedger, Clock]:
    clock = Clock()
    cfg = BudgetConfig(window_seconds=60, tokens=tokens or {"big": 1000, "small": 5000}, **kw)
    return BudgetLedger(cfg, clock=clock, wall_clock=clock), clock


def test_reserve_settle_release():
    ledger, _ = make()
    r = ledger.reserve("big", 600)
    assert r is not None and ledger.remaining("big") == 400
    assert ledger.reserve("big", 500) is None  # cannot pay: caller falls back
    ledger.settle(r, 300)  # true usage replaces the estimate
    assert ledger.remaining("big") == 700
    ledger.settle(r, 300)  # settling twice charges once
    assert ledger.remaining("big") == 700
    r2 = ledger.reserve("big", 700)
    ledger.release(r2)
    assert ledger.remaining("big") == 700
    assert ledger.remaining("unbudgeted") == float("inf")
    assert ledger.reserve("unbudgeted", 10**9) is not None


def test_settle_may_overdraw_and_blocks_further_work():
    ledger, _ = make()
    r = ledger.reserve("big", 900)
    ledger.settle(r, 1500)
    assert ledger.remaining("big") == -500
    assert ledger.reserve("big", 0) is None


def test_an_overdraw_is_repaid_by_the_next_window_and_cleared_by_an_idle_one():
    ledger, clock = make()
    ledger.settle(ledger.reserve("big", 900), 1200)  # the backend used more than the worst case held
    held = ledger.reserve("small", 100)
    clock.t += 61
    assert ledger.remaining("big") == 800  # the 200 overdrawn are spent budget of the new window
    assert ledger.remaining("small") == 4900  # no debt there, its in-flight hold carried as before
    ledger.settle(held, 100)
    ledger.settle(ledger.reserve("big", 800), 900)  # overdrawn again by 100
    clock.t += 121  # two windows pass: the one after the overdraw repaid it while idle
    assert ledger.remaining("big") == 1000


def test_replica_share_and_resize_keep_usage():
    ledger, _ = make(replica_share=0.5)
    assert ledger.budget("big") == 500
    ledger.settle(ledger.reserve("big", 200), 200)
    ledger.resize(BudgetConfig(window_seconds=60, tokens={"big": 4000}, replica_share=0.5))
    assert ledger.remaining("big") == 1800
    assert ledger.remaining("small") == float("inf")


def test_window_rollover_refills_and_carries_in_flight():
    ledger, clock = make()
    done = ledger.reserve("big", 400)
    ledger.settle(done, 400)
    held = ledger.reserve("big", 300)
    assert ledger.remaining("big") == 300
    clock.t += 61
    assert ledger.window_index == 1
    assert ledger.remaining("big") == 700  # refilled, the in-flight 300 still held
    ledger.settle(held, 100)
    assert ledger.remaining("big") == 900
    snap = ledger.snapshot()
    assert snap["models"]["big"] == {"budget": 1000.0, "used": 100.0, "in_flight": 0.0, "remaining": 900.0}
    assert 0 < snap["window_resets_in_seconds"] <= 60


def test_state_survives_restart_within_the_window(tmp_path):
    state = tmp_path / "ledger.json"
    ledger, clock = make(state_file=str(state))
    ledger.settle(ledger.reserve("big", 250), 250)
    ledger.save()
    assert json.loads(state.read_text())["used"]["big"] == 250
    again = BudgetLedger(
        BudgetConfig(window_seconds=60, tokens={"big": 1000}, state_file=str(state)),
        clock=clock,
        wall_clock=clock,
    )
    assert again.remaining("big") == 750
    clock.t += 100  # past the window: a fresh start
    later = BudgetLedger(
        BudgetConfig(window_seconds=60, tokens={"big": 1000}, state_file=str(state)),
        clock=clock,
        wall_clock=clock,
    )
    assert later.remaining("big") == 1000


def test_corrupt_state_file_is_named(tmp_path):
    state = tmp_path / "ledger.json"
    state.write_text("{not json")
    with pytest.raises(ValueError, match="stateFile"):
        BudgetLedger(BudgetConfig(tokens={"big": 1}, state_file=str(state)))


def test_concurrent_reservations_never_exceed_the_budget():
    ledger, _ = make(tokens={"big": 1000})
    granted = []

    def worker() -> None:
        for _ in range(200):
            if ledger.reserve("big", 7) is not None:
                granted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(granted) == 1000 // 7
    assert ledger.remaining("big") == 1000 - 7 * (1000 // 7)
