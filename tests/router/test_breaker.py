"""The circuit breaker alone: a state machine driven by a hand-turned clock."""

from __future__ import annotations

from router_service.config import CircuitBreakerSettings
from router_service.proxy.breaker import Breaker, Breakers

SETTINGS = CircuitBreakerSettings(
    failure_threshold=3, open_seconds=10, max_open_seconds=35, half_open_probes=1
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    b = Breaker(SETTINGS, Clock())
    b.failure()
    b.failure()
    b.success()  # not consecutive any more
    b.failure()
    b.failure()
    assert b.current() == "closed" and b.allows()
    b.failure()
    assert b.current() == "open" and not b.allows() and b.trips == 1


def test_half_open_lets_one_probe_through_and_its_success_closes_it() -> None:
    clock = Clock()
    b = Breaker(SETTINGS, clock)
    for _ in range(3):
        b.failure()
    clock.now = 9.9
    assert not b.allows() and abs(b.retry_in() - 0.1) < 1e-9
    clock.now = 10.0
    assert b.current() == "half_open" and b.allows()
    b.begin()  # the probe is sent
    assert not b.allows()  # only one probe at a time
    b.success()
    assert b.current() == "closed" and b.allows() and b.failures == 0


def test_a_failed_probe_reopens_it_for_twice_as_long_up_to_the_cap() -> None:
    clock = Clock()
    b = Breaker(SETTINGS, clock)
    for _ in range(3):
        b.failure()
    opened = []
    for _ in range(4):
        clock.now += b.retry_in()
        assert b.current() == "half_open"
        b.begin()
        b.failure()
        opened.append(b.open_for)
    assert opened == [20, 35, 35, 35] and b.trips == 5


def test_a_neutral_end_gives_the_probe_slot_back() -> None:
    clock = Clock()
    b = Breaker(SETTINGS, clock)
    for _ in range(3):
        b.failure()
    clock.now = 10
    b.begin()
    b.neutral()  # the client left, or the backend said 429: nothing learned
    assert b.current() == "half_open" and b.allows()


def test_breakers_are_per_endpoint_and_survive_a_reload_of_the_endpoints_that_stay() -> None:
    clock = Clock()
    breakers = Breakers(SETTINGS, clock)
    for _ in range(3):
        breakers.record("http://a", "failure")
    assert not breakers.allows("http://a") and breakers.allows("http://b")
    assert breakers.snapshot()["http://a"]["state"] == "open"
    breakers.configure(CircuitBreakerSettings(failure_threshold=1), ["http://a"])
    assert not breakers.allows("http://a")
    breakers.record("http://b", "failure")  # the new threshold: one failure opens it
    assert not breakers.allows("http://b")
    breakers.configure(SETTINGS, [])
    assert breakers.snapshot() == {}
