"""The replica picker's steps one at a time (filter, prefer, score, pick), and the model verdict
that follows from them: a model is as good as its best replica."""

from __future__ import annotations

import random

import pytest

from router_service.config import DegradationSettings, EndpointPickerSettings
from router_service.proxy.endpoints import Endpoint
from router_service.proxy.load import CIRCUIT_OPEN, ReplicaLoad, ScrapedLoad
from router_service.proxy.picker import (
    FREE_SLOT,
    FRESH,
    choose_replica,
    kv_cache_score,
    pick_most_room,
    pick_random,
    pick_round_robin,
    prefer,
    queue_score,
    replica_options,
    running_score,
    scorers,
    with_room,
)

SETTINGS = DegradationSettings.model_validate({"maxWaitingPerReplica": 4, "maxKvCacheUsage": 0.9})
NOW = 100.0


def replica(
    name: str,
    *,
    in_flight: int = 0,
    waiting: float | None = None,
    running: float = 0.0,
    kv: float | None = 0.0,
    turn: int = 0,
    failed: bool = False,
    age: float = 0.5,
) -> ReplicaLoad:
    """A replica at http://<name>; `waiting=None`: never scraped (unknown)."""
    url = f"http://{name}:8000"
    r = ReplicaLoad(Endpoint(url, url + "/metrics"), in_flight=in_flight, turn=turn, scrape_failed=failed)
    if waiting is not None:
        r.scraped = ScrapedLoad(waiting=waiting, running=running, kv_usage=kv, at=NOW - age)
    return r


def options(*replicas: ReplicaLoad, max_num_seqs: int | None = 8, closed: frozenset[str] = frozenset()):
    return replica_options(
        replicas,
        settings=SETTINGS,
        priority="standard",
        now=NOW,
        max_num_seqs=max_num_seqs,
        allows=lambda url: url not in closed,
    )


def choose(*replicas: ReplicaLoad, strategy: str = "least-loaded", **kw: object):
    return choose_replica(
        replicas,
        settings=SETTINGS,
        picker=EndpointPickerSettings(strategy=strategy),
        priority="standard",
        now=NOW,
        max_num_seqs=kw.pop("max_num_seqs", 8),  # type: ignore[arg-type]
        allows=lambda url: url not in kw.get("closed", ()),  # type: ignore[operator]
        rng=kw.get("rng"),  # type: ignore[arg-type]
    )


# --- filters ------------------------------------------------------------------------------------


def test_with_room_drops_saturated_and_failing_replicas() -> None:
    idle, queued, broken = replica("a", waiting=0), replica("b", waiting=9), replica("c", waiting=0)
    kept = with_room(options(idle, queued, broken, closed=frozenset({"http://c:8000"})))
    assert [o.replica for o in kept] == [idle]


def test_a_preference_keeps_what_it_accepts_or_everything() -> None:
    opts = options(replica("a", waiting=0), replica("b", waiting=0))
    only_b = prefer(lambda o: o.replica.url == "http://b:8000")
    assert [o.replica.url for o in only_b(opts)] == ["http://b:8000"]
    nobody = prefer(lambda o: False)
    assert nobody(opts) == opts


def test_free_slot_and_fresh_preferences() -> None:
    full = replica("full", in_flight=8, waiting=0)  # one more would queue (8 slots)
    free = replica("free", in_flight=2, waiting=0)
    assert [o.replica for o in FREE_SLOT(options(full, free))] == [free]
    unknown, stale, failed = (
        replica("u"),
        replica("s", waiting=0, age=60),
        replica("f", waiting=0, failed=True),
    )
    healthy = replica("h", waiting=1, kv=0.6)
    assert [o.replica for o in FRESH(options(unknown, stale, failed, healthy))] == [healthy]
    assert len(FRESH(options(unknown, stale))) == 2  # none fresh: all stay


# --- scorers ------------------------------------------------------------------------------------


