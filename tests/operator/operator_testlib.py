"""Paths and small helpers shared by the operator tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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
