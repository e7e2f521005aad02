"""Packaging: every sub-package is installed, `operator/` never shadows the standard library, and the
router never depends on the operator."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from crd_validation import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# import name -> folder
ROOTS = {name: REPO_ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}


def packages_on_disk() -> set[str]:
    found = set()
    for name, folder in ROOTS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join((name, *relative.parts)))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(SETUPTOOLS["packages"])
    on_disk = packages_on_disk()
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set(), "pyproject lists packages that have no folder with __init__.py"


def test_operator_package_lives_one_level_down() -> None:
    assert SETUPTOOLS["package-dir"]["tollway_operator"] == "operator/tollway_operator"
    module = importlib.import_module("tollway_operator")
    assert Path(module.__file__ or "").resolve().parent == REPO_ROOT / "operator" / "tollway_operator"
    # Nothing in the repository root is importable as `operator`: the folder is no package.
    assert not (REPO_ROOT / "operator" / "__init__.py").exists()
    assert not (REPO_ROOT / "operator.py").exists()


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh `python -m venv`, created from the repository root, without the project installed."""
    base = getattr(sys, "_base_executable", sys.executable)
    venv = tmp_path_factory.mktemp("plain") / "venv"
    # Not `-I`: the current directory (the repository root) is on sys.path, as for any contributor.
    result = subprocess.run(
        [base, "-m", "venv", str(venv)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    return venv / "bin" / "python"


def test_a_plain_interpreter_in_the_repo_root_imports_the_standard_operator(plain_venv: Path) -> None:
    result = subprocess.run(
        [
            str(plain_venv),
            "-c",
            "import operator, sys; operator.itemgetter; print(operator.__file__); print(operator.itemgetter(0)([7]))",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    path, value = result.stdout.split()
    assert not Path(path).resolve().is_relative_to(REPO_ROOT) and "python3" in path
    assert value == "7"


def test_pip_runs_from_the_repo_root_in_a_plain_venv(plain_venv: Path) -> None:
    # `python -m pip` puts the current directory first on sys.path: an `operator` package there
    # broke pip's own imports (`cannot import name 'eq' from 'operator'`).
    result = subprocess.run(
        [str(plain_venv), "-m", "pip", "--version"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pip ")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
            "import_module",
            "__import__",
        }:
            names.update(
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
    return names


ROUTER_FILES = sorted((REPO_ROOT / "router_service").rglob("*.py"))


@pytest.mark.parametrize("path", ROUTER_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_router_never_imports_the_operator(path: Path) -> None:
    bad = {name for name in imported_modules(path) if name.split(".")[0] in {"tollway_operator", "operator"}}
    assert bad == set(), (
        f"{path.relative_to(REPO_ROOT)} imports {bad}: the router must not depend on the operator"
    )


def test_the_import_scan_sees_imports() -> None:
    """The scan above must be able to fail."""
    sample = REPO_ROOT / "operator" / "tollway_operator" / "crdgen.py"
    assert "tollway_operator.api" in imported_modules(sample)
    assert ROUTER_FILES, "no router files found"
