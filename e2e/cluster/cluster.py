#!/usr/bin/env python3
"""A local Kubernetes control plane for the e2e suite: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (fake nodes whose pods become Running and Ready), all on 127.0.0.1.

    e2e/cluster/up --kubeconfig FILE [--gpu-nodes 2] [--gpus-per-node 4] [--cpu-nodes 1] [--timeout 120]
    e2e/cluster/down
    e2e/cluster/smoke [--kubeconfig FILE]
    e2e/cluster/cluster.py status

State (pids, logs, certificates, etcd data): ${TOLLWAY_CLUSTER_DIR:-/tmp/tollway-cluster}. Binaries: from
`e2e/cluster/build` (or a directory named by TOLLWAY_KUBE_BIN_DIR). Standard library only, plus `openssl`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
T0 = time.monotonic()

# Start order; `down` stops them in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
GPU_RESOURCE = "nvidia.com/gpu"
# Nodes kwok manages carry this annotation; nodes without it are left alone.
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
# The API server's audit log (<state>/audit.log, JSON lines): one Metadata event per request of a
# ServiceAccount outside kube-system (the controllers' own accounts are left out), so a test can list every
# call a component made with a ServiceAccount token (the e2e suite checks the operator's against its RBAC).
# RequestReceived is omitted: a finished request is logged once, at ResponseComplete; a watch also at
# ResponseStarted, which is all there is of a watch still open when the log is read.
AUDIT_LOG = "audit.log"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """`up` could not bring the cluster up; `component` names the process whose log to show."""

    def __init__(self, msg: str, component: str | None = None) -> None:
        super().__init__(msg)
        self.component = component


def state_dir() -> Path:
    return Path(os.environ.get("TOLLWAY_CLUSTER_DIR", "/tmp/tollway-cluster")).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes ----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def recorded_pids(state: Path) -> dict[str, tuple[int, str]]:
    """name -> (pid, binary path), for pid files whose process still runs that binary."""
    out = {}
    for name in COMPONENTS:
        f = state / "pids" / f"{name}.pid"
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
            pid, exe = int(rec["pid"]), str(rec["exe"])
        except (ValueError, KeyError, OSError):
            continue
        if not pid_alive(pid):
            continue
        # Guard against pid reuse: the process must still be the binary we started.
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0 == exe:
            out[name] = (pid, exe)
    return out


def stop_pid(name: str, pid: int, grace: float = 10.0) -> None:
    def send(sig: int) -> None:
        try:
            # Each component leads its own process group (start_new_session); a stray found by `down`
            # may not, and then only that process is signalled.
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f} s: SIGKILL")
        send(signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)


def stop_all(state: Path) -> list[str]:
    stopped = []
    running = recorded_pids(state)
    for name in reversed(COMPONENTS):
        if name in running:
            stop_pid(name, running[name][0])
            stopped.append(name)
    return stopped


def log_tail(state: Path, name: str, lines: int = 40) -> str:
    f = state / "logs" / f"{name}.log"
    if not f.is_file():
        return f"(no log at {f})"
    return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Launcher:
    state: Path
    bin_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> None:
        exe = str(self.bin_dir / name)
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        (self.state / "pids").mkdir(parents=True, exist_ok=True)
        with open(self.state / "logs" / f"{name}.log", "ab") as logf:
            logf.write(f"$ {exe} {' '.join(args)}\n".encode())
            logf.flush()
            # Own session: the components outlive `up`, and no terminal signal reaches them.
            proc = subprocess.Popen(
                [exe, *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.state,
            )
        self.procs[name] = proc
        (self.state / "pids" / f"{name}.pid").write_text(json.dumps({"pid": proc.pid, "exe": exe}))

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise Failure(f"{name} exited with status {proc.returncode}", name)


# --- certificates -------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise Failure(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate, client certificates, the service-account key pair."""
    if not shutil.which("openssl"):
        raise Failure("openssl is needed to make the cluster's certificates (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def self_signed_ca(name: str, subj: str) -> None:
        openssl(
            "req",
            "-x509",
            "-new",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.crt",
            "-days",
            "3650",
            "-subj",
            subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=pki,
        )

    def leaf(name: str, subj: str, usage: str, san: str | None = None, ca: str = "ca") -> None:
        ext = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if san:
            ext.append(f"subjectAltName={san}")
        (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
        openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.crt",
            "-CAkey",
            f"{ca}.key",
            "-set_serial",
            "0x" + os.urandom(12).hex(),
            "-days",
            "365",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=pki,
        )

    self_signed_ca("ca", "/CN=tollway-e2e-ca")
    # The aggregation layer's own CA and client (as kubeadm makes them): without them every component logs
    # "missing content for CA bundle ... requestheader-client-ca-file", and aggregated APIs cannot work.
    self_signed_ca("front-proxy-ca", "/CN=tollway-e2e-front-proxy-ca")
    leaf("front-proxy-client", "/CN=front-proxy-client", "clientAuth", ca="front-proxy-ca")
    leaf(
        "apiserver",
        "/CN=kube-apiserver",
        "serverAuth",
        "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local",
    )
    leaf("admin", "/O=system:masters/CN=tollway-e2e-admin", "clientAuth")
    leaf("kube-controller-manager", "/CN=system:kube-controller-manager", "clientAuth")
    leaf("kube-scheduler", "/CN=system:kube-scheduler", "clientAuth")
    leaf("kwok", "/O=system:masters/CN=kwok-controller", "clientAuth")
    leaf("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "clientAuth")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=pki)
    openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for f in [*pki.glob("*.csr"), *pki.glob("*.ext")]:
        f.unlink()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(
    server: str,
    pki: Path,
    user: str,
    token: str | None = None,
    context: str = "tollway-e2e",
    namespace: str = "default",
) -> str:
    """A self-contained kubeconfig, in JSON, which is valid YAML: `user` authenticates with `token`, or
    else with its client certificate in `pki` (inline)."""
    credentials = (
        {"token": token}
        if token
        else {
            "client-certificate-data": b64(pki / f"{user}.crt"),
            "client-key-data": b64(pki / f"{user}.key"),
        }
    )
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tollway-e2e",
                "cluster": {"server": server, "certificate-authority-data": b64(pki / "ca.crt")},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [
            {"name": context, "context": {"cluster": "tollway-e2e", "user": user, "namespace": namespace}}
        ],
        "current-context": context,
        "preferences": {},
    }
    return json.dumps(doc, indent=2) + "\n"


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# --- API access ---------------------------------------------------------------------------------


class Api:
    def __init__(self, server: str, pki: Path) -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")


def insecure_get(url: str, timeout: float = 2) -> tuple[int, str]:
    """GET a component's own health endpoint (self-signed certificate; /healthz is public)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            url, context=ctx if url.startswith("https") else None, timeout=timeout
        ) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as e:
        return 0, str(e)


class NotYet(Exception):
    """Raised by a readiness check to say what it is still waiting for."""


def wait(what: str, check, deadline: float, launcher: Launcher, component: str | None, poll: float = 0.2):
    """Poll check() until it returns something truthy; fail early if a component died."""
    last = None
    while True:
        launcher.check_running()
        try:
            result = check()
            last = None
        except (NotYet, OSError, urllib.error.URLError, ValueError) as e:  # not up yet
            result, last = None, e
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f" (last seen: {last})" if last else ""
            raise Failure(f"timed out waiting for {what}{detail}", component)
        time.sleep(poll)


# --- nodes --------------------------------------------------------------------------------------


# The default class, named as kind's; kwok's volume stages (see build) provision and bind its claims at once.
STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kwok.x-k8s.io/volume",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


def node_manifest(name: str, gpus: int, cpu: str, memory: str) -> dict:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "500Gi"}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        "tollway.io/e2e-node": "gpu" if gpus else "cpu",
    }
    spec: dict[str, Any] = {}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
        spec["taints"] = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": spec,
        # The API server keeps the status of a created Node (as when a kubelet registers); kwok's
        # node-initialize stage keeps capacity/allocatable and fills in conditions, addresses, nodeInfo.
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def nodes_ready(api: Api, names: list[str]) -> bool:
    status, body = api.call("GET", "/api/v1/nodes")
    if status != 200:
        raise NotYet(f"GET /api/v1/nodes: HTTP {status}")
    by_name = {n["metadata"]["name"]: n for n in body.get("items", [])}
    waiting = []
    for name in names:
        node = by_name.get(name)
        if node is None:
            waiting.append(f"{name} missing")
            continue
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        if conds.get("Ready") != "True":
            waiting.append(f"{name} not Ready")
        # The node lifecycle controller taints new nodes not-ready until it sees them Ready.
        taints = [
            t["key"]
            for t in node.get("spec", {}).get("taints", [])
            if t["key"].startswith("node.kubernetes.io/")
        ]
        if taints:
            waiting.append(f"{name} tainted {','.join(taints)}")
    if waiting:
        raise NotYet("; ".join(waiting))
    return True


def api_ready(api: Api) -> bool:
    status, body = api.call("GET", "/readyz", timeout=3)
    if status != 200:
        failing = [ln for ln in str(body).splitlines() if "failed" in ln]
        raise NotYet(f"/readyz HTTP {status}: {'; '.join(failing) or str(body)[:200]}")
    return True


# --- up / down ----------------------------------------------------------------------------------


def resolve_bin_dir(build_first: bool) -> Path:
    env_dir = os.environ.get("TOLLWAY_KUBE_BIN_DIR")
    if env_dir:
        d = Path(env_dir).expanduser()
        missing = [c for c in COMPONENTS if not (d / c).is_file()]
        if missing:
            raise Failure(f"TOLLWAY_KUBE_BIN_DIR={d} lacks {', '.join(missing)}")
        return d
    cmd = [sys.executable, str(HERE / "build"), "--print-bin-dir"]
    if not build_first:
        cmd.append("--check")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise Failure(
            "the control-plane binaries are not built: run e2e/cluster/build first "
            "(5-14 min cold on 2 cores, cached afterwards), or pass --build"
        )
    return Path(done.stdout.strip().splitlines()[-1])


def cmd_up(args: argparse.Namespace) -> int:
    state = state_dir()
    running = recorded_pids(state)
    if running:
        print(
            f"up: a cluster is already running from {state} ({', '.join(running)}); "
            "run e2e/cluster/down first, or set TOLLWAY_CLUSTER_DIR for a second one",
            file=sys.stderr,
        )
        return 1
    try:
        bin_dir = resolve_bin_dir(args.build)
    except Failure as e:
        print(f"up: {e}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    launcher = Launcher(state, bin_dir)
    try:
        info = bring_up(args, state, launcher, deadline)
    except (Failure, KeyboardInterrupt) as e:
        comp = getattr(e, "component", None)
        msg = str(e) or "interrupted"
        if comp:
            print(
                f"\n--- last lines of {state / 'logs' / (comp + '.log')} ---\n{log_tail(state, comp)}\n---",
                file=sys.stderr,
            )
        stopped = stop_all(state)
        print(
            f"up: FAILED: {msg}\nup: stopped {', '.join(stopped) or 'nothing'}; logs kept in {state / 'logs'} "
            "(e2e/cluster/down removes them)",
            file=sys.stderr,
        )
        return 1
    log(f"cluster ready in {time.monotonic() - T0:.1f} s: {info['server']}, kubeconfig {args.kubeconfig}")
    return 0


def bring_up(args: argparse.Namespace, state: Path, launcher: Launcher, deadline: float) -> dict:
    pki = state / "pki"
    log(f"binaries: {launcher.bin_dir}; state: {state}")
    make_pki(pki)
    log("certificates made")
    ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")}

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    launcher.start(
        "etcd",
        [
            "--name=tollway-e2e",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=tollway-e2e={peer_url}",
            "--initial-cluster-state=new",
            # Throwaway data: no fsync (much faster on a shared disk), small log.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
            "--quota-backend-bytes=2147483648",
        ],
    )
    wait(
        "etcd /health", lambda: '"true"' in insecure_get(f"{etcd_url}/health")[1], deadline, launcher, "etcd"
    )
    log(f"etcd ready on {etcd_url}")

    server = f"https://127.0.0.1:{ports['apiserver']}"
    audit_policy = state / "audit-policy.yaml"
    audit_policy.write_text(AUDIT_POLICY)
    launcher.start(
        "kube-apiserver",
        [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Added to the default set (NamespaceLifecycle, LimitRanger, ServiceAccount, DefaultTolerationSeconds,
            # ResourceQuota, PodSecurity, webhooks, ...).
            "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true",
            # The `kubernetes` Service would get 127.0.0.1 as endpoint, which validation rejects; nothing in
            # this cluster dials it (pods are fake).
            "--endpoint-reconciler-type=none",
            f"--cert-dir={state / 'apiserver-certs'}",
            "--profiling=false",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={state / AUDIT_LOG}",
            # Written as each request completes (the default "blocking" mode), never rotated away.
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
        ],
    )
    api = Api(server, pki)
    wait("kube-apiserver /readyz", lambda: api_ready(api), deadline, launcher, "kube-apiserver")
    log(f"kube-apiserver ready on {server}")

    write_private(state / "admin.kubeconfig", kubeconfig(server, pki, "admin"))
    for comp in ("kube-controller-manager", "kube-scheduler", "kwok"):
        write_private(state / f"{comp}.kubeconfig", kubeconfig(server, pki, comp))

    kcm_kc = state / "kube-controller-manager.kubeconfig"
    launcher.start(
        "kube-controller-manager",
        [
            f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}",
            f"--authorization-kubeconfig={kcm_kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kcm']}",
            "--leader-elect=false",
            # Each controller acts as its own service account (as in kubeadm clusters): RBAC is exercised.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--cluster-name=tollway-e2e",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            "--profiling=false",
            # Check node health every second, not 5: new nodes lose their not-ready taint sooner.
            "--node-monitor-period=1s",
        ],
    )
    sch_kc = state / "kube-scheduler.kubeconfig"
    launcher.start(
        "kube-scheduler",
        [
            f"--kubeconfig={sch_kc}",
            f"--authentication-kubeconfig={sch_kc}",
            f"--authorization-kubeconfig={sch_kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            "--leader-elect=false",
            "--profiling=false",
        ],
    )
    stages = launcher.bin_dir.parent / "kwok-stages"
    stage_files = sorted(stages.glob("*.yaml"))
    if not stage_files:
        raise Failure(f"no kwok stages in {stages}: rerun e2e/cluster/build")
    launcher.start(
        "kwok",
        [
            f"--kubeconfig={state / 'kwok.kubeconfig'}",
            *(f"--config={f}" for f in stage_files),
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION[0]}={KWOK_ANNOTATION[1]}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
    )

    status, resp = api.call("POST", "/apis/storage.k8s.io/v1/storageclasses", STORAGE_CLASS)
    if status != 201:
        raise Failure(
            f"creating StorageClass {STORAGE_CLASS['metadata']['name']}: HTTP {status}: {resp}",
            "kube-apiserver",
        )

    nodes = [
        *(
            node_manifest(f"tollway-gpu-{i}", args.gpus_per_node, cpu="32", memory="256Gi")
            for i in range(args.gpu_nodes)
        ),
        *(node_manifest(f"tollway-cpu-{i}", 0, cpu="16", memory="64Gi") for i in range(args.cpu_nodes)),
    ]
    names = [node["metadata"]["name"] for node in nodes]
    for node in nodes:
        status, resp = api.call("POST", "/api/v1/nodes", node)
        if status != 201:
            raise Failure(
                f"creating node {node['metadata']['name']}: HTTP {status}: {resp}", "kube-apiserver"
            )
    log(f"nodes created: {', '.join(names)}")

    wait(
        "kube-controller-manager /healthz",
        lambda: insecure_get(f"https://127.0.0.1:{ports['kcm']}/healthz")[0] == 200,
        deadline,
        launcher,
        "kube-controller-manager",
    )
    wait(
        "kube-scheduler /healthz",
        lambda: insecure_get(f"https://127.0.0.1:{ports['scheduler']}/healthz")[0] == 200,
        deadline,
        launcher,
        "kube-scheduler",
    )
    log("controller-manager and scheduler healthy")
    wait(
        "nodes Ready (kwok) and untainted (node lifecycle controller)",
        lambda: nodes_ready(api, names),
        deadline,
        launcher,
        "kwok",
    )
    log(f"{len(names)} nodes Ready")
    wait(
        "ServiceAccount default/default (serviceaccount controller)",
        lambda: api.call("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        deadline,
        launcher,
        "kube-controller-manager",
    )

    info = {
        "server": server,
        "kubeconfig": str(state / "admin.kubeconfig"),
        "ports": ports,
        "nodes": names,
        "gpu_nodes": args.gpu_nodes,
        "gpus_per_node": args.gpus_per_node,
        "bin_dir": str(launcher.bin_dir),
        "audit_log": str(state / AUDIT_LOG),
        "pids": {name: p.pid for name, p in launcher.procs.items()},
    }
    (state / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    target = Path(args.kubeconfig).expanduser().resolve()
    write_private(target, kubeconfig(server, pki, "admin"))
    info["kubeconfig"] = str(target)
    return info


def cmd_down(args: argparse.Namespace) -> int:
    del args
    state = state_dir()
    t = time.monotonic()
    stopped = stop_all(state)
    # Anything still running from our binaries with our state dir on its command line (a pid file lost).
    leftovers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and Path(cmdline[0].decode(errors="replace")).name in COMPONENTS
            and any(str(state).encode() in a for a in cmdline[1:])
        ):
            leftovers.append(int(proc.name))
    for pid in leftovers:
        stop_pid(f"pid {pid}", pid)
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)
    log(
        f"down: stopped {', '.join(stopped) or 'nothing'}{f' and {len(leftovers)} stray' if leftovers else ''}; "
        f"removed {state} ({time.monotonic() - t:.1f} s)"
    )
    return 0


def cmd_sa_kubeconfig(args: argparse.Namespace) -> int:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token), to run a component with
    exactly the RBAC it would have in the cluster."""
    state = state_dir()
    info_file = state / "cluster.json"
    if not info_file.is_file():
        print(f"sa-kubeconfig: no cluster running from {state}", file=sys.stderr)
        return 1
    server = json.loads(info_file.read_text())["server"]
    pki = state / "pki"
    api = Api(server, pki)
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": int(args.duration)},
    }
    status, resp = api.call(
        "POST", f"/api/v1/namespaces/{args.namespace}/serviceaccounts/{args.service_account}/token", body
    )
    if status != 201:
        print(
            f"sa-kubeconfig: TokenRequest for {args.namespace}/{args.service_account}: HTTP {status}: {resp}",
            file=sys.stderr,
        )
        return 1
    name = f"{args.namespace}-{args.service_account}"
    text = kubeconfig(
        server, pki, name, token=resp["status"]["token"], context=name, namespace=args.namespace
    )
    write_private(Path(args.out).expanduser().resolve(), text)
    print(
        f"sa-kubeconfig: {args.out}: system:serviceaccount:{args.namespace}:{args.service_account}, "
        f"token valid until {resp['status']['expirationTimestamp']}",
        file=sys.stderr,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    del args
    state = state_dir()
    running = recorded_pids(state)
    info = state / "cluster.json"
    if info.is_file():
        print(info.read_text(), end="")
    for name in COMPONENTS:
        print(f"{name:26s} {f'running, pid {running[name][0]}' if name in running else 'not running'}")
    return 0 if len(running) == len(COMPONENTS) else 1


def nonneg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(prog="e2e/cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster; returns once it is ready")
    up.add_argument("--kubeconfig", required=True, help="where to write the admin kubeconfig")
    up.add_argument("--gpu-nodes", type=nonneg, default=2, metavar="N", help="GPU nodes (default 2)")
    up.add_argument(
        "--gpus-per-node", type=positive, default=4, metavar="G", help="nvidia.com/gpu each (default 4)"
    )
    up.add_argument("--cpu-nodes", type=nonneg, default=1, metavar="N", help="CPU-only nodes (default 1)")
    up.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")
    up.add_argument("--build", action="store_true", help="run e2e/cluster/build first if needed")
    sub.add_parser("down", help="stop everything `up` started and remove the state dir")
    sub.add_parser("status", help="show the running components")
    sak = sub.add_parser("sa-kubeconfig", help="write a kubeconfig that authenticates as a ServiceAccount")
    sak.add_argument("--namespace", "-n", required=True)
    sak.add_argument("--service-account", required=True)
    sak.add_argument("--out", required=True, help="kubeconfig file to write")
    sak.add_argument(
        "--duration", type=float, default=24 * 3600, help="token lifetime, seconds (default 1 day)"
    )
    smoke = sub.add_parser("smoke", help="check a running cluster with kubectl")
    smoke.add_argument("--kubeconfig", help="default: the state dir's admin.kubeconfig")
    smoke.add_argument("--timeout", type=float, default=60, help="seconds per wait (default 60)")
    args = ap.parse_args()
    if args.cmd == "up":
        return cmd_up(args)
    if args.cmd == "down":
        return cmd_down(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "sa-kubeconfig":
        return cmd_sa_kubeconfig(args)
    from smoke import run_smoke  # kept apart: it needs only kubectl

    return run_smoke(args, state_dir())


if __name__ == "__main__":
    sys.exit(main())
