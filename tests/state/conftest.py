"""Fixtures for the state-store tests: Redis stores that are closed after the test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router_service.store.redis_store import RedisStateStore


@pytest.fixture
def key() -> str:
    """A key prefix of this test's own, so tests sharing one redis-server never meet."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(key: str) -> Iterator[Callable[..., RedisStateStore]]:
    """make_store(url, **overrides) -> a started RedisStateStore (one "replica"), closed after the test."""
    made: list[RedisStateStore] = []

    def make(url: str, *, start: bool = True, **overrides: Any) -> RedisStateStore:
        options: dict[str, Any] = {
            "key": key,
            "window_seconds": 600.0,
            "budgets": {"m": 1000.0},
            "sync_interval_seconds": 0.1,
            "timeout_seconds": 0.5,
        }
        options.update(overrides)
        store = RedisStateStore(url, **options)
        if start:
            store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close(flush_timeout=2)
