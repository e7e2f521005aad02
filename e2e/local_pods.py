"""Run a container the operator rendered as a local process, exactly as rendered.

The local control plane's nodes are fake (kwok): they run no containers. To show that the pods the
operator renders work, the e2e suite takes a Deployment from the cluster and starts its container's
command line here, with its environment and its volumes, changing only what a node would provide
differently:

- listen addresses and ports: `--host 0.0.0.0` becomes 127.0.0.1, `--port N` a free port;
- mounted paths: every volumeMount's path becomes a directory of its own under a temporary root,
  in the command line, the environment and the files of ConfigMap volumes alike; the volumes'
  content is what the kubelet would put there (ConfigMap and Secret items, empty emptyDirs);
- the image's entrypoint `tollway` is this checkout's `tollway` (the image's one program);
- `Service` URLs in mounted files are remapped by the caller (`rewrite`), as a cluster's DNS would
  resolve them.

Environment variables come from `value` (paths remapped), `secretKeyRef` / `configMapKeyRef`
(read from the cluster) and `fieldRef: metadata.name`.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_lib import Cluster, free_port, stop_process, wait_until_ready

TOLLWAY = Path(sys.executable).parent / "tollway"


@dataclass
class LocalContainer:
    """One container of a rendered pod, turned into a local command."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    root: Path
    mounts: dict[str, Path] = field(default_factory=dict)


def _remap_text(text: str, mounts: Mapping[str, Path]) -> str:
    """Every path under a mount point -> the same path under the mount's local directory, in one
    pass (a local directory is never remapped again), longest mount first."""
    if not mounts:
        return text
    targets = {m.rstrip("/") or "/": str(local) for m, local in mounts.items()}
    alternation = "|".join(re.escape(m) for m in sorted(targets, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternation})(?=/|$|[^\w.-])")
    return pattern.sub(lambda match: targets[match.group(1)], text)


def _secret_data(cl: Cluster, name: str) -> dict[str, bytes]:
    """A Secret's keys and values (`stringData` too: the emulator keeps it as written)."""
    secret = cl.get("secret", name)
    assert secret is not None, f"Secret {name} not found"
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    return data | {k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()}


def _secret_value(cl: Cluster, name: str, key: str) -> str:
    return _secret_data(cl, name)[key].decode()


def _config_map_value(cl: Cluster, name: str, key: str) -> str:
    cm = cl.get("configmap", name)
    assert cm is not None, f"ConfigMap {name} not found"
    return str(cm["data"][key])


def _fill_volume(cl: Cluster, volume: Mapping[str, Any], target: Path, rewrite: Callable[[str], str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if "configMap" in volume:
        source = volume["configMap"]
        cm = cl.get("configmap", source["name"])
        assert cm is not None, f"ConfigMap {source['name']} not found"
        items = source.get("items") or [{"key": k, "path": k} for k in cm.get("data", {})]
        for item in items:
            (target / item["path"]).write_text(rewrite(str(cm["data"][item["key"]])))
    elif "secret" in volume:
        source = volume["secret"]
        data = _secret_data(cl, source["secretName"])
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (target / item["path"]).write_bytes(data[item["key"]])
    elif "emptyDir" not in volume:
        raise AssertionError(f"volume {volume['name']}: only configMap, secret and emptyDir run locally")


def local_container(
    cl: Cluster,
    pod_template: Mapping[str, Any],
    root: Path,
    rewrite: Callable[[str], str] = lambda text: text,
    pod_name: str = "local-0",
) -> LocalContainer:
    """The first container of `pod_template` (a workload's `spec.template`) as a local command
    under `root`. `rewrite` is applied to mounted ConfigMap files after the path remapping (e.g.
    Service URLs -> local ports)."""
    spec = pod_template["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        local = root / "mounts" / mount["name"]
        mounts[mount["mountPath"]] = local
    for mount in container.get("volumeMounts") or []:
        _fill_volume(
            cl,
            volumes[mount["name"]],
            mounts[mount["mountPath"]],
            lambda text: rewrite(_remap_text(text, mounts)),
        )
    command = list(container.get("command") or []) + list(container.get("args") or [])
    assert command and command[0] == "tollway", f"not the tollway image's program: {command[:3]}"
    port = free_port()
    argv = [str(TOLLWAY)]
    rest = command[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--host" and i + 1 < len(rest):
            argv += ["--host", "127.0.0.1"]
            i += 2
            continue
        if arg == "--port" and i + 1 < len(rest):
            argv += ["--port", str(port)]
            i += 2
            continue
        argv.append(_remap_text(arg, mounts))
        i += 1
    env = {"PATH": os.environ.get("PATH", "")}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = _remap_text(str(var["value"]), mounts)
            continue
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = _secret_value(cl, ref["name"], ref.get("key", ""))
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = _config_map_value(cl, ref["name"], ref["key"])
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
        else:
            raise AssertionError(f"env {var['name']}: {source} cannot be resolved locally")
    return LocalContainer(container["name"], argv, env, port, root, mounts)


@dataclass
class LocalProcess:
    container: LocalContainer
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.container.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc)


def start(container: LocalContainer, ready_path: str, timeout: float = 90) -> LocalProcess:
    """Start the command and wait until `ready_path` answers 200 (the pod's readiness probe)."""
    log = container.root / f"{container.name}.log"
    container.root.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(container.argv, env=container.env, stdout=out, stderr=subprocess.STDOUT)
    handle = LocalProcess(container, proc, log)
    try:
        wait_until_ready(proc, str(container.argv[:3]), handle.url + ready_path, timeout, handle.log_tail)
    except AssertionError:
        handle.stop()
        raise
    return handle
