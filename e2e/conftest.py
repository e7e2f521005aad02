"""Fixtures for the end-to-end lifecycle suite: a cluster, kubectl, the CRDs, the operator.

The cluster is the Kubernetes emulator (tests/kube_emulator.py, started as a process) unless
`TOLLWAY_E2E_KUBECONFIG` names a kubeconfig: then that cluster is used, as is. (`KUBECONFIG`
alone is deliberately not enough: running the test suite must never touch a cluster by accident.)

The operator runs out-of-cluster as `tollway operator --namespace <ns>` unless
`TOLLWAY_E2E_OPERATOR=in-cluster` says one is already running in the cluster (and watches the
test namespace). See e2e/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_lib import REPO_ROOT, Cluster, free_port, kubectl_path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kubectl_bin = kubectl_path()
    given = os.environ.get("TOLLWAY_E2E_KUBECONFIG")
    timeout = float(os.environ.get("TOLLWAY_E2E_TIMEOUT", "0") or 0)
    if given:
        kubeconfig = Path(given).expanduser()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        yield Cluster(kubeconfig, emulated=False, kubectl_bin=kubectl_bin, timeout=timeout or 180, env=env)
        return
    kubeconfig = tmp_path_factory.mktemp("e2e") / "kubeconfig"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "kube_emulator.py"),
            "--port",
            "0",
            "--kubeconfig",
            str(kubeconfig),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "READY <url>" once serving (bounded by the process starting)
        if not line.startswith("READY"):
            raise AssertionError(f"the Kubernetes emulator did not start: {line!r}")
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        yield Cluster(kubeconfig, emulated=True, kubectl_bin=kubectl_bin, timeout=timeout or 20, env=env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """`kubectl apply -f crds/` (on the emulator they are also preregistered for discovery)."""
    out = cluster.kubectl("apply", "--validate=false", "-f", str(REPO_ROOT / "crds")).stdout
    assert "modelpools.tollway.io" in out and "routingpolicies.tollway.io" in out
    if not cluster.emulated:
        for crd in ("modelpools.tollway.io", "routingpolicies.tollway.io"):
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@pytest.fixture(scope="session")
def namespace(cluster: Cluster, crds: None) -> Iterator[str]:
    """A fresh namespace, deleted with everything in it at the end."""
    name = f"tollway-e2e-{uuid.uuid4().hex[:6]}"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])
    cluster.namespace = name
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(cluster: Cluster, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The operator, out-of-cluster (`tollway operator --namespace <ns>`), unless in-cluster."""
    if os.environ.get("TOLLWAY_E2E_OPERATOR") == "in-cluster":
        yield "in-cluster"
        return
    liveness, metrics = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    argv = [
        sys.executable, "-m", "tollway_operator.cli", "operator",
        "--namespace", namespace, "--standalone",
        "--liveness", f"http://127.0.0.1:{liveness}/healthz",
        "--metrics-port", str(metrics),
        "--resync-seconds", "3", "--retry-seconds", "2",
    ]  # fmt: skip
    env = dict(
        cluster.env, TOLLWAY_OPERATOR_METRICS_HOST="127.0.0.1", TOLLWAY_OPERATOR_DEBOUNCE_SECONDS="0.1"
    )
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the operator exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the operator's liveness probe never answered:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        yield f"http://127.0.0.1:{metrics}/metrics"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
