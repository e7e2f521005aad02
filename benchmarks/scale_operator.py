"""Operator scale: reconcile 100 ModelPools, on the Kubernetes API emulator and on a real control plane.

    .venv/bin/python benchmarks/scale_operator.py                      # both, 100 pools x 3 models
    .venv/bin/python benchmarks/scale_operator.py --pools 20 --on real # smoke run, one target

Targets (`--on emulator|real|both`, default both), each run against a fresh instance:
- emulator: `tests/kube_emulator.py` (kmock plus the fake Deployment controller and garbage
  collector): Deployments report their replicas ready at once;
- real: the local control plane of e2e/cluster (kube-apiserver, controller-manager, scheduler
  1.36, etcd, kwok nodes with GPUs; `e2e/cluster/build` must have built it): Deployments make
  ReplicaSets make Pods, the scheduler places them on GPU nodes, kwok marks them Running/Ready.
`tollway operator --standalone -A` runs as a separate process with the target's admin kubeconfig.
The benchmark creates --pools ModelPools (3 models each, one Deployment and one Service per model)
as fast as the target takes them, then polls until every child exists and every pool reports the
Ready condition True. Reported per target: time to all children, time to all pools Ready,
children per second, the operator's resident memory (idle, end, peak) and the target's own.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from common import (
    RESULTS,
    ROOT,
    TOLLWAY,
    ManagedProcess,
    free_port,
    markdown_table,
    new_figure,
    peak_rss_of,
    rss_of,
    write_report,
)

NAMESPACE = "default"
GROUP = "apis/tollway.io/v1alpha1"
MODELS = [
    ("small", "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/mistral-7b-chat", 1),
    ("medium", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/mixtral-8x7b-chat", 2),
    ("large", "Qwen/Qwen2.5-72B-Instruct", "gpt-4-1106-preview", 4),
]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
LABELS = {"emulator": "emulator", "real": "real control plane"}


def pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tollway.io/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "image": "vllm/vllm-openai:v0.11.0",
            "models": [
                {
                    "name": m,
                    "model": hf,
                    "profile": prof,
                    "gpus": gpus,
                    "replicas": {"min": 1, "max": 2},
                    "cache": {"kind": "emptyDir", "size": "40Gi"},
                    "tolerations": [GPU_TOLERATION],
                    # Small requests: the default ones (by GPU count) would not let 300 pods fit on
                    # the fake nodes' CPUs; what is measured is the control plane, not packing.
                    "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}},
                }
                for m, hf, prof, gpus in MODELS
            ],
            # The model workloads only: calibration Jobs (one per model once it is ready) would add
            # 300 more pods, whose fake runs never end, to what is measured.
            "calibration": {"enabled": False},
        },
    }


@dataclass
class Target:
    """A Kubernetes API to run the operator against, and how to reach and stop it."""

    name: str
    kubeconfig: Path
    client: httpx.Client
    server_pids: dict[str, int]
    stop: Callable[[], None]
    notes: list[str] = field(default_factory=list)


def start_emulator(log_dir: Path) -> Target:
    kubeconfig = log_dir / "kubeconfig"
    port = free_port()
    args = [sys.executable, ROOT / "tests" / "kube_emulator.py", "--port", port, "--kubeconfig", kubeconfig]
    proc = ManagedProcess("kube-emulator", args, log_dir=log_dir).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/version", timeout=60, ok=range(200, 500))
    deadline = time.monotonic() + 30
    while not kubeconfig.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    client = httpx.Client(base_url=url, timeout=30)

    def stop() -> None:
        client.close()
        proc.stop()

    return Target("emulator", kubeconfig, client, {"emulator": proc.pid}, stop)


def tls_client(kubeconfig: Path, cert_dir: Path) -> httpx.Client:
    """An httpx client for the cluster in an admin kubeconfig with embedded certificates."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    files = {}
    for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
        path = cert_dir / key
        path.write_bytes(b64decode(cluster.get(key) or user[key]))
        files[key] = str(path)
    context = ssl.create_default_context(cafile=files["certificate-authority-data"])
    context.load_cert_chain(files["client-certificate-data"], files["client-key-data"])
    return httpx.Client(base_url=cluster["server"], verify=context, timeout=30)


def start_control_plane(log_dir: Path, gpu_nodes: int, gpus_per_node: int) -> Target:
    """e2e/cluster/up with its own state dir, enough GPU nodes for every model pod."""
    state = log_dir / "cluster"
    env = dict(os.environ, TOLLWAY_CLUSTER_DIR=str(state))
    kubeconfig = log_dir / "admin.kubeconfig"
    up = [str(ROOT / "e2e" / "cluster" / "up"), "--kubeconfig", str(kubeconfig)]
    up += ["--gpu-nodes", str(gpu_nodes), "--gpus-per-node", str(gpus_per_node), "--cpu-nodes", "1"]
    done = subprocess.run(up, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"e2e/cluster/up failed:\n{done.stderr[-3000:]}")

    def stop() -> None:
        client.close()
        subprocess.run([str(ROOT / "e2e" / "cluster" / "down")], env=env, capture_output=True, timeout=120)

    client = tls_client(kubeconfig, log_dir)
    subprocess.run(
        [ROOT / ".tools" / "bin" / "kubectl", "apply", "--server-side", "-f", ROOT / "crds"],
        env=dict(env, KUBECONFIG=str(kubeconfig)),
        check=True,
        capture_output=True,
        timeout=60,
    )
    pids = json.loads((state / "cluster.json").read_text())["pids"]
    note = (
        f"{gpu_nodes} kwok GPU nodes x {gpus_per_node} nvidia.com/gpu (tainted) and 1 CPU node; "
        "etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok share the 2 cores with "
        "the operator"
    )
    return Target("real", kubeconfig, client, {k: int(v) for k, v in pids.items()}, stop, [note])


