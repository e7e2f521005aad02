"""Fixtures for the end-to-end suite: a cluster, kubectl, the CRDs, the chart, the operator.

The cluster is the Kubernetes emulator (tests/kube_emulator.py, started as a process) unless
`TOLLWAY_E2E_KUBECONFIG` names a kubeconfig: then that cluster is used, as is. (`KUBECONFIG`
alone is deliberately not enough: running the test suite must never touch a cluster by accident.)

On a real cluster the chart is `helm install`ed into the test namespace (serving that namespace
only, with no operator replica of its own) and the operator runs out-of-cluster with a token of the
chart's ServiceAccount, so the chart's RBAC is what the API server enforces. On the emulator (no
RBAC) it runs with the emulator's kubeconfig. `TOLLWAY_E2E_OPERATOR=in-cluster` says an operator
already runs in the cluster and watches the test namespace. See e2e/README.md.

`TOLLWAY_E2E_STRICT=1` (set by .ci/test's real-cluster stage) turns every skip into a failure, so
a test that cannot run there never passes silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_lib import (
    DESELECTED,
    E2E_DIR,
    REPO_ROOT,
    Cluster,
    OperatorProcess,
    in_cluster_operator,
    install_chart,
    kubectl_path,
    new_namespace,
    run_operator,
    stop_process,
)

KEDA_CRD = E2E_DIR / "manifests" / "keda-scaledobject-crd.yaml"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "last: run after every other test (checks over what the whole session did)"
    )
    config.stash[DESELECTED] = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: order kept


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.config.stash[DESELECTED] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TOLLWAY_E2E_STRICT") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under TOLLWAY_E2E_STRICT=1, which allows no skip: {reason}"


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
        stop_process(proc, grace=10)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """`kubectl apply --server-side -f crds/`: a real API server compiles every CEL rule here (the
    emulator has no server-side apply: client-side there, and the CRDs are preregistered anyway)."""
    mode = ["--validate=false"] if cluster.emulated else ["--server-side", "--force-conflicts"]
    out = cluster.kubectl("apply", *mode, "-f", str(REPO_ROOT / "crds")).stdout
    assert "modelpools.tollway.io" in out and "routingpolicies.tollway.io" in out
    if not cluster.emulated:
        for crd in ("modelpools.tollway.io", "routingpolicies.tollway.io"):
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


def wait_until_garbage_collected(cluster: Cluster, api_version: str, kind: str, resource: str) -> None:
    """Wait until the garbage collector watches a newly installed kind: it finds new resources by
    discovery every 30 s, and until then neither collects such objects with their owner nor
    orphans them (`--cascade=orphan`); it later deletes them as dangling. Shown by a probe object
    whose owner does not exist: collected once the kind is watched."""
    probe = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": "tollway-e2e-gc-probe",
            "namespace": "default",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "tollway-e2e-gone",
                    "uid": str(uuid.uuid4()),
                }
            ],
        },
    }
    cluster.apply([probe])
    cluster.wait_for(
        lambda: cluster.get(resource, "tollway-e2e-gc-probe", namespace="default") is None,
        f"the garbage collector watching {kind} (it collects a probe whose owner does not exist)",
        timeout=max(cluster.timeout, 90),
    )


@pytest.fixture(scope="session")
def keda_crd(cluster: Cluster) -> Iterator[None]:
    """KEDA's ScaledObject API, as a minimal CRD, unless the cluster has KEDA already (then it is
    left alone). Installed before the operator starts, which looks the API up once."""
    present = cluster.kubectl("get", "crd", "scaledobjects.keda.sh", check=False).returncode == 0
    if not present:
        cluster.kubectl("apply", "--validate=false", "-f", str(KEDA_CRD))
        if not cluster.emulated:
            cluster.kubectl(
                "wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s"
            )
            wait_until_garbage_collected(cluster, "keda.sh/v1alpha1", "ScaledObject", "scaledobject")
    try:
        yield
    finally:
        if not present:
            cluster.kubectl("delete", "-f", str(KEDA_CRD), "--wait=false", check=False)


@pytest.fixture(scope="session")
def namespace(cluster: Cluster, crds: None) -> Iterator[str]:
    """A fresh namespace, deleted with everything in it at the end."""
    name = new_namespace(cluster)
    cluster.namespace = name
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator_kubeconfig(
    cluster: Cluster, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Whose identity the operator runs with: on a real cluster the chart's ServiceAccount (the
    chart installed into the test namespace), on the emulator its only user."""
    if cluster.emulated:
        yield cluster.kubeconfig
        return
    release = namespace  # unique, so that no run's cluster-wide objects collide with another's
    account = install_chart(cluster, release, namespace, "--set", "keda.enabled=true")
    try:
        yield cluster.service_account_kubeconfig(
            namespace, account, tmp_path_factory.mktemp("sa") / "kubeconfig"
        )
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", check=False)


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster,
    namespace: str,
    keda_crd: None,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess | None]:
    """The operator, out-of-cluster, serving the test namespace (None when one runs in-cluster)."""
    if in_cluster_operator():
        yield None
        return
    kubeconfig = request.getfixturevalue("operator_kubeconfig")
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    with run_operator(kubeconfig, namespace, log_path) as handle:
        yield handle
