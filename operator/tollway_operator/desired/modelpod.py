"""The pod template of one model replica: vLLM on GPUs, or `tollway simulate` in its place.

vLLM (`vllm/vllm-openai`):
- command `python3 -m vllm.entrypoints.openai.api_server` with the model's flags, port 8000;
- resources by size (`sizing.vllm_resources`): GPUs, CPU and memory requests, /dev/shm counted;
- the weights cache mounted at /models (`HF_HOME`, `--download-dir`, vLLM's compile cache);
- probes on /health: a startup budget by size, readiness with a 5 s timeout;
- a preStop hook that drains (see `drain_command`) and a grace period that covers it;
- the pool's scheduling defaults, each replaced by the model's own field when set;
- `$VLLM_API_KEY` from the pool's (or model's) `apiKeySecret`: vLLM then requires it on /v1;
- non-root when `runAsUser` is set: vLLM's images run as root (their Dockerfile has no USER;
  newer ones ship a `vllm` user, UID 2000, GID 0, for `--user 2000:0`), and vLLM writes caches
  under $HOME, so a non-root UID gets group 0, an emptyDir HOME and `USER=vllm`, as vLLM's own
  non-root entrypoint arranges.

Simulator (`simulate`): the tollway image runs `tollway simulate` with the model's speed and
capacity (`sizing.simulated_profile`) on the same port, with vLLM's API and metric names, as UID
65532 with a read-only root filesystem, no GPU, no cache, no GPU scheduling settings.

Grace arithmetic. vLLM cancels its in-flight requests on SIGTERM (its launcher cancels the server
task), so the waiting happens before: the preStop hook sleeps while the endpoints drop the pod
(`ENDPOINT_PROPAGATION_SECONDS`, routers stop sending it new work), then polls vLLM's own
`vllm:num_requests_running` + `vllm:num_requests_waiting` until they are 0, at most the router's
upstream timeout (no request the router sent can take longer). The grace period covers both plus
time to exit: 10 + 120 + 10 = 140 s.
"""

from __future__ import annotations

import json
import math
from typing import Any

from router_service.config import ServerConfig
from tollway_operator.api import DEFAULT_ROUTER_IMAGE, ModelPoolSpec, ModelSpec
from tollway_operator.desired.names import VLLM_PORT
from tollway_operator.desired.sizing import (
    cache_size,
    shm_gib,
    simulated_profile,
    startup_budget_seconds,
    vllm_resources,
)

MODEL_CACHE_DIR = "/models"
NONROOT_HOME = "/home/vllm"
NONROOT_GROUP = 0
"""vLLM's non-root convention: any UID in group 0, with group-writable caches."""
SIMULATOR_UID = 65532
SIMULATOR_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
SIMULATOR_STARTUP_SECONDS = 120

ROUTER_UPSTREAM_TIMEOUT_SECONDS = int(ServerConfig.model_fields["upstream_timeout_seconds"].default)
"""The longest a router waits for one upstream call (`server.upstreamTimeoutSeconds`)."""
ENDPOINT_PROPAGATION_SECONDS = 10
SHUTDOWN_MARGIN_SECONDS = 10
MODEL_GRACE_SECONDS = ENDPOINT_PROPAGATION_SECONDS + ROUTER_UPSTREAM_TIMEOUT_SECONDS + SHUTDOWN_MARGIN_SECONDS

DRAIN_SCRIPT = """\
import sys, time, urllib.request
settle, limit, port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
time.sleep(settle)
deadline = time.monotonic() + limit
names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
while time.monotonic() < deadline:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except Exception:
        break
    busy = sum(float(line.rsplit(None, 1)[-1]) for line in text.splitlines()
               if line.split("{", 1)[0].split(" ", 1)[0] in names)
    if busy <= 0:
        break
    time.sleep(1)
"""
"""Run by the preStop hook: sleep `settle` s, then wait until the server has no request running
or waiting (or `limit` s passed, or /metrics stops answering). Standard library only: it runs
with the image's python3 (vLLM's and tollway's images both have one)."""


def drain_command(
    settle: float = ENDPOINT_PROPAGATION_SECONDS,
    limit: float = ROUTER_UPSTREAM_TIMEOUT_SECONDS,
    port: int = VLLM_PORT,
) -> list[str]:
    return ["python3", "-c", DRAIN_SCRIPT, f"{settle:g}", f"{limit:g}", str(port)]


def _probes(startup_seconds: int) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    return {
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": math.ceil(startup_seconds / 10)},
        # vLLM answers /health from the same event loop that streams tokens: under load it can
        # take seconds, and the kubelet's default timeout (1 s) would flap the endpoint.
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
    }


