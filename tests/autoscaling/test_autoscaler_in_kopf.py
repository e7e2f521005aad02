"""The autoscaler under kopf end to end: kopf + the Kubernetes emulator + a real Prometheus.

kopf runs `tollway_operator.autoscaler` alone (the operator's own handlers are tested elsewhere),
against tests/kube_emulator.py. The test creates the Deployment that the operator would create,
loads a simulator that Prometheus scrapes, and checks that the pool's autoscaler task patches the
Deployment through the Kubernetes API, writes `status.autoscaling` through the status subresource,
posts Events, reports a stopped Prometheus in the status, stops when autoscaling is turned off,
and never puts a finalizer on the pool (which would strand it when the operator is gone).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ClosedLoopLoad, Job, LocalPrometheus, host_port
from kopf.testing import KopfRunner

from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import SimulatorServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kube_emulator import EmulatorThread

pytestmark = pytest.mark.timeout(120)

NS = "team-a"


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    import kubernetes

    with EmulatorThread() as k:
        path = str(k.write_kubeconfig(tmp_path / "kubeconfig"))
        monkeypatch.setenv("KUBECONFIG", path)
        # `kubernetes` reads the default path at import; kopf's login goes through that default.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
        yield k


def eventually(read: Callable[[], Any], check: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = read()
        if check(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value}")


def test_autoscaler_scales_the_deployment_and_reports_status(kube: EmulatorThread) -> None:
    import kubernetes

    api = kubernetes.config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
    core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": NS}})
    labels = {"tollway.io/pool": "pool", "tollway.io/model": "m"}
    apps.create_namespaced_deployment(
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "pool-m", "namespace": NS, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
                },
            },
        },
    )

    def replicas() -> int:
        return apps.read_namespaced_deployment("pool-m", NS).spec.replicas

    def pool() -> dict[str, Any]:
        return custom.get_namespaced_custom_object("tollway.io", "v1alpha1", NS, "modelpools", "pool")

    def pool_status() -> dict[str, Any]:
        return (pool().get("status") or {}).get("autoscaling") or {}

    def reasons() -> list[str]:
        return [e.reason for e in core.list_namespaced_event(NS).items]

    profile = SimulatorProfile(
        model="m", max_num_seqs=2, decode_tokens_per_second=20.0, metrics_format="negotiate"
    )
    with (
        SimulatorServer(profile) as sim,
        LocalPrometheus([Job("vllm", relabel=True, targets=[host_port(sim.url)])]) as prom,
    ):
        prom.wait_for("vllm:num_requests_waiting", bool)
        custom.create_namespaced_custom_object(
            "tollway.io",
            "v1alpha1",
            NS,
            "modelpools",
            {
                "apiVersion": "tollway.io/v1alpha1",
                "kind": "ModelPool",
                "metadata": {"name": "pool", "namespace": NS},
                "spec": {
                    "models": [{"name": "m", "model": "org/m", "replicas": {"min": 1, "max": 3}}],
                    "autoscaling": {
                        "prometheusUrl": prom.url,
                        "target": 2,
                        "intervalSeconds": 1,
                        "scaleDownStabilizationSeconds": 60,
                    },
                },
            },
        )
        load = ClosedLoopLoad(lambda: [sim.url], "m", concurrency=8)  # ~6 waiting: asks for 3
        loader = threading.Thread(target=lambda: asyncio.run(load.run(duration=40.0)), daemon=True)
        args = ["run", "-A", "--standalone", "-m", "tollway_operator.autoscaler"]
        with KopfRunner(args, timeout=60) as runner:
            try:
                status = eventually(pool_status, lambda s: s.get("healthy") is True, 30, "a healthy status")
                assert status["models"]["m"]["toReplicas"] == 1
                assert not pool()["metadata"].get("finalizers"), pool()["metadata"]["finalizers"]
                loader.start()
                eventually(replicas, lambda n: n == 3, 30, "the Deployment scaled to 3")
                status = eventually(
                    pool_status, lambda s: s["models"]["m"]["toReplicas"] == 3, 15, "status at 3"
                )
                assert status["models"]["m"]["fromReplicas"] in (1, 3) and status["lastEvaluationTime"]
                eventually(reasons, lambda r: "ScaledUp" in r, 15, "a ScaledUp event")
            finally:
                load.stop()
                loader.join(timeout=30) if loader.is_alive() else None
            prom.stop()
            status = eventually(pool_status, lambda s: s.get("healthy") is False, 20, "an unhealthy status")
            assert status["reason"] == "PrometheusUnavailable" and prom.url in status["message"]
            assert replicas() == 3  # held
            eventually(reasons, lambda r: "PrometheusUnavailable" in r, 15, "a warning event")
            # Autoscaling turned off: the pool's autoscaler stops evaluating.
            custom.patch_namespaced_custom_object(
                "tollway.io",
                "v1alpha1",
                NS,
                "modelpools",
                "pool",
                {"spec": {"autoscaling": {"enabled": False}}},
            )
            time.sleep(2.5)  # an evaluation in flight may still finish
            last = pool_status()["lastEvaluationTime"]
            time.sleep(3)  # three intervals
            assert pool_status()["lastEvaluationTime"] == last
            assert not pool()["metadata"].get("finalizers")
    assert runner.exception is None, runner.exception
    assert runner.exit_code == 0
