"""Fixtures for the router tests: simulators on background threads, a router in front of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from router_helpers import PROFILES

from router_service.proxy.server import BackgroundRouter
from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import SimulatorServer


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimulatorServer]]:
    """small / medium / large simulators, fast clock; faults cleared after every test."""
    servers: dict[str, SimulatorServer] = {}
    try:
        for seed, name in enumerate(PROFILES):
            servers[name] = SimulatorServer(
                SimulatorProfile(model=name, speedup=50, seed=seed, ttft_ms=5)
            ).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def clean_sims(sims: dict[str, SimulatorServer]) -> Iterator[dict[str, SimulatorServer]]:
    for s in sims.values():
        s.clear_faults()
    yield sims
    for s in sims.values():
        s.clear_faults()


@pytest.fixture
def urls(clean_sims: dict[str, SimulatorServer]) -> dict[str, str]:
    return {name: s.url for name, s in clean_sims.items()}


@pytest.fixture
def start_router() -> Iterator[Callable[..., BackgroundRouter]]:
    """start_router(config_or_path, **create_app_kwargs) -> a started router, stopped after the test."""
    started: list[BackgroundRouter] = []

    def start(config: Any, **kwargs: Any) -> BackgroundRouter:
        router = BackgroundRouter(config, **kwargs).start()
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop(timeout=10)
