"""Paths and small helpers shared by the operator tests."""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "manifests" / "examples"
CRDS = REPO_ROOT / "crds"
GROUP, VERSION = "tollway.io", "v1alpha1"


def example(name: str, namespace: str | None = None) -> dict[str, Any]:
    """An example manifest (modelpool / routingpolicy), optionally moved to another namespace."""
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    doc = copy.deepcopy(doc)
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c.get("type") == type_:
            return dict(c)
    return {}


T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # e.g. 404 while an object is being created
            last_error = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )
