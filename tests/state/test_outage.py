"""Redis unreachable: serve on a local conservative share, say so, lose nothing, reconcile."""

from __future__ import annotations

import time

import pytest
from redis_server import free_port
from state_helpers import flushed, redis_usage, wait_until

from router_service.store.redis_store import local_share


def test_local_share_is_an_equal_part_of_what_was_left():
    assert local_share(600.0, 2) == 300.0
    assert local_share(600.0, 0) == 600.0  # never divides by zero: at least this replica
    assert local_share(-50.0, 3) == 0.0  # overdrawn: nothing to share


@pytest.mark.parametrize("appendonly", [True, False], ids=["redis-keeps-data", "redis-loses-data"])
def test_an_outage_serves_on_the_local_share_and_nothing_settled_is_lost(own_redis, make_store, appendonly):
    server = own_redis(appendonly=appendonly)
    url = server.url()
    a, b = make_store(url, replica_id="a"), make_store(url, replica_id="b")
    a.settle(a.reserve("m", 400.0, 1000.0), 400.0)
    wait_until(lambda: flushed(a) and a.health().live_replicas == 2 and a.remaining("m", 1000.0) == 600.0)

    server.stop()
    held = a.reserve("m", 200.0, 1000.0)  # the round trip fails: a falls back at once
    assert held is not None
    health = a.health()
    assert not health.connected and health.mode == "local-share" and health.outages == 1
    assert "1/2 of the remaining budget" in health.detail
    assert a.remaining("m", 1000.0) == 100.0  # (1000 - 400) / 2 live replicas - 200
    assert a.reserve("m", 150.0, 1000.0) is None
    a.settle(held, 180.0)
    assert a.remaining("m", 1000.0) == 120.0
    assert a.health().pending_operations == 2  # the hold and its settlement wait for Redis

    server.start()
    wait_until(lambda: a.health().connected and flushed(a), timeout=10)
    wait_until(lambda: b.health().connected, timeout=10)
    # Kept or lost by Redis, the window's usage is the 400 settled before plus the 180 during.
    assert redis_usage(url, a) == (580.0, 580.0 if appendonly else 180.0)
    wait_until(lambda: b.remaining("m", 1000.0) == 420.0)
    assert a.health().outages == 1


def test_a_redis_that_stops_answering_costs_the_request_path_one_timeout(own_redis, make_store):
    server = own_redis()
    store = make_store(server.url(), timeout_seconds=0.2)
    server.pause()
    try:
        started = time.monotonic()
        held = store.reserve("m", 100.0, 1000.0)
        first = time.monotonic() - started
        started = time.monotonic()
        again = store.reserve("m", 100.0, 1000.0)
        second = time.monotonic() - started
        assert held is not None and again is not None
        assert first < 1.0  # one timeout (0.2 s), not a retry loop
        assert second < 0.05  # later requests go straight to the local share
        store.settle(held, 50.0)
        store.release(again)
    finally:
        server.resume()
    wait_until(lambda: store.health().connected and flushed(store), timeout=10)
    assert redis_usage(server.url(), store) == (50.0, 50.0)


def test_a_replica_that_never_reached_redis_spends_only_its_static_split(make_store):
    store = make_store(f"redis://127.0.0.1:{free_port()}/0", static_share=0.25)
    health = store.health()
    assert not health.connected and "static split" in health.detail
    assert store.remaining("m", 1000.0) == 250.0
    assert store.reserve("m", 250.0, 1000.0) is not None
    assert store.reserve("m", 1.0, 1000.0) is None


def test_operations_queued_during_an_outage_survive_a_restart(own_redis, make_store, tmp_path):
    server = own_redis(appendonly=True)
    url = server.url()
    state_file = str(tmp_path / "ledger.json")
    first = make_store(url, replica_id="pod:1", state_file=state_file)
    first.settle(first.reserve("m", 100.0, 1000.0), 100.0)
    wait_until(lambda: flushed(first))
    server.stop()
    first.settle(first.reserve("m", 200.0, 1000.0), 150.0)  # during the outage
    first.close(flush_timeout=1)  # a rollout: the queued writes go to the state file
    second = make_store(url, replica_id="pod:2", state_file=state_file)
    assert second.health().pending_operations == 2
    assert second.remaining("m", 1000.0) <= 1000.0 - 100.0 - 150.0  # still counts what it cannot write
    server.start()
    wait_until(lambda: second.health().connected and flushed(second), timeout=10)
    assert redis_usage(url, second) == (250.0, 250.0)


def test_a_replica_started_during_an_outage_joins_the_policys_window(own_redis, make_store):
    server = own_redis(appendonly=True)
    url = server.url()
    first = make_store(url, replica_id="first", window_seconds=2.0)  # sets the policy's anchor
    time.sleep(2.2)  # the policy is in its second window now
    server.stop()
    late = make_store(url, replica_id="late", window_seconds=2.0, static_share=0.5)
    assert late.window().index == 0  # counted from its own start: it cannot know better yet
    late.settle(late.reserve("m", 100.0, 1000.0), 60.0)
    server.start()
    wait_until(lambda: late.health().connected and flushed(late), timeout=5)
    assert late.window().index == first.window().index == 1
    assert redis_usage(url, late) == (60.0, 60.0)  # charged to the policy's current window
