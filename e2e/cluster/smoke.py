"""A quick self-check of a running e2e cluster, with kubectl only (run through `e2e/cluster/smoke`).

Checks: a Deployment asking for one GPU (with the GPU taint's toleration) becomes Running and Ready on a GPU
node; one asking for 99 stays Pending with a FailedScheduling event "Insufficient nvidia.com/gpu"; deleting
a Deployment removes its ReplicaSet and Pods (garbage collector); `kubectl create token` gives a token that
authenticates as the ServiceAccount; deleting the namespace completes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
T0 = time.monotonic()


def log(msg: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s] smoke: {msg}",
        file=sys.stderr,
        flush=True,
    )


class SmokeFailure(Exception):
    pass


def find_kubectl() -> str:
    for cand in (
        os.environ.get("KUBECTL"),
        str(REPO / ".tools" / "bin" / "kubectl"),
        shutil.which("kubectl"),
    ):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise SmokeFailure("no kubectl: set KUBECTL, run .ci/setup (.tools/bin/kubectl), or put one on PATH")


class Kubectl:
    def __init__(self, binary: str, kubeconfig: Path) -> None:
        self.binary = binary
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig))

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, KUBECONFIG=str(kubeconfig)) if kubeconfig else self.env
        done = subprocess.run(
            [self.binary, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise SmokeFailure(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except SmokeFailure as e:
            last = e
        time.sleep(0.5)
    raise SmokeFailure(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


def deployment(name: str, gpus: int, claim: str | None = None) -> dict:
    volumes = [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}] if claim else []
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    # kwok never pulls or runs it.
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/tollway-smoke:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                            "volumeMounts": [{"name": v["name"], "mountPath": "/cache"} for v in volumes],
                        }
                    ],
                    "volumes": volumes,
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 5,
                },
            },
        },
    }


def step(name: str, fn: Callable[[], str | None]) -> None:
    t = time.monotonic()
    detail = fn()
    log(f"ok   {name} ({time.monotonic() - t:.1f} s){': ' + detail if detail else ''}")


def run_smoke(args: argparse.Namespace, state: Path) -> int:
    kubeconfig = Path(args.kubeconfig) if args.kubeconfig else state / "admin.kubeconfig"
    if not kubeconfig.is_file():
        print(f"smoke: no kubeconfig at {kubeconfig}: start a cluster with e2e/cluster/up", file=sys.stderr)
        return 1
    try:
        k = Kubectl(find_kubectl(), kubeconfig)
    except SmokeFailure as e:
        print(f"smoke: {e}", file=sys.stderr)
        return 1
    ns = f"smoke-{uuid.uuid4().hex[:6]}"
    timeout = args.timeout
    tmp = Path(tempfile.mkdtemp(prefix="tollway-smoke-"))

    def versions() -> str:
        v = json.loads(k("version", "-o", "json").stdout)
        return f"kubectl {v['clientVersion']['gitVersion']} ({k.binary}), server {v['serverVersion']['gitVersion']}"

    def nodes() -> str:
        items = k.json("get", "nodes")["items"]
        gpu = [
            n["metadata"]["name"] for n in items if n["status"].get("allocatable", {}).get("nvidia.com/gpu")
        ]
        ready = [
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        ]
        if len(ready) != len(items) or not gpu:
            raise SmokeFailure(f"nodes: {len(ready)}/{len(items)} Ready, GPU nodes {gpu}")
        return f"{len(items)} nodes Ready, GPU nodes: {', '.join(gpu)}"

    def gpu_pod_runs() -> str:
        k("create", "namespace", ns)
        wait_for(
            f"ServiceAccount {ns}/default",
            lambda: k("get", "sa", "default", "-n", ns, check=False).returncode == 0,
            timeout,
        )
        # A claim without a class gets the default one ("standard"), which kwok provisions and binds.
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "cache"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
        }
        k("apply", "-n", ns, "-f", "-", stdin=json.dumps(pvc))
        wait_for(
            "PVC cache Bound",
            lambda: k.json("get", "pvc", "cache", "-n", ns)["status"].get("phase") == "Bound",
            timeout,
        )
        k("apply", "-n", ns, "-f", "-", stdin=json.dumps(deployment("gpu-one", 1, claim="cache")))

        def running() -> str | None:
            for pod in k.json("get", "pods", "-n", ns, "-l", "app=gpu-one")["items"]:
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in pod["status"].get("conditions", [])
                )
                if pod["status"].get("phase") == "Running" and ready:
                    return pod["spec"]["nodeName"]
            return None

        node = wait_for("the 1-GPU pod Running and Ready", running, timeout)
        labels = k.json("get", "node", node)["metadata"].get("labels", {})
        if labels.get("nvidia.com/gpu.present") != "true":
            raise SmokeFailure(f"the 1-GPU pod runs on {node}, which is not a GPU node")
        wait_for(
            "Deployment gpu-one available",
            lambda: k.json("get", "deploy", "gpu-one", "-n", ns)["status"].get("availableReplicas") == 1,
            timeout,
        )
        return f"PVC Bound; Running and Ready on {node}; Deployment available"

    def too_many_gpus_pending() -> str:
        k("apply", "-n", ns, "-f", "-", stdin=json.dumps(deployment("gpu-99", 99)))

        def event() -> str | None:
            for ev in k.json("get", "events", "-n", ns, "--field-selector", "reason=FailedScheduling")[
                "items"
            ]:
                if "Insufficient nvidia.com/gpu" in ev.get("message", ""):
                    return ev["message"]
            return None

        msg = wait_for("a FailedScheduling event 'Insufficient nvidia.com/gpu'", event, timeout)
        phases = [
            p["status"].get("phase") for p in k.json("get", "pods", "-n", ns, "-l", "app=gpu-99")["items"]
        ]
        if phases != ["Pending"]:
            raise SmokeFailure(f"the 99-GPU pod should be Pending, phases: {phases}")
        return f"Pending: {msg.strip()}"

    def gc_deletes_children() -> str:
        rs_before = [
            r["metadata"]["name"] for r in k.json("get", "rs", "-n", ns, "-l", "app=gpu-one")["items"]
        ]
        if not rs_before:
            raise SmokeFailure("Deployment gpu-one has no ReplicaSet")
        k("delete", "deploy", "gpu-one", "-n", ns, "--wait=false")

        def gone() -> bool:
            rs = k.json("get", "rs", "-n", ns, "-l", "app=gpu-one")["items"]
            pods = k.json("get", "pods", "-n", ns, "-l", "app=gpu-one")["items"]
            return not rs and not pods

        wait_for("ReplicaSet and Pods of gpu-one deleted (garbage collector, kwok)", gone, timeout)
        return f"ReplicaSet {rs_before[0]} and its pod gone"

    def token_authenticates() -> str:
        token = k("create", "token", "default", "-n", ns, "--duration=10m").stdout.strip()
        if token.count(".") != 2:
            raise SmokeFailure(f"kubectl create token printed no JWT: {token[:40]!r}")
        cfg = k.json("config", "view", "--raw", "--minify")
        cluster = cfg["clusters"][0]["cluster"]
        sa_cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "sa",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": ns}}],
        }
        path = tmp / "sa.kubeconfig"
        path.write_text(json.dumps(sa_cfg))
        whoami = k("auth", "whoami", "-o", "json", kubeconfig=path)
        user = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
        if user != f"system:serviceaccount:{ns}:default":
            raise SmokeFailure(f"the token authenticates as {user!r}")
        can = k("auth", "can-i", "--list", "-n", ns, kubeconfig=path).stdout
        if "selfsubjectreviews" not in can and "selfsubjectaccessreviews" not in can:
            raise SmokeFailure(f"auth can-i --list as the ServiceAccount looks wrong:\n{can}")
        denied = k(
            "auth", "can-i", "create", "deployments", "-n", ns, kubeconfig=path, check=False
        ).stdout.strip()
        if denied != "no":
            raise SmokeFailure(f"RBAC: the default ServiceAccount may create deployments ({denied!r})")

        # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs `update` on the owner's finalizers.
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "cm-writer"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]}],
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "cm-writer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-writer"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}],
        }
        k(
            "apply",
            "-n",
            ns,
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, binding]}),
        )
        owner = k.json("create", "configmap", "owner", "-n", ns)
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner["metadata"]["uid"],
                        "blockOwnerDeletion": True,
                    }
                ],
            },
        }

        def role_applies() -> bool:
            return (
                k(
                    "auth", "can-i", "create", "configmaps", "-n", ns, kubeconfig=path, check=False
                ).stdout.strip()
                == "yes"
            )

        wait_for("the RoleBinding to take effect", role_applies, timeout)
        refused = k("create", "-n", ns, "-f", "-", stdin=json.dumps(child), kubeconfig=path, check=False)
        if refused.returncode == 0 or "blockOwnerDeletion" not in refused.stderr:
            raise SmokeFailure(
                f"OwnerReferencesPermissionEnforcement did not refuse blockOwnerDeletion: "
                f"{refused.stdout.strip()} {refused.stderr.strip()}"
            )
        del child["metadata"]["ownerReferences"][0]["blockOwnerDeletion"]
        k("create", "-n", ns, "-f", "-", stdin=json.dumps(child), kubeconfig=path)
        return (
            f"token authenticates as {user}; can-i --list works; RBAC denies it deployments; "
            "blockOwnerDeletion without finalizers permission refused"
        )

    def namespace_deleted() -> str:
        def our_pvs() -> list[str]:
            return [
                pv["metadata"]["name"]
                for pv in k.json("get", "pv")["items"]
                if pv["spec"].get("claimRef", {}).get("namespace") == ns
            ]

        pvs = our_pvs()
        k("delete", "namespace", ns, "--wait=false")
        wait_for(f"namespace {ns} gone", lambda: k("get", "ns", ns, check=False).returncode != 0, timeout)
        wait_for("its PersistentVolume deleted", lambda: not our_pvs(), timeout)
        return f"namespace controller finished; PV {', '.join(pvs)} removed"

    log(f"namespace {ns}, kubeconfig {kubeconfig}")
    try:
        step("versions", versions)
        step("nodes", nodes)
        step("PVC + 1 GPU -> Running/Ready on a GPU node", gpu_pod_runs)
        step("99 GPUs -> Pending, FailedScheduling", too_many_gpus_pending)
        step("delete Deployment -> ReplicaSet and Pods go (GC)", gc_deletes_children)
        step("kubectl create token -> authenticates as the SA; RBAC; owner refs", token_authenticates)
        step("delete namespace completes", namespace_deleted)
    except SmokeFailure as e:
        print(f"smoke: FAILED: {e}", file=sys.stderr)
        k("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"all checks passed in {time.monotonic() - T0:.1f} s")
    return 0
