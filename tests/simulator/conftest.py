from __future__ import annotations

from collections.abc import Iterator

import pytest

from router_service.simulator import SimulatorProfile, SimulatorServer


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    """One default simulator shared by a test module (for tests that do not depend on its counters)."""
    with SimulatorServer(SimulatorProfile(model="sim-small", speedup=50.0)) as server:
        yield server