def test_scores_are_room_left_normalised_by_each_replicas_limits() -> None:
    (o,) = options(replica("a", in_flight=2, waiting=1, running=6, kv=0.25))
    assert running_score(o, SETTINGS) == pytest.approx(1 - 7 / 8)  # running + waiting of 8 slots
    assert queue_score(o, SETTINGS) == pytest.approx(1 - 1 / 4)
    assert kv_cache_score(o, SETTINGS) == pytest.approx(0.75)
    # Between scrapes the router's own requests count: 10 in flight on 8 slots = 2 waiting.
    (o,) = options(replica("b", in_flight=10, waiting=0, running=0, kv=0.0))
    assert running_score(o, SETTINGS) == 0.0 and queue_score(o, SETTINGS) == pytest.approx(0.5)
    # Unknown metrics score no KV room (never taken for idle).
    (o,) = options(replica("c"))
    assert kv_cache_score(o, SETTINGS) == 0.0 and running_score(o, SETTINGS) == 1.0


def test_without_max_num_seqs_running_counts_against_max_in_flight() -> None:
    (o,) = options(replica("a", in_flight=64), max_num_seqs=None)
    assert running_score(o, SETTINGS) == pytest.approx(1 - 64 / SETTINGS.max_in_flight_per_replica)


# --- pickers ------------------------------------------------------------------------------------


def test_most_room_wins_and_ties_take_turns() -> None:
    weights = scorers(EndpointPickerSettings().weights)
    busy, idle = replica("busy", in_flight=5, waiting=0, kv=0.5), replica("idle", waiting=0, kv=0.1)
    assert pick_most_room(options(busy, idle), SETTINGS, weights).replica is idle
    a, b = replica("a", waiting=0, turn=7), replica("b", waiting=0, turn=3)
    assert pick_most_room(options(a, b), SETTINGS, weights).replica is b  # picked longest ago


def test_round_robin_and_random() -> None:
    a, b, c = replica("a", turn=5), replica("b", turn=2), replica("c", turn=9)
    assert pick_round_robin(options(a, b, c)).replica is b
    rng = random.Random(1)
    seen = {pick_random(options(a, b, c), rng).replica.url for _ in range(50)}
    assert len(seen) == 3


# --- the model's verdict --------------------------------------------------------------------------


def test_a_model_with_one_hot_and_one_idle_replica_can_serve_on_the_idle_one() -> None:
    hot = replica("hot", in_flight=3, waiting=20, running=8, kv=0.95)
    idle = replica("idle", waiting=0, kv=0.05)
    v = choose(hot, idle)
    assert v.can_serve and v.endpoint == "http://idle:8000" and not v.queues


def test_a_replica_whose_scrape_failed_is_not_preferred_over_a_healthy_one() -> None:
    failed = replica("failed", waiting=0, kv=0.0, failed=True)  # its last good read said idle
    healthy = replica("healthy", in_flight=4, waiting=1, running=4, kv=0.7)
    assert choose(failed, healthy).endpoint == "http://healthy:8000"
    # Only when the healthy one has no room does the unknown one serve.
    saturated = replica("healthy", waiting=9, kv=0.7)
    assert choose(failed, saturated).endpoint == "http://failed:8000"


def test_model_verdicts_when_no_replica_can_serve() -> None:
    assert choose().reason == "unavailable"
    a, b = replica("a", waiting=0), replica("b", waiting=0)
    closed = choose(a, b, closed={"http://a:8000", "http://b:8000"})
    assert closed.reason == CIRCUIT_OPEN and not closed.can_serve
    # One failing, one saturated: the saturated one's reason (load, not failure, keeps it out).
    v = choose(a, replica("b", waiting=9), closed={"http://a:8000"})
    assert v.saturated and v.reason == "waiting" and v.endpoint is None


def test_a_model_queues_only_when_every_replica_with_room_would_queue() -> None:
    full, free = replica("full", in_flight=8, waiting=0), replica("free", in_flight=7, waiting=0)
    v = choose(full, free)
    assert not v.queues and v.endpoint == "http://free:8000"
    v = choose(full, replica("full2", in_flight=8, waiting=0))
    assert v.can_serve and v.queues


def test_round_robin_ignores_load_but_not_failing_replicas() -> None:
    hot = replica("hot", waiting=3, kv=0.8, turn=1)  # has room, but much less than idle
    idle = replica("idle", waiting=0, turn=2)
    assert choose(hot, idle, strategy="round-robin").endpoint == "http://hot:8000"
    assert choose(hot, idle, strategy="least-loaded").endpoint == "http://idle:8000"
    assert (
        choose(hot, idle, strategy="round-robin", closed={"http://hot:8000"}).endpoint == "http://idle:8000"
    )
