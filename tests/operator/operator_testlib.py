"""Paths shared by the operator tests."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "manifests" / "examples"
CRDS = REPO_ROOT / "crds"
