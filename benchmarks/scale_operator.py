"""Operator scale: reconcile 100 ModelPools against the Kubernetes API emulator.

    .venv/bin/python benchmarks/scale_operator.py             # 100 pools x 3 models, ~1-3 min
    .venv/bin/python benchmarks/scale_operator.py --pools 20  # smoke run

The emulator (`tests/kube_emulator.py`, kmock plus the fake Deployment controller and garbage
collector) and `tollway operator --standalone -A` run as separate processes on 127.0.0.1. The
benchmark creates --pools ModelPools (3 models each, one Deployment and one Service per model)
as fast as the emulator takes them, then polls the emulator until every child exists and every
pool reports the Ready condition True. Reported: time to all children, time to all pools Ready,
children per second, the operator's resident memory (now and peak) and the emulator's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
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
                }
                for m, hf, prof, gpus in MODELS
            ],
        },
    }


def start_emulator(log_dir: Path) -> tuple[ManagedProcess, str, Path]:
    kubeconfig = log_dir / "kubeconfig"
    port = free_port()
    args = [sys.executable, ROOT / "tests" / "kube_emulator.py", "--port", port, "--kubeconfig", kubeconfig]
    proc = ManagedProcess("kube-emulator", args, log_dir=log_dir).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/version", timeout=60, ok=range(200, 500))
    deadline = time.monotonic() + 30
    while not kubeconfig.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, url, kubeconfig


def count(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    resp = client.get(path)
    resp.raise_for_status()
    return resp.json().get("items", [])


def ready(item: dict[str, Any]) -> bool:
    conds = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="tollway-bench-operator-"))
    emulator, url, kubeconfig = start_emulator(log_dir)
    operator = None
    samples: list[tuple[float, int, int, float]] = []
    try:
        env = {"KUBECONFIG": str(kubeconfig)}
        op_args = [TOLLWAY, "operator", "--standalone", "-A", "--liveness", "", "--metrics-port", "0"]
        operator = ManagedProcess("operator", op_args, log_dir=log_dir, env=env).start()
        time.sleep(args.settle)  # let kopf list and watch before the flood
        if not operator.alive():
            raise RuntimeError(f"operator exited:\n{operator.log_tail()}")
        idle_rss = rss_of(operator.pid)
        expected = args.pools * len(MODELS)
        with httpx.Client(base_url=url, timeout=30) as client:
            t0 = time.perf_counter()
            for i in range(args.pools):
                resp = client.post(f"/{GROUP}/namespaces/{NAMESPACE}/modelpools", json=pool(f"pool-{i:03d}"))
                if resp.status_code >= 300:
                    raise RuntimeError(f"create pool-{i:03d}: {resp.status_code} {resp.text[:300]}")
            created_s = time.perf_counter() - t0
            all_children_s = all_ready_s = None
            while time.perf_counter() - t0 < args.timeout:
                deps = count(client, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments")
                svcs = count(client, f"/api/v1/namespaces/{NAMESPACE}/services")
                pools = count(client, f"/{GROUP}/namespaces/{NAMESPACE}/modelpools")
                n_ready = sum(map(ready, pools))
                now = time.perf_counter() - t0
                samples.append((now, len(deps) + len(svcs), n_ready, rss_of(operator.pid) / 2**20))
                if all_children_s is None and len(deps) >= expected and len(svcs) >= expected:
                    all_children_s = now
                if all_ready_s is None and n_ready >= args.pools:
                    all_ready_s = now
                if all_children_s is not None and all_ready_s is not None:
                    break
                if not operator.alive():
                    raise RuntimeError(f"operator exited:\n{operator.log_tail()}")
                time.sleep(0.25)
        return {
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
            "emulator_rss_end_mib": rss_of(emulator.pid) / 2**20,
            "samples": samples,
        }
    finally:
        if operator is not None:
            operator.stop()
        emulator.stop()


def report(data: dict[str, Any], out_dir: Path) -> Path:
    def secs(x: float | None) -> str:
        return "not reached" if x is None else f"{x:.1f}"

    children_per_s = (
        data["expected_children"] / data["all_children_s"] if data["all_children_s"] else float("nan")
    )
    table = markdown_table(
        ["measure", "value"],
        [
            ["ModelPools (x 3 models)", data["pools"]],
            ["children expected (Deployments + Services)", data["expected_children"]],
            ["time to create all pools (client) s", f"{data['create_all_pools_s']:.1f}"],
            ["time to all children created s", secs(data["all_children_s"])],
            ["children per second", f"{children_per_s:.1f}"],
            ["time to all pools Ready s", secs(data["all_pools_ready_s"])],
            [
                "operator RSS idle / end / peak MiB",
                f"{data['operator_rss_idle_mib']:.0f} / {data['operator_rss_end_mib']:.0f} / {data['operator_rss_peak_mib']:.0f}",
            ],
            ["emulator RSS at end MiB", f"{data['emulator_rss_end_mib']:.0f}"],
        ],
    )
    body = "\n".join(
        [
            "## Setup",
            "",
            "- `tests/kube_emulator.py` (kmock 0.8 emulator with the fake Deployment controller: Deployments "
            "report their replicas ready at once) and `tollway operator --standalone -A`, separate processes.",
            f"- {data['pools']} ModelPools created back to back over HTTP, each with 3 models (emptyDir cache), so "
            f"{data['expected_children']} children; the emulator is polled every 0.25 s (timeout {data['timeout_s']:g} s).",
            "- The emulator is Python too and shares the 2 cores with the operator: the times include its work "
            "(list/watch/patch handling, fake controllers), which a real API server would do elsewhere.",
            "",
            "## Results",
            "",
            table,
            "",
        ]
    )
    fig, axes = new_figure(2, 1, size=(5.0, 3.6))
    xs = [s[0] for s in data["samples"]]
    axes[0][0].plot(xs, [s[1] for s in data["samples"]], label="children")
    axes[0][0].plot(xs, [s[2] for s in data["samples"]], label="pools Ready")
    axes[0][0].set_xlabel("seconds since the first create")
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title("reconcile progress")
    axes[0][1].plot(xs, [s[3] for s in data["samples"]])
    axes[0][1].set_xlabel("seconds since the first create")
    axes[0][1].set_title("operator RSS (MiB)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return write_report(
        "scale_operator",
        title="Scale: operator reconciling 100 ModelPools",
        body_md=body,
        data=data,
        figure=fig,
        out_dir=out_dir,
    )["md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scale_operator.py", description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds between operator start and the flood"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    return 0 if data["all_children_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
