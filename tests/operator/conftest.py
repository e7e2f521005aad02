"""Fixtures for the operator's integration tests: the Kubernetes emulator and the real operator.

The emulator (tests/kube_emulator.py: kmock's KubernetesEmulator with the fixes kopf and kubectl
need, plus FakeControllers for garbage collection and Deployment status) runs in its own thread
and loop; the operator runs under `kopf.testing.KopfRunner` in another thread, loading the same
handler module `tollway operator` loads. Both live for the whole session; each test works in its
own namespace. Timers and retries are shortened through the environment the handlers read at
import time (set here, before anything imports them).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOLLWAY_OPERATOR_RESYNC_SECONDS", "2")
os.environ.setdefault("TOLLWAY_OPERATOR_RETRY_SECONDS", "1")
os.environ.setdefault("TOLLWAY_OPERATOR_DEBOUNCE_SECONDS", "0.05")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for kube_emulator

from kube_emulator import EmulatorThread
from operator_testlib import free_port


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request otherwise
    with EmulatorThread() as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        kube.kubeconfig = kubeconfig  # type: ignore[attr-defined]
        try:
            yield kube
        finally:
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="session")
def api(cluster: EmulatorThread) -> Any:
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[attr-defined]
    yield client
    client.close()


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def operator(cluster: EmulatorThread, metrics_port: int) -> Iterator[Any]:
    """The real operator (kopf run) against the emulator, for the whole session."""
    from kopf.testing import KopfRunner

    os.environ["TOLLWAY_OPERATOR_METRICS_PORT"] = str(metrics_port)
    os.environ["TOLLWAY_OPERATOR_METRICS_HOST"] = "127.0.0.1"
    argv = ["run", "--all-namespaces", "--standalone", "-m", "tollway_operator.handlers"]
    with KopfRunner(argv, timeout=60) as runner:
        yield runner
    os.environ.pop("TOLLWAY_OPERATOR_METRICS_PORT", None)
    assert runner.exception is None, runner.output[-5000:]
    assert runner.exit_code == 0, runner.output[-5000:]


_counter = iter(range(1, 10_000))


@pytest.fixture()
def namespace(api: Any, operator: Any) -> Iterator[str]:
    """A fresh namespace per test (created like a user would), deleted afterwards with everything
    in it (the emulated namespace controller), so the operator's load stays flat across tests."""
    import kubernetes

    core = kubernetes.client.CoreV1Api(api)
    name = f"t{next(_counter)}-{os.getpid() % 1000}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
