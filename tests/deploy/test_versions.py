"""One version: pyproject.toml's `version`. Everything that names the tollway release follows it, so a
version bump that misses one fails here, naming the file to change."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from crd_validation import REPO_ROOT

from tollway_operator import api

PYPROJECT = REPO_ROOT / "pyproject.toml"
CHART_YAML = REPO_ROOT / "charts" / "tollway" / "Chart.yaml"
INSTALL = REPO_ROOT / "manifests" / "install"
CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml")) + sorted(
    (REPO_ROOT / "charts" / "tollway" / "crds").glob("*.yaml")
)
TOLLWAY_IMAGE = re.compile(re.escape(api.IMAGE_REPOSITORY) + r":([^\s\"']+)")


def package_version() -> str:
    return tomllib.loads(PYPROJECT.read_text())["project"]["version"]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_the_installed_package_is_pyprojects_version() -> None:
    """The operator reads its version from the installed package's metadata."""
    installed = importlib.metadata.version("tollway")
    assert installed == package_version(), (
        f"the installed tollway is {installed}, pyproject.toml says {package_version()}: re-run .ci/setup"
    )


def test_operator_default_image_is_tagged_with_the_package_version() -> None:
    version = package_version()
    image = api.DEFAULT_TOLLWAY_IMAGE
    assert image == f"{api.IMAGE_REPOSITORY}:{version}", (
        f"operator/tollway_operator/api.py: DEFAULT_TOLLWAY_IMAGE is {image}, pyproject.toml's version is {version}"
    )


@pytest.mark.parametrize("field", ["version", "appVersion"])
def test_chart_version_is_the_package_version(field: str) -> None:
    chart = yaml.safe_load(CHART_YAML.read_text())
    assert str(chart[field]) == package_version(), (
        f"{rel(CHART_YAML)}: {field} is {chart[field]}, pyproject.toml's version is {package_version()}"
    )


def test_install_manifests_run_the_package_version() -> None:
    """manifests/install is the chart rendered with image.tag "" (the appVersion): its image and
    version labels name the package version (re-render with .ci/render-install-manifests)."""
    found = []
    for path in sorted(INSTALL.glob("*.yaml")):
        text = path.read_text()
        found += [(rel(path), "image", tag) for tag in TOLLWAY_IMAGE.findall(text)]
        found += [
            (rel(path), "app.kubernetes.io/version", v)
            for v in re.findall(r"app\.kubernetes\.io/version: \"?([^\s\"]+)", text)
        ]
    assert any(what == "image" for _, what, _ in found), "manifests/install runs no tollway image"
    wrong = [f"{path}: {what} {value}" for path, what, value in found if value != package_version()]
    assert wrong == [], f"not pyproject.toml's version {package_version()}: {wrong}"


def test_crds_bake_in_no_tollway_image_version() -> None:
    """The API server stores a schema default in every object it creates, so a versioned image as a
    CRD default would pin old objects to old routers; `router.image` unset means the operator's."""
    pinned = [f"{rel(path)}: {tag}" for path in CRD_FILES for tag in TOLLWAY_IMAGE.findall(path.read_text())]
    assert pinned == []


def test_the_chart_names_the_default_tollway_image() -> None:
    """TOLLWAY_IMAGE (the chart sets it to the operator's own image) is the default of routers,
    simulators and calibration Jobs whose spec names none."""
    code = "from tollway_operator import api;print(api.DEFAULT_TOLLWAY_IMAGE)"
    env = {**os.environ, "TOLLWAY_IMAGE": "mirror.example/ml/tollway:0.1.0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "mirror.example/ml/tollway:0.1.0"
