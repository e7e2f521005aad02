"""Fixtures for the resilience tests: the fault suite of benchmarks/faults.py, at CI size.

The benchmark scripts are not a package (they run as scripts), so they are loaded from their
files under private module names; `common` is put in sys.modules only while faults.py imports
it, so no test module named `common` elsewhere is shadowed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_faults() -> ModuleType:
    if "tollway_bench_faults" in sys.modules:
        return sys.modules["tollway_bench_faults"]
    common = _load("tollway_bench_common", BENCHMARKS / "common.py")
    previous = sys.modules.get("common")
    sys.modules["common"] = common
    try:
        return _load("tollway_bench_faults", BENCHMARKS / "faults.py")
    finally:
        if previous is None:
            del sys.modules["common"]
        else:
            sys.modules["common"] = previous


@pytest.fixture(scope="session")
def bench() -> ModuleType:
    """benchmarks/faults.py (Stack, Phase, run_phases, classify, fuzz_router, ...)."""
    return _load_faults()


@pytest.fixture(scope="session")
def stack(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Three simulators and a router, each a subprocess on 127.0.0.1, shared by the resilience
    tests (each test leaves it healthy) and stopped at the end of the session."""
    st = bench.Stack(
        tmp_path_factory.mktemp("resilience"),
        upstream_timeout=10.0,
        first_byte_timeout=1.0,
        breaker_open_seconds=0.5,
        breaker_max_open_seconds=1.0,
        drain_seconds=1.0,
    )
    try:
        st.start()
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def prompts(bench: ModuleType) -> list[str]:
    return bench.history_prompts(200)
