"""Helpers for the end-to-end suite: kubectl on a cluster, bounded waiting."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def kubectl_path() -> str:
    local = REPO_ROOT / ".tools" / "bin" / "kubectl"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found in .tools/bin or on PATH: run .ci/setup", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    kubeconfig: Path
    emulated: bool
    kubectl_bin: str
    timeout: float
    namespace: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl_bin, *args]
        done = subprocess.run(argv, input=stdin, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def apply(self, docs: list[dict[str, Any]]) -> str:
        stdin = "\n".join(json.dumps(d) for d in docs)
        return self.kubectl("apply", "--validate=false", "-f", "-", stdin=stdin).stdout

    def get(self, kind: str, name: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind] + ([name] if name else []) + ["-n", self.namespace, "-o", "json"]
        done = self.kubectl(*args, check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr or "not found" in done.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name or ''}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def names(self, kind: str) -> set[str]:
        listed = self.get(kind) or {}
        return {item["metadata"]["name"] for item in listed.get("items", [])}

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        deadline = time.monotonic() + (timeout or self.timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
            except (AssertionError, KeyError, TypeError, ValueError) as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout or self.timeout:.0f} s waiting for {what}"
            + (f" (last: {last})" if last else "")
        )
