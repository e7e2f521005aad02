"""Helpers for the end-to-end suite: kubectl and helm on a cluster, bounded waiting, the operator as a
process, a kubeconfig that acts as a ServiceAccount.

Everything here talks to the cluster the way a user does (kubectl, helm, the operator's own CLI and
its metrics endpoint), so the suite runs unchanged on any cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent
CHART = REPO_ROOT / "charts" / "tollway"
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
T = TypeVar("T")


def tool_path(name: str) -> str:
    local = REPO_ROOT / ".tools" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in .tools/bin or on PATH: run .ci/setup", pytrace=False)
    return found


def kubectl_path() -> str:
    """`$KUBECTL` (e.g. a kubectl matching the server's version), else .tools/bin, else PATH."""
    return os.environ.get("KUBECTL") or tool_path("kubectl")


SHARED_CACHE = {"kind": "pvc", "size": "10Gi", "accessMode": "ReadWriteMany", "retention": "Delete"}
"""A cache claim shared by a model's replicas (so a Deployment), owned by the pool."""


def small_model(**extra: Any) -> dict[str, Any]:
    """A one-GPU Mistral 7B that tolerates the GPU nodes' taint, with `extra` fields (camelCase)."""
    return {
        "name": "small",
        "model": "mistralai/Mistral-7B-Instruct-v0.3",
        "profile": "mistralai/mistral-7b-chat",
        "gpus": 1,
        "tolerations": [GPU_TOLERATION],
        **extra,
    }


def model_pool(name: str, namespace: str, *models: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A ModelPool of `models`, with further `spec` fields (camelCase)."""
    return {
        "apiVersion": "tollway.io/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"models": list(models), **spec},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DESELECTED = pytest.StashKey[bool]()
"""Set by the conftest when `-k`/`-m` deselected an e2e test."""


def whole_suite_ran(session: pytest.Session) -> str | None:
    """None when this session runs every e2e test, else why not."""
    if session.config.stash.get(DESELECTED, False):
        return "some e2e tests were deselected (-k, -m)"
    ran = {Path(item.path) for item in session.items}
    missing = sorted(p.name for p in E2E_DIR.glob("test_*.py") if p not in ran)
    return f"not run: {', '.join(missing)}" if missing else None


def real_cluster_only(cluster: Cluster, why: str) -> None:
    """Skip on the emulator, which has no RBAC, admission, CEL, scheduler or pods. The real-cluster
    stage of .ci/test sets TOLLWAY_E2E_STRICT=1, which turns every skip into a failure."""
    if cluster.emulated:
        pytest.skip(f"needs a real API server ({why}); run with TOLLWAY_E2E_KUBECONFIG")


@dataclass
class Cluster:
    kubeconfig: Path
    emulated: bool
    kubectl_bin: str
    timeout: float
    namespace: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl_bin, *args]
        done = subprocess.run(
            argv, input=stdin, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        argv = [tool_path("helm"), *args]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def apply(self, docs: list[dict[str, Any]], namespace: str | None = None) -> str:
        stdin = "\n".join(json.dumps(d) for d in docs)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", "--validate=false", *ns, "-f", "-", stdin=stdin).stdout

    def merge_patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str | None = None) -> None:
        """`kubectl patch --type merge`, as a user edits an object."""
        ns = namespace or self.namespace
        self.kubectl("patch", kind, name, "-n", ns, "--type", "merge", "-p", json.dumps(patch))

    def get(self, kind: str, name: str | None = None, namespace: str | None = None) -> dict[str, Any] | None:
        ns = ["-n", namespace or self.namespace] if (namespace or self.namespace) else []
        args = ["get", kind] + ([name] if name else []) + ns + ["-o", "json"]
        done = self.kubectl(*args, check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr or "not found" in done.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name or ''}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def items(
        self, kind: str, selector: str | None = None, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        ns = namespace or self.namespace
        args = ["get", kind, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
        return list(json.loads(self.kubectl(*args).stdout).get("items", []))

    def names(self, kind: str, namespace: str | None = None) -> set[str]:
        listed = self.get(kind, namespace=namespace) or {}
        return {item["metadata"]["name"] for item in listed.get("items", [])}

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        deadline = time.monotonic() + (timeout or self.timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
            except (AssertionError, KeyError, TypeError, ValueError) as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout or self.timeout:.0f} s waiting for {what}"
            + (f" (last: {last})" if last else "")
        )

    def gpu_nodes(self) -> dict[str, int]:
        """Ready nodes that advertise GPUs, with how many each can allocate."""
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        out = {}
        for node in nodes:
            gpus = int((node.get("status", {}).get("allocatable") or {}).get(GPU, "0") or 0)
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in node.get("status", {}).get("conditions") or []
            )
            if gpus > 0 and ready:
                out[node["metadata"]["name"]] = gpus
        return out

    def service_account_kubeconfig(self, namespace: str, account: str, out: Path) -> Path:
        """A kubeconfig for this cluster that authenticates with a token of ServiceAccount
        `namespace/account` (`kubectl create token`), and with nothing else: what runs with it gets
        exactly the RBAC granted to that ServiceAccount."""
        token = self.kubectl("create", "token", account, "-n", namespace, "--duration=4h").stdout.strip()
        view = json.loads(
            self.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout
        )
        (cluster,) = view["clusters"]
        user = f"system:serviceaccount:{namespace}:{account}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": user, "context": {"cluster": cluster["name"], "user": user, "namespace": namespace}}
            ],
            "current-context": user,
        }
        out.write_text(yaml.safe_dump(config))
        out.chmod(0o600)
        return out


def new_namespace(cluster: Cluster, prefix: str = "tollway-e2e") -> str:
    """A fresh namespace (its default ServiceAccount there too: pods are refused until it is)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])
    if not cluster.emulated:
        cluster.wait_for(
            lambda: cluster.get("serviceaccount", "default", namespace=name), "the default ServiceAccount"
        )
    return name


