"""Root fixtures shared by every test area. Keep this small: areas put their own in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from redis_server import RedisServer

    from router_service.simulator import SimulatorServer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"


def find_tool(name: str) -> str | None:
    """A command-line tool from .tools/bin (installed by .ci/setup), else from PATH."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """`tool("helm")` -> path. A missing tool fails the test (CI always runs .ci/setup), never skips it."""

    def get(name: str) -> str:
        path = find_tool(name)
        if path is None:
            pytest.fail(f"{name} not found in .tools/bin or on PATH: run .ci/setup", pytrace=False)
        return path

    return get


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests keep apart by a unique key prefix each).
    Missing redis-server fails the test (.ci/setup installs it), never skips it."""
    from redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.fail("redis-server not found: run .ci/setup (apt-get install redis-server)", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """own_redis(appendonly=False) -> a redis-server for this test alone (to stop, pause, restart)."""
    from redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.fail("redis-server not found: run .ci/setup (apt-get install redis-server)", pytrace=False)
    servers: list[RedisServer] = []

    def make(appendonly: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", appendonly=appendonly).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., SimulatorServer]]:
    """start_simulator(model="sim-small", **profile fields) -> a simulator on 127.0.0.1 (free port,
    in-process, speedup 50 unless given); all are stopped after the test."""
    from router_service.simulator import SimulatorProfile, SimulatorServer

    servers: list[SimulatorServer] = []

    def start(model: str = "sim-small", **fields: object) -> SimulatorServer:
        fields.setdefault("speedup", 50.0)
        server = SimulatorServer(SimulatorProfile(model=model, **fields)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
