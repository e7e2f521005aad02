"""Shared by the image tests: the build script loaded as a module, and the image folder."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

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
