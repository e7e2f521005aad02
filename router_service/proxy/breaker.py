"""Circuit breakers: keep work away from a backend endpoint that keeps failing.

One `Breaker` per endpoint (today a backend's base URL; once replicas are routed, a replica's).
A state machine, pure apart from the injected clock:

    closed --(failureThreshold consecutive failures)--> open
    open --(openSeconds passed)--> half-open: up to halfOpenProbes requests are let through
    half-open --(a probe succeeds)--> closed
    half-open --(a probe fails)--> open again, for twice as long (at most maxOpenSeconds)

A failure is what makes an attempt worthless before the client saw anything: no connection, no
first byte in time, a 5xx, a broken response. A 4xx (the client's fault) or a 429 (overloaded:
load shedding's business) is neither a failure nor a success. `Breakers` holds one per endpoint
and is what the request path asks (`allows`) and tells (`record`); `opened(endpoint)` is an event
set when that endpoint's circuit opens, so requests still waiting on it can go elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from router_service.config import CircuitBreakerSettings

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The state as a number, for the `tollway_circuit_state` gauge."""


@dataclass
class Breaker:
    settings: CircuitBreakerSettings
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    failures: int = 0  # consecutive, while closed
    opened_at: float = 0.0
    open_for: float = 0.0
    probes: int = 0  # in flight while half-open
    trips: int = 0  # times it opened

    def _refresh(self) -> None:
        if self.state == "open" and self.clock() - self.opened_at >= self.open_for:
            self.state, self.probes = "half_open", 0

    def current(self) -> State:
        self._refresh()
        return self.state

    def allows(self) -> bool:
        """Whether a request may be sent now (does not take a probe slot; `begin` does)."""
        self._refresh()
        if self.state == "closed":
            return True
        return self.state == "half_open" and self.probes < self.settings.half_open_probes

    def begin(self) -> None:
        """A request is being sent: in half-open it takes one probe slot."""
        self._refresh()
        if self.state == "half_open":
            self.probes += 1

    def success(self) -> None:
        self._refresh()
        if self.state == "half_open":
            self.state, self.probes, self.open_for = "closed", 0, 0.0
        self.failures = 0

    def failure(self) -> None:
        self._refresh()
        if self.state == "half_open":
            self._open(
                min(self.settings.max_open_seconds, max(self.open_for, self.settings.open_seconds) * 2)
            )
        elif self.state == "closed":
            self.failures += 1
            if self.failures >= self.settings.failure_threshold:
                self._open(self.settings.open_seconds)

    def neutral(self) -> None:
        """The attempt ended without telling anything about the endpoint's health (a 4xx, a 429, the
        client left): a half-open probe slot is given back."""
        self._refresh()
        if self.state == "half_open" and self.probes > 0:
            self.probes -= 1

    def trip(self) -> None:
        """Open now, whatever the count (the endpoint was seen hung by other means)."""
        if self.current() != "open":
            self._open(self.settings.open_seconds)

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        self._refresh()
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self.open_for - self.clock())

    def _open(self, seconds: float) -> None:
        self.state, self.opened_at, self.open_for = "open", self.clock(), seconds
        self.failures, self.probes = 0, 0
        self.trips += 1


Outcome = Literal["success", "failure", "neutral"]


class Breakers:
    """One breaker per endpoint, created on first use; endpoints that leave the config are dropped."""

    def __init__(self, settings: CircuitBreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._by_endpoint: dict[str, Breaker] = {}
        self._opened: dict[str, asyncio.Event] = {}

    def configure(self, settings: CircuitBreakerSettings, endpoints: Iterable[str]) -> None:
        """A (re)loaded config: new settings for every breaker, state kept for endpoints that stay."""
        self.settings = settings
        keep = set(endpoints)
        self._by_endpoint = {e: b for e, b in self._by_endpoint.items() if e in keep}
        for breaker in self._by_endpoint.values():
            breaker.settings = settings

    def get(self, endpoint: str) -> Breaker:
        breaker = self._by_endpoint.get(endpoint)
        if breaker is None:
            breaker = self._by_endpoint[endpoint] = Breaker(self.settings, self._clock)
        return breaker

    def allows(self, endpoint: str) -> bool:
        breaker = self._by_endpoint.get(endpoint)
        return breaker is None or breaker.allows()

    def record(self, endpoint: str, outcome: Outcome) -> None:
        breaker = self.get(endpoint)
        trips = breaker.trips
        if outcome == "success":
            breaker.success()
        elif outcome == "failure":
            breaker.failure()
        else:
            breaker.neutral()
        if breaker.trips != trips and endpoint in self._opened:
            self._opened.pop(endpoint).set()

    def trip(self, endpoint: str) -> None:
        breaker = self.get(endpoint)
        trips = breaker.trips
        breaker.trip()
        if breaker.trips != trips and endpoint in self._opened:
            self._opened.pop(endpoint).set()

    def opened(self, endpoint: str) -> asyncio.Event:
        """Set the next time `endpoint`'s circuit opens."""
        event = self._opened.get(endpoint)
        if event is None:
            event = self._opened[endpoint] = asyncio.Event()
        return event

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            endpoint: {
                "state": b.current(),
                "consecutive_failures": b.failures,
                "retry_in_seconds": round(b.retry_in(), 3),
                "trips": b.trips,
            }
            for endpoint, b in self._by_endpoint.items()
        }
