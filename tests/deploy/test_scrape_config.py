"""The chart's example Prometheus scrape jobs, run by a real Prometheus against a real exporter.

Kubernetes service discovery is replaced by static targets that carry the same `__meta_kubernetes_*`
labels (Debian's Prometheus is built without Kubernetes SD), so the shipped relabel rules run as
shipped: they keep only tollway's pods on the right port, label series with namespace/pod/model,
and restore vLLM's `vllm:` metric names that prometheus-client writes as `vllm_` under OpenMetrics.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from crd_validation import REPO_ROOT

SCRAPE_CONFIG = REPO_ROOT / "charts" / "tollway" / "files" / "prometheus-scrape-config.yaml"
VLLM_RELABEL = {
    "source_labels": ["__name__"],
    "regex": "vllm_(.+)",
    "target_label": "__name__",
    "replacement": "vllm:$1",
}


def shipped_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}


def test_shipped_jobs_select_tollway_pods_and_carry_the_vllm_rule() -> None:
    jobs = shipped_jobs()
    assert set(jobs) == {"tollway-vllm", "tollway-router", "tollway-operator"}
    for job in jobs.values():
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert jobs["tollway-vllm"]["metric_relabel_configs"] == [VLLM_RELABEL]


def pod_target(address: str, component: str, port: int, name: str, port_name: str = "http") -> dict[str, Any]:
    """What Kubernetes pod discovery would hand Prometheus for one container port."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": "team-a",
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_container_port_number": str(port),
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "tollway",
            "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
            "__meta_kubernetes_pod_label_tollway_io_model": "small",
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def exporter() -> Iterator[str]:
    """A vLLM-like /metrics endpoint (prometheus-client, as vLLM uses) on 127.0.0.1."""
    registry = prometheus_client.CollectorRegistry()
    gauge = prometheus_client.Gauge(
        "vllm:num_requests_waiting", "Requests waiting.", ["model_name"], registry=registry
    )
    gauge.labels(model_name="small").set(3)
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def prometheus(tool: Callable[[str], str], tmp_path: Path, exporter: str) -> Iterator[str]:
    jobs = shipped_jobs()
    scrape_configs = []
    for name, targets in {
        "tollway-vllm": [
            pod_target(exporter, "model-server", 8000, "chat-small-0"),
            pod_target(exporter, "router", 8000, "wrong-component"),
            pod_target(exporter, "model-server", 9999, "wrong-port"),
        ],
        "tollway-router": [
            pod_target(exporter, "router", 8080, "chat-auto-router-0"),
            pod_target(exporter, "model-server", 8080, "not-a-router"),
        ],
        "tollway-operator": [
            pod_target(exporter, "operator", 8090, "tollway-operator-0", port_name="metrics"),
            pod_target(exporter, "operator", 8080, "operator-liveness-port", port_name="healthz"),
        ],
    }.items():
        job = {k: v for k, v in jobs[name].items() if k != "kubernetes_sd_configs"}
        scrape_configs.append({**job, "scrape_interval": "1s", "static_configs": targets})
    # The same exporter without the rule, to show what the rule repairs.
    scrape_configs.append(
        {"job_name": "no-rule", "scrape_interval": "1s", "static_configs": [{"targets": [exporter]}]}
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs}))
    port = free_port()
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("prometheus did not become ready in 20 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = get_json(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(url: str, promql: str, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(url, promql)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_shipped_jobs_scrape_tollway_pods_with_vllm_names(prometheus: str) -> None:
    (series,) = wait_for(prometheus, 'vllm:num_requests_waiting{job="tollway-vllm"}')
    assert series["value"][1] == "3"
    labels = series["metric"]
    assert (labels["namespace"], labels["pod"], labels["model"], labels["model_name"]) == (
        "team-a",
        "chat-small-0",
        "small",
        "small",
    )
    assert query(prometheus, '{__name__=~"vllm_.+", job="tollway-vllm"}') == []

    # Without the rule the same exporter's series arrive as vllm_*: that is what the rule repairs.
    assert wait_for(prometheus, 'vllm_num_requests_waiting{job="no-rule"}')
    assert query(prometheus, 'vllm:num_requests_waiting{job="no-rule"}') == []

    targets = get_json(f"{prometheus}/api/v1/targets")["data"]
    active: dict[str, list[str]] = {}
    for target in targets["activeTargets"]:
        active.setdefault(target["labels"]["job"], []).append(target["labels"].get("pod", ""))
    assert active["tollway-vllm"] == ["chat-small-0"]
    assert active["tollway-router"] == ["chat-auto-router-0"]
    assert active["tollway-operator"] == ["tollway-operator-0"]
    assert len(targets["droppedTargets"]) == 4