def _api_key_env(spec: ModelPoolSpec, model: ModelSpec) -> list[dict[str, Any]]:
    ref = spec.api_key_secret_for(model)
    if ref is None:
        return []
    return [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _user_env(model: ModelSpec, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`env` with the model's own variables added; the user's value wins, once."""
    user = [e.to_wire() for e in model.env]
    names = {e["name"] for e in user}
    return [e for e in env if e["name"] not in names] + user


def vllm_args(model: ModelSpec) -> list[str]:
    args = [
        "--model", str(model.model),
        "--served-model-name", model.name,
        "--tensor-parallel-size", str(model.gpus),
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
        "--download-dir", f"{MODEL_CACHE_DIR}/weights",
    ]  # fmt: skip
    if model.max_model_len is not None:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{model.gpu_memory_utilization:g}"]
    return args + list(model.extra_args)


def vllm_container(spec: ModelPoolSpec, model: ModelSpec) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{MODEL_CACHE_DIR}/huggingface"},
        # torch.compile artifacts next to the weights: a restarted replica skips recompiling.
        {"name": "VLLM_CACHE_ROOT", "value": f"{MODEL_CACHE_DIR}/vllm"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if model.hf_token_secret is not None:
        ref = {"secretKeyRef": {"name": model.hf_token_secret.name, "key": model.hf_token_secret.key}}
        env += [{"name": "HF_TOKEN", "valueFrom": ref}, {"name": "HUGGING_FACE_HUB_TOKEN", "valueFrom": ref}]
    env += _api_key_env(spec, model)
    security: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    container: dict[str, Any] = {
        "name": "vllm",
        "image": model.image or spec.image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(model),
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
    }
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model-cache", "mountPath": MODEL_CACHE_DIR},
    ]
    uid = spec.run_as_user_for(model)
    if uid is not None:
        env += [{"name": "HOME", "value": NONROOT_HOME}, {"name": "USER", "value": "vllm"}]
        security |= {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": NONROOT_GROUP}
        mounts.append({"name": "home", "mountPath": NONROOT_HOME})
        container["workingDir"] = NONROOT_HOME
    container |= {
        "env": _user_env(model, env),
        "resources": vllm_resources(model),
        "volumeMounts": mounts,
        **_probes(startup_budget_seconds(model)),
        "lifecycle": {"preStop": {"exec": {"command": drain_command()}}},
        "securityContext": security,
    }
    return container


def simulator_args(model: ModelSpec, seed: int) -> list[str]:
    return [
        "tollway", "simulate",
        "--model", model.name,
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
        *simulated_profile(model).args(),
        "--seed", str(seed),
        "--log-level", "warning",
    ]  # fmt: skip


def simulator_container(spec: ModelPoolSpec, model: ModelSpec, seed: int) -> dict[str, Any]:
    return {
        "name": "simulator",
        "image": spec.simulate.image or DEFAULT_ROUTER_IMAGE,
        "command": simulator_args(model, seed),
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}, *_api_key_env(spec, model)],
        "resources": json_copy(SIMULATOR_RESOURCES),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        **_probes(SIMULATOR_STARTUP_SECONDS),
        "lifecycle": {"preStop": {"exec": {"command": drain_command()}}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIMULATOR_UID,
            "runAsGroup": SIMULATOR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def json_copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _scheduling(spec: ModelPoolSpec, model: ModelSpec) -> dict[str, Any]:
    chosen = spec.scheduling_for(model)
    out: dict[str, Any] = {}
    if chosen.node_selector:
        out["nodeSelector"] = dict(chosen.node_selector)
    if chosen.tolerations:
        out["tolerations"] = json_copy(chosen.tolerations)
    if chosen.affinity:
        out["affinity"] = json_copy(chosen.affinity)
    if chosen.priority_class_name:
        out["priorityClassName"] = chosen.priority_class_name
    return out


def model_pod_spec(
    spec: ModelPoolSpec,
    model: ModelSpec,
    *,
    simulate: bool,
    cache_volume: dict[str, Any] | None,
    seed: int = 0,
) -> dict[str, Any]:
    """The pod spec of one replica. `cache_volume`: the `model-cache` volume (None when the cache
    is a per-replica claim from the StatefulSet's volumeClaimTemplates); `seed`: the simulator's
    (the model's index, so simulated models answer differently)."""
    if simulate:
        return {
            "containers": [simulator_container(spec, model, seed)],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": MODEL_GRACE_SECONDS,
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
        }
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(model.gpus)}Gi"}},
    ]
    if cache_volume is not None:
        volumes.append(cache_volume)
    security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if spec.run_as_user_for(model) is not None:
        volumes.append({"name": "home", "emptyDir": {}})
        # Group 0 owns the cache volume, so any UID in it can write there; only the top directory
        # is checked, not every file of a 150 GB cache on each mount.
        security |= {"fsGroup": NONROOT_GROUP, "fsGroupChangePolicy": "OnRootMismatch"}
    return {
        "containers": [vllm_container(spec, model)],
        "volumes": volumes,
        "securityContext": security,
        "terminationGracePeriodSeconds": MODEL_GRACE_SECONDS,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        **_scheduling(spec, model),
    }


def cache_volume_source(model: ModelSpec, claim: str | None) -> dict[str, Any]:
    """The `model-cache` volume: an emptyDir bounded by the cache size, or the shared claim."""
    if claim is None:
        return {"name": "model-cache", "emptyDir": {"sizeLimit": cache_size(model)}}
    return {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}}