def items(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    resp = client.get(path)
    resp.raise_for_status()
    return resp.json().get("items", [])


def ready(item: dict[str, Any]) -> bool:
    conds = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def measure(target: Target, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the operator on `target`, flood it with pools, poll until all children and all Ready."""
    client = target.client
    samples: list[tuple[float, int, int, float, int | None]] = []
    env = {"KUBECONFIG": str(target.kubeconfig)}
    op_args = [TOLLWAY, "operator", "--standalone", "-A", "--liveness", "", "--metrics-port", "0"]
    operator = ManagedProcess(f"operator-{target.name}", op_args, log_dir=log_dir, env=env).start()
    try:
        time.sleep(args.settle)  # let kopf list and watch before the flood
        if not operator.alive():
            raise RuntimeError(f"operator exited:\n{operator.log_tail()}")
        idle_rss = rss_of(operator.pid)
        expected = args.pools * len(MODELS)
        t0 = time.perf_counter()
        for i in range(args.pools):
            resp = client.post(f"/{GROUP}/namespaces/{NAMESPACE}/modelpools", json=pool(f"pool-{i:03d}"))
            if resp.status_code >= 300:
                raise RuntimeError(f"create pool-{i:03d}: {resp.status_code} {resp.text[:300]}")
        created_s = time.perf_counter() - t0
        all_children_s = all_ready_s = None
        while time.perf_counter() - t0 < args.timeout:
            deps = items(client, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments")
            svcs = items(client, f"/api/v1/namespaces/{NAMESPACE}/services")
            pools = items(client, f"/{GROUP}/namespaces/{NAMESPACE}/modelpools")
            n_ready = sum(map(ready, pools))
            now = time.perf_counter() - t0
            n_deps = sum(1 for d in deps if d["metadata"]["name"].startswith("pool-"))
            n_svcs = sum(1 for s in svcs if s["metadata"]["name"].startswith("pool-"))
            pods_ready = None
            if target.name == "real":  # where the time to Ready goes: pods made, scheduled, Running
                pods = items(client, f"/api/v1/namespaces/{NAMESPACE}/pods")
                pods_ready = sum(map(ready, pods))
            samples.append((now, n_deps + n_svcs, n_ready, rss_of(operator.pid) / 2**20, pods_ready))
            if all_children_s is None and n_deps >= expected and n_svcs >= expected:
                all_children_s = now
            if all_ready_s is None and n_ready >= args.pools:
                all_ready_s = now
            if all_children_s is not None and all_ready_s is not None:
                break
            if not operator.alive():
                raise RuntimeError(f"operator exited:\n{operator.log_tail()}")
            time.sleep(args.poll)
        return {
            "target": LABELS[target.name],
            "notes": target.notes,
            "pools": args.pools,
            "models_per_pool": len(MODELS),
            "expected_children": 2 * expected,
            "create_all_pools_s": created_s,
            "all_children_s": all_children_s,
            "all_pools_ready_s": all_ready_s,
            "timeout_s": args.timeout,
            "operator_rss_idle_mib": idle_rss / 2**20,
            "operator_rss_end_mib": rss_of(operator.pid) / 2**20,
            "operator_rss_peak_mib": peak_rss_of(operator.pid) / 2**20,
            "server_rss_end_mib": {name: rss_of(pid) / 2**20 for name, pid in target.server_pids.items()},
            "samples": samples,
        }
    finally:
        operator.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("emulator", "real") if args.on == "both" else (args.on,):
        log_dir = Path(tempfile.mkdtemp(prefix=f"tollway-bench-operator-{name}-"))
        print(f"==> {LABELS[name]}: {args.pools} pools (logs: {log_dir})", flush=True)
        if name == "emulator":
            target = start_emulator(log_dir)
        else:
            target = start_control_plane(log_dir, args.gpu_nodes, args.gpus_per_node)
        try:
            out[name] = measure(target, args, log_dir)
        finally:
            target.stop()
    return out


def report(data: dict[str, Any], out_dir: Path) -> Path:
    runs = {name: data[name] for name in ("emulator", "real") if name in data}

    def secs(x: float | None) -> str:
        return "not reached" if x is None else f"{x:.1f}"

    def per_s(run: dict[str, Any]) -> str:
        return f"{run['expected_children'] / run['all_children_s']:.1f}" if run["all_children_s"] else "n/a"

    def rss(run: dict[str, Any]) -> str:
        return f"{run['operator_rss_idle_mib']:.0f} / {run['operator_rss_end_mib']:.0f} / {run['operator_rss_peak_mib']:.0f}"

    def server(run: dict[str, Any]) -> str:
        parts = run["server_rss_end_mib"]
        total = sum(parts.values())
        return f"{total:.0f}" + (
            " (" + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()) + ")" if len(parts) > 1 else ""
        )

    rows = [
        ("ModelPools (x 3 models)", lambda r: r["pools"]),
        ("children expected (Deployments + Services)", lambda r: r["expected_children"]),
        ("time to create all pools (client) s", lambda r: f"{r['create_all_pools_s']:.1f}"),
        ("time to all children created s", lambda r: secs(r["all_children_s"])),
        ("children per second", per_s),
        ("time to all pools Ready s", lambda r: secs(r["all_pools_ready_s"])),
        ("operator RSS idle / end / peak MiB", rss),
        ("API server side RSS at end MiB", server),
    ]
    table = markdown_table(
        ["measure", *(LABELS[n] for n in runs)],
        [[label, *(f(r) for r in runs.values())] for label, f in rows],
    )
    ratio = []
    if "real" in runs:
        pods = [(s[0], s[4]) for s in runs["real"]["samples"] if s[4]]
        if pods:
            most = max(n for _, n in pods)
            half = next(t for t, n in pods if n >= most / 2)
            every = next(t for t, n in pods if n >= most)
            lag = runs["real"]["all_pools_ready_s"]
            ratio.append(
                f"real control plane: half of the {most} model pods Ready after {half:.1f} s, all after "
                f"{every:.1f} s (the controller-manager creating them and kwok starting them set most of "
                "the time to Ready there)"
                + (f"; every pool reported Ready {lag - every:.1f} s after the last pod" if lag else "")
            )
    if "emulator" in runs and "real" in runs:
        e, r = runs["emulator"], runs["real"]
        for what, key in (("all children", "all_children_s"), ("all pools Ready", "all_pools_ready_s")):
            if e[key] and r[key]:
                ratio.append(f"time to {what}: real / emulator = {r[key] / e[key]:.2f}")
    any_run = next(iter(runs.values()))
    body = "\n".join(
        [
            "## Setup",
            "",
            f"- {any_run['pools']} ModelPools created back to back over HTTP, each with 3 models (1, 2 and 4 "
            f"GPUs, emptyDir cache), so {any_run['expected_children']} children; the API is polled every "
            f"{data['poll_s']:g} s (timeout {any_run['timeout_s']:g} s). `tollway operator --standalone -A` "
            "runs as its own process with the target's admin kubeconfig.",
            "- emulator: `tests/kube_emulator.py` (kmock 0.8 with the fake Deployment controller: Deployments "
            "report their replicas ready at once). It is Python too and shares the 2 cores with the operator.",
            "- real control plane: e2e/cluster (kube-apiserver, kube-controller-manager, kube-scheduler 1.36.5, "
            "etcd 3.6.16, kwok 0.8.0). Ready means what it means on a cluster: the Deployment controller made "
            "a ReplicaSet, the ReplicaSet a Pod, the scheduler bound it to a GPU node with room, kwok reported "
            "it Running and Ready, the Deployment counted it, and the operator saw it. "
            + " ".join(runs["real"]["notes"] if "real" in runs else []),
            "",
            "## Results",
            "",
            table,
            "",
            *([f"- {line}" for line in ratio] + [""] if ratio else []),
        ]
    )
    fig, axes = new_figure(2, 1, size=(5.0, 3.6))
    for name, run in runs.items():
        xs = [s[0] for s in run["samples"]]
        axes[0][0].plot(xs, [s[1] for s in run["samples"]], label=f"children ({LABELS[name]})")
        axes[0][0].plot(
            xs, [s[2] * 6 for s in run["samples"]], linestyle="--", label=f"pools Ready x6 ({LABELS[name]})"
        )
        if name == "real":
            axes[0][0].plot(
                xs, [s[4] * 2 for s in run["samples"]], linestyle=":", label="pods Ready x2 (real)"
            )
        axes[0][1].plot(xs, [s[3] for s in run["samples"]], label=LABELS[name])
    axes[0][0].set_xlabel("seconds since the first create")
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title("reconcile progress")
    axes[0][1].set_xlabel("seconds since the first create")
    axes[0][1].set_title("operator RSS (MiB)")
    axes[0][1].legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return write_report(
        "scale_operator",
        title=f"Scale: operator reconciling {any_run['pools']} ModelPools, emulator and real control plane",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scale_operator.py", description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--on", choices=("emulator", "real", "both"), default="both")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between polls of the API")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds between operator start and the flood"
    )
    parser.add_argument("--gpu-nodes", type=int, default=25, help="real: kwok GPU nodes (default 25)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=32, help="real: nvidia.com/gpu per node (default 32)"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data: dict[str, Any] = {"load_average_1m_at_start": round(os.getloadavg()[0], 2), "poll_s": args.poll}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    return (
        0 if all(data[n]["all_pools_ready_s"] is not None for n in ("emulator", "real") if n in data) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
