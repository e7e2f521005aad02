"""Helpers shared by the state-store tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from router_service.store.redis_store import RedisStateStore


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> float:
    """Poll until `predicate()`; returns the seconds it took, raises AssertionError past `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
    return time.monotonic() - start


def flushed(store: RedisStateStore) -> bool:
    return store.health().pending_operations == 0


def redis_usage(url: str, store: RedisStateStore, model: str = "m") -> tuple[float, float]:
    """(used, settled) of `model` in the store's current window, read straight from Redis."""
    client = redis.Redis.from_url(url, decode_responses=True)
    used, settled = client.hmget(store.budget_key(model), ["used", "settled"])
    return float(used or 0), float(settled or 0)
