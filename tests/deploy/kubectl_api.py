"""A Kubernetes API that kubectl can talk to: kmock's emulator with discovery fixed for core kinds."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import yaml
from crd_validation import CRD_DIR


class DiscoveryEmulator(kmock.KubernetesEmulator):
    """kmock 0.8's emulator with the core group's discovery fixed, so kubectl can map core kinds.

    kmock answers `/api/v1` with `groupVersion: "/v1"`, which kubectl cannot parse, so it reports
    "no matches for kind ServiceAccount in version v1". The real API server says `"v1"`.
    """

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _serve_server_version(self, request: Any) -> Any:
        """Report the Kubernetes version the manifests are validated against (kmock says 1.26)."""
        return {
            **await super()._serve_server_version(request),
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0",
        }

    def register_crds(self, directory: Path = CRD_DIR) -> None:
        """What the API server does once a CRD is created: serve (and advertise) its resource."""
        for path in sorted(directory.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            spec, names = crd["spec"], crd["spec"]["names"]
            for version in spec["versions"]:
                self.resources[kmock.resource(spec["group"], version["name"], names["plural"])] = (
                    kmock.ResourceInfo(
                        namespaced=spec["scope"] == "Namespaced",
                        kind=names["kind"],
                        singular=names["singular"],
                        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                        shortnames=set(names.get("shortNames", [])),
                        categories=set(names.get("categories", [])),
                        subresources=set(version.get("subresources") or {}),
                    )
                )


@dataclass
class KubeAPI:
    url: str
    kubeconfig: Path
    emulator: DiscoveryEmulator
    kubectl_path: str

    async def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return await self.run(self.kubectl_path, *args, timeout=timeout)

    async def run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a client of this API without blocking the event loop that serves the emulator."""
        proc = await asyncio.create_subprocess_exec(
            program,
            *args,
            env={
                **os.environ,
                "KUBECONFIG": str(self.kubeconfig),
                **{
                    f"HELM_{d}_HOME": str(self.kubeconfig.parent / f"helm-{d.lower()}")
                    for d in ("CACHE", "CONFIG", "DATA")
                },
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return subprocess.CompletedProcess([program, *args], proc.returncode or 0, out.decode(), err.decode())
