from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from router_service.simulator import SimulatorProfile, SimulatorServer


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., SimulatorServer]]:
    """Start simulators (in-process, 127.0.0.1, free port); all are stopped after the test."""
    servers: list[SimulatorServer] = []

    def start(model: str = "sim-small", **fields: object) -> SimulatorServer:
        fields.setdefault("speedup", 50.0)
        server = SimulatorServer(SimulatorProfile(model=model, **fields)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    """One default simulator shared by a test module (for tests that do not depend on its counters)."""
    with SimulatorServer(SimulatorProfile(model="sim-small", speedup=50.0)) as server:
        yield server
