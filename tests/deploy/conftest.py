"""Fixtures for the install tests: rendered chart manifests and a Kubernetes API for kubectl's discovery."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import kmock
import pytest
import pytest_asyncio
import yaml
from kubectl_api import DiscoveryEmulator, KubeAPI


@pytest_asyncio.fixture
async def kube_api(tmp_path: Path, tool: Callable[[str], str]) -> AsyncIterator[KubeAPI]:
    """A discovery-capable Kubernetes API on 127.0.0.1 (kmock), with a kubeconfig for kubectl."""
    kubectl = tool("kubectl")
    async with DiscoveryEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
        emulator.resources.load_bundled()
        url = str(server.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                    "users": [{"name": "emulator", "user": {"token": "emulator"}}],
                    "contexts": [
                        {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}
                    ],
                    "current-context": "emulator",
                }
            )
        )
        yield KubeAPI(url=url, kubeconfig=kubeconfig, emulator=emulator, kubectl_path=kubectl)


@pytest.fixture(scope="session")
def helm_template(tool: Callable[[str], str], repo_root: Path) -> Callable[..., str]:
    """`helm_template("--set", "x=y")` -> the chart rendered as release `tollway` in `tollway-system`."""
    helm = tool("helm")
    cache: dict[tuple[str, ...], str] = {}

    def render(*args: str) -> str:
        if args in cache:
            return cache[args]
        result = subprocess.run(
            [
                helm,
                "template",
                "tollway",
                str(repo_root / "charts" / "tollway"),
                "--namespace",
                "tollway-system",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
        cache[args] = result.stdout
        return result.stdout

    return render
