"""Budgets shared through Redis: atomic across replicas, no per-replica split, windows agreed in
Redis and expiring there, restarts continuing the window, dead replicas' holds reclaimed."""

from __future__ import annotations

import math
import threading
import time

import pytest
import redis
from state_helpers import flushed, redis_usage, wait_until

from router_service.config import BudgetConfig
from router_service.routing.ledger import BudgetLedger


def test_reservations_across_replicas_never_exceed_the_budget_and_strand_none(redis_server, make_store):
    url = redis_server.url()
    replicas = [make_store(url, replica_id=f"r{i}") for i in range(3)]
    granted: list[int] = []
    lock = threading.Lock()

    def worker(store) -> None:
        for _ in range(80):
            reservation = store.reserve("m", 7.0, 1000.0)
            if reservation is not None:
                with lock:
                    granted.append(1)
                store.settle(reservation, 7.0)

    threads = [threading.Thread(target=worker, args=(s,)) for s in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(granted) == 1000 // 7  # every token that could be spent was, and not one more
    for store in replicas:
        wait_until(lambda store=store: flushed(store))
    used, settled = redis_usage(url, replicas[0])
    assert used == settled == 7 * (1000 // 7)


def test_a_shared_store_splits_nothing_per_replica(redis_server, make_store):
    config = BudgetConfig(window_seconds=600, tokens={"m": 1000}, replica_share=0.25)
    local = BudgetLedger(config)
    shared = BudgetLedger(config, store=make_store(redis_server.url()))
    assert local.budget("m") == 250 and not local.shared
    assert shared.budget("m") == 1000 and shared.shared
    assert shared.snapshot()["replica_share"] == 1.0 and shared.snapshot()["store"] == "redis"


def test_usage_is_seen_by_the_other_replica_and_ending_twice_counts_once(redis_server, make_store):
    url = redis_server.url()
    a, b = make_store(url, replica_id="a"), make_store(url, replica_id="b")
    held = a.reserve("m", 600.0, 1000.0)
    assert held is not None
    assert b.reserve("m", 500.0, 1000.0) is None  # Redis says no, whatever b's view was
    a.settle(held, 300.0)
    a.settle(held, 300.0)  # settling twice charges once
    a.release(held)
    wait_until(lambda: flushed(a))
    wait_until(lambda: b.remaining("m", 1000.0) == 700.0)  # b's sync brings the settlement
    assert redis_usage(url, a) == (300.0, 300.0)
    released = b.reserve("m", 700.0, 1000.0)
    assert released is not None
    b.release(released)
    wait_until(lambda: flushed(b))
    assert redis_usage(url, a) == (300.0, 300.0)


def test_ledger_facade_over_redis_keeps_its_behaviour(redis_server, make_store):
    ledger = BudgetLedger(
        BudgetConfig(window_seconds=600, tokens={"m": 1000}), store=make_store(redis_server.url())
    )
    r = ledger.reserve("m", 900)
    assert r is not None and ledger.remaining("m") == 100 and not ledger.can_afford("m", 101)
    ledger.settle(r, 1500)  # overdraw: the work is done
    assert ledger.remaining("m") == -500 and ledger.reserve("m", 0) is None
    assert ledger.remaining("free") == math.inf and ledger.reserve("free", 10**9) is not None
    snap = ledger.snapshot()
    assert snap["models"]["m"]["used"] == 1500 and snap["models"]["m"]["budget"] == 1000
    with pytest.raises(ValueError):
        ledger.reserve("m", -1)


def test_replicas_started_apart_agree_on_the_window_and_its_keys_expire(redis_server, make_store):
    url = redis_server.url()
    first = make_store(url, window_seconds=2.0)
    time.sleep(0.7)
    second = make_store(url, window_seconds=2.0)  # starts 0.7 s into the first one's window
    assert first.window().index == second.window().index
    assert abs(first.window().resets_in_seconds - second.window().resets_in_seconds) < 0.2
    assert first.reserve("m", 10.0, 1000.0) is not None
    ttl = redis.Redis.from_url(url).pttl(first.budget_key("m")) / 1000
    # The window's keys live until one window after it ends: long enough for late settlements.
    assert first.window().resets_in_seconds < ttl <= first.window().resets_in_seconds + 2.0 + 1.0
    wait_until(lambda: first.window().index == 1, timeout=4)
    assert first.remaining("m", 1000.0) == 1000.0  # a new window: the budget is whole again


def test_an_overdraw_is_repaid_by_the_next_window_on_every_replica(redis_server, make_store):
    """As with the in-process store: tokens settled beyond the budget (the backend used more than
    the worst case held) are spent budget of the next window, for every replica and for Redis's own
    admission check; the window after that owes nothing."""
    url = redis_server.url()
    a = make_store(url, replica_id="a", window_seconds=2.0)
    b = make_store(url, replica_id="b", window_seconds=2.0)
    wait_until(lambda: a.window().resets_in_seconds > 1.5, timeout=3)  # a window just began
    window = a.window().index
    a.settle(a.reserve("m", 900.0, 1000.0), 1200.0)
    wait_until(lambda: flushed(a))
    assert a.remaining("m", 1000.0) == -200.0
    wait_until(lambda: a.window().index == window + 1, timeout=4)
    for store in (a, b):
        wait_until(lambda store=store: store.remaining("m", 1000.0) == 800.0)
    assert b.reserve("m", 801.0, 1000.0) is None  # Redis counts the debt in its check
    held = b.reserve("m", 800.0, 1000.0)
    assert held is not None
    b.release(held)
    wait_until(lambda: a.window().index == window + 2, timeout=4)
    for store in (a, b):
        wait_until(lambda store=store: store.remaining("m", 1000.0) == 1000.0)


def test_a_restart_continues_the_windows_spend(redis_server, make_store, tmp_path):
    url = redis_server.url()
    before = make_store(url, replica_id="pod-a:1", state_file=str(tmp_path / "ledger.json"))
    window = before.window().index
    before.settle(before.reserve("m", 400.0, 1000.0), 400.0)
    before.close()
    after = make_store(url, replica_id="pod-a:2", state_file=str(tmp_path / "ledger.json"))
    assert after.window().index == window
    assert after.remaining("m", 1000.0) == 600.0
    assert after.reserve("m", 601.0, 1000.0) is None


def test_the_hold_of_a_replica_that_died_is_reclaimed_after_its_deadline(redis_server, make_store):
    url = redis_server.url()
    dying = make_store(url, replica_id="dying", hold_seconds=0.5)
    survivor = make_store(url, replica_id="survivor", hold_seconds=0.5)
    assert dying.reserve("m", 800.0, 1000.0) is not None  # never settled: the replica "dies"
    assert survivor.reserve("m", 300.0, 1000.0) is None
    took = wait_until(lambda: survivor.remaining("m", 1000.0) == 1000.0, timeout=3)
    assert took > 0.2  # not before the deadline
    assert survivor.reserve("m", 1000.0, 1000.0) is not None


def test_a_late_settlement_after_reclaim_charges_the_true_usage_once(redis_server, make_store):
    url = redis_server.url()
    slow = make_store(url, replica_id="slow", hold_seconds=0.2)
    other = make_store(url, replica_id="other")
    held = slow.reserve("m", 500.0, 1000.0)
    assert held is not None
    wait_until(lambda: other.remaining("m", 1000.0) == 1000.0, timeout=3)  # reclaimed
    slow.settle(held, 120.0)
    wait_until(lambda: flushed(slow))
    assert redis_usage(url, slow) == (120.0, 120.0)


def test_policies_sharing_one_redis_never_mix(redis_server, make_store):
    url = redis_server.url()
    a = make_store(url, key="ns/policy-a")
    b = make_store(url, key="ns/policy-b")
    assert a.reserve("m", 1000.0, 1000.0) is not None
    assert b.reserve("m", 1000.0, 1000.0) is not None
