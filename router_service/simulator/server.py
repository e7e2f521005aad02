"""Running simulators: in a background thread of this process, or as `tollway simulate` subprocesses.

``SimulatorServer(profile).start()`` serves one simulator with uvicorn on a thread of its own
(own event loop), bound to 127.0.0.1 on a free port unless told otherwise::

    with SimulatorServer(SimulatorProfile(model="small", speedup=20)) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x")
        sim.set_faults(error_rate=1.0)

``SimulatorProcess`` runs the same thing as a child process (``python -m
router_service.simulator.cli``), for tests and benchmarks that need to kill a server for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from router_service.simulator.app import Simulator, create_app
from router_service.simulator.faults import FaultSettings
from router_service.simulator.profile import SimulatorProfile

START_TIMEOUT_SECONDS = 15.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (else +40 ms per keep-alive reply).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SimulatorServer:
    """One simulator served by uvicorn on a background thread. Use as a context manager."""

    def __init__(
        self, profile: SimulatorProfile, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.profile = profile
        self.host = host
        self.app = create_app(profile)
        self.simulator: Simulator = self.app.state.simulator
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=log_level, lifespan="on", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without /v1 (what tollway's BackendConfig.url expects)."""
        return url_for(self.host, self.port)

    @property
    def base_url(self) -> str:
        """Base URL with /v1 (what the openai client's base_url expects)."""
        return self.url + "/v1"

    def start(self) -> SimulatorServer:
        if self._thread is not None:
            raise RuntimeError("this SimulatorServer was already started")
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"sim-{self.profile.model}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulator {self.profile.model!r} failed to start on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving (open connections are closed); idempotent."""
        self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._sock.close()

    def _call(self, fn: Any) -> Any:
        """Run `fn()` on the server's event loop (fault state belongs to that loop)."""
        loop = self.simulator.loop
        if loop is None or not loop.is_running():
            return fn()

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result(timeout=5)

    def set_faults(self, **changes: Any) -> FaultSettings:
        """Change fault knobs at runtime, e.g. ``set_faults(hang=True)``; the others stay."""
        return self._call(lambda: self.simulator.faults.update(changes))

    def clear_faults(self) -> FaultSettings:
        return self._call(self.simulator.faults.reset)

    def state(self) -> dict[str, Any]:
        return self._call(self.simulator.state)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SimulatorProcess:
    """One simulator as a child process; `kill()` makes it die abruptly (SIGKILL)."""

    def __init__(
        self,
        profile: SimulatorProfile,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        log_level: str = "warning",
    ) -> None:
        from router_service.simulator.cli import profile_to_argv

        self.profile = profile
        self.host = host
        self.log_path = log_path
        self._argv = [sys.executable, "-m", "router_service.simulator.cli", *profile_to_argv(profile)]
        self._argv += ["--host", host, "--port", str(port), "--log-level", log_level]
        self.process: subprocess.Popen[str] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the simulator process is not running")
        return url_for(self.host, self.port)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> SimulatorProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with contextlib.ExitStack() as stack:
            stderr = (
                stack.enter_context(open(self.log_path, "a"))
                if self.log_path is not None
                else subprocess.DEVNULL
            )
            self.process = subprocess.Popen(
                self._argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
            )
        ready: dict[str, Any] = {}

        def read_ready_line() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith("{"):
                    ready.update(json.loads(line))
                    return

        reader = threading.Thread(target=read_ready_line, daemon=True)
        reader.start()
        reader.join(timeout=START_TIMEOUT_SECONDS)
        if "port" not in ready:
            self.kill()
            raise RuntimeError(
                f"simulator process for {self.profile.model!r} did not report ready: {self._argv}"
            )
        self.port = int(ready["port"])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Abrupt death, as a crashed server."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
