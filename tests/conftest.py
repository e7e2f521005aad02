"""Root fixtures shared by every test area. Keep this small: areas put their own in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

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