def in_cluster_operator() -> bool:
    """TOLLWAY_E2E_OPERATOR=in-cluster: an operator runs in the cluster; the suite starts none."""
    return os.environ.get("TOLLWAY_E2E_OPERATOR") == "in-cluster"


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c.get("type") == type_:
            return dict(c)
    return {}


def current(obj: dict[str, Any] | None) -> bool:
    """Status written for the object's current generation, with a reason on every condition."""
    if not obj:
        return False
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    return (
        st.get("observedGeneration") == obj["metadata"].get("generation")
        and len(conds) >= 3
        and all(c.get("reason") for c in conds)
    )


# ---------------------------------------------------------------------------------------------------
# Local processes: the operator, out-of-cluster; rendered containers (local_pods.py)
# ---------------------------------------------------------------------------------------------------


def wait_until_ready(
    proc: subprocess.Popen[bytes], what: str, url: str, timeout: float, log_tail: Callable[[], str]
) -> None:
    """Poll `url` until it answers 200; fail, with the log's tail, if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout:.0f} s ({url}):\n{log_tail()}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------
# The operator, out-of-cluster
# ---------------------------------------------------------------------------------------------------


@dataclass
class OperatorProcess:
    """`tollway operator --namespace NS --standalone` as a child process, with its metrics."""

    metrics_url: str
    resync_seconds: float
    log_path: Path
    proc: subprocess.Popen[bytes]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the operator's /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def total(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    def resyncs(self, kind: str = "ModelPool") -> float:
        return self.total("tollway_operator_reconciles_total", kind=kind, trigger="resync")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def run_operator(
    kubeconfig: Path,
    namespace: str,
    log_path: Path,
    resync_seconds: float = 3.0,
    peering: tuple[str, int] | None = None,
) -> Iterator[OperatorProcess]:
    """Run the operator for `namespace` with `kubeconfig`'s identity until the block ends;
    standalone, or with `peering` = (peering object's name, this replica's priority)."""
    liveness, metrics = free_port(), free_port()
    scope = ["--peering", peering[0], "--priority", str(peering[1])] if peering else ["--standalone"]
    argv = [
        sys.executable, "-m", "tollway_operator.cli", "operator",
        "--namespace", namespace, *scope,
        "--liveness", f"http://127.0.0.1:{liveness}/healthz",
        "--metrics-port", str(metrics),
        "--resync-seconds", str(resync_seconds), "--retry-seconds", "2",
    ]  # fmt: skip
    env = dict(
        os.environ,
        KUBECONFIG=str(kubeconfig),
        TOLLWAY_OPERATOR_METRICS_HOST="127.0.0.1",
        TOLLWAY_OPERATOR_DEBOUNCE_SECONDS="0.1",
    )
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = OperatorProcess(f"http://127.0.0.1:{metrics}/metrics", resync_seconds, log_path, proc)
    try:
        wait_until_ready(proc, "the operator", f"http://127.0.0.1:{liveness}/healthz", 60, handle.log_tail)
        yield handle
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class Release:
    """A release of the chart that the suite installed, and the operator identity it grants to."""

    name: str
    namespace: str
    values: tuple[str, ...]
    """The helm arguments it was installed with (`--set` ...)."""
    account: str

    @property
    def user(self) -> str:
        """The ServiceAccount's user name, as the API server (and its audit log) names it."""
        return f"system:serviceaccount:{self.namespace}:{self.account}"


RELEASES: list[Release] = []
"""Every release the suite installed in this session (the RBAC audit test reads them)."""


def chart_values(namespace: str, *extra: str) -> tuple[str, ...]:
    """The suite's values: serving only `namespace`, with no operator replica of its own (the
    suite runs the operator itself, as the chart's ServiceAccount)."""
    return ("--set", "replicas=0", "--set", f"watchNamespaces={{{namespace}}}", *extra)


def render_chart(*values: str) -> list[dict[str, Any]]:
    """`helm template` of the chart with `values`: its manifests."""
    done = subprocess.run(
        [tool_path("helm"), "template", "tollway-e2e", str(CHART), "--namespace", "tollway-e2e", *values],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"helm template failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def install_chart(cluster: Cluster, release: str, namespace: str, *extra: str) -> str:
    """`helm install` the chart into `namespace` with `chart_values(namespace, *extra)`. Returns the
    ServiceAccount's name."""
    values = chart_values(namespace, *extra)
    account = release if "tollway" in release else f"{release}-tollway"
    RELEASES.append(Release(release, namespace, values, account))
    cluster.helm(
        "install", release, str(CHART), "--namespace", namespace, *values, "--wait", "--timeout", "120s"
    )  # fmt: skip
    return account


@contextlib.contextmanager
def own_release(cluster: Cluster, prefix: str, workdir: Path, *extra: str) -> Iterator[tuple[str, Path]]:
    """A namespace of its own (named `prefix-...`) with the chart installed into it, as a release of
    the same name (`install_chart(..., *extra)`): the namespace, and a kubeconfig in `workdir` that
    acts as the chart's ServiceAccount. Afterwards the release is uninstalled and the namespace
    deleted (the release's ClusterRoles are cluster-wide: nothing of it may stay)."""
    namespace = new_namespace(cluster, prefix)
    try:
        account = install_chart(cluster, namespace, namespace, *extra)
        yield namespace, cluster.service_account_kubeconfig(namespace, account, workdir / "kubeconfig")
    finally:
        cluster.helm("uninstall", namespace, "--namespace", namespace, check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
