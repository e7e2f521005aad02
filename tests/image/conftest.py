"""Shared by the image tests: the build script loaded as a module, the image folder, and the image's
size in the test run's summary (one line, so that every CI log says what the image weighs)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

# The build summary (manifests/image/build-rootfs --json) of this run, once the image fixture has it.
IMAGE_SUMMARY = pytest.StashKey[dict]()

IMAGE_DIR = Path(__file__).resolve().parents[2] / "manifests" / "image"
BUILD_SCRIPT = IMAGE_DIR / "build-rootfs"


def load_build_script() -> ModuleType:
    """manifests/image/build-rootfs (no .py suffix) as a module, for its constants and parsers."""
    loader = importlib.machinery.SourceFileLoader("tollway_build_rootfs", str(BUILD_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build_script() -> ModuleType:
    return load_build_script()


@pytest.fixture(scope="session")
def image_dir() -> Path:
    return IMAGE_DIR


@pytest.fixture(scope="session")
def report_image_size(request: pytest.FixtureRequest) -> Callable[[dict], None]:
    """Hand it the build summary: the image's size then ends the run's report."""

    def report(summary: dict) -> None:
        request.config.stash[IMAGE_SUMMARY] = summary

    return report


def size_line(summary: dict, human: Callable[[float], str]) -> str:
    """`image: tollway:0.1.0 293.7 MiB compressed, 797.5 MiB rootfs`"""
    return (
        f"image: tollway:{summary['tag']} {human(summary['compressed_bytes'])} compressed, "
        f"{human(summary['rootfs_bytes'])} rootfs"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    summary = config.stash.get(IMAGE_SUMMARY, None)
    if summary is not None:
        terminalreporter.write_sep("=", "image size")
        terminalreporter.write_line(size_line(summary, load_build_script().human))
