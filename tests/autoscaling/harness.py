"""Test and benchmark harness for the autoscaler: a real Prometheus process, simulators, load.

Used by tests/autoscaling/test_integration.py and benchmarks/autoscaling_reaction.py.

- `LocalPrometheus`: Debian's `prometheus` binary on 127.0.0.1:<free port>, 1 s scrapes, storage
  in a temporary directory, targets from file_sd files that can be rewritten while it runs.
  Jobs with `relabel=True` carry the chart's `metric_relabel_configs` (read from the chart file,
  so the test checks the rule that ships).
- `MemoryScaler`: an in-memory Deployment (spec.replicas / readyReplicas) that records patches.
- `ClosedLoopLoad`: a bounded client, N concurrent workers sending completions round-robin to
  a live set of simulators, for at most a given time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tollway_operator.api import ModelPoolSpec
from tollway_operator.autoscaler import DeploymentReplicas, PoolAutoscaler, run_pool

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_SCRAPE_CONFIG = REPO_ROOT / "charts" / "tollway" / "files" / "prometheus-scrape-config.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str | None:
    local = REPO_ROOT / ".tools" / "bin" / "prometheus"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("prometheus")


def chart_vllm_metric_relabel() -> list[dict[str, Any]]:
    """The `metric_relabel_configs` of the chart's example vLLM scrape job."""
    config = yaml.safe_load(CHART_SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        if job.get("metric_relabel_configs") and "vllm" in job["job_name"]:
            return job["metric_relabel_configs"]
    raise AssertionError(f"no vLLM job with metric_relabel_configs in {CHART_SCRAPE_CONFIG}")


@dataclass
class Job:
    name: str
    relabel: bool = False
    targets: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


class LocalPrometheus:
    """A Prometheus server for tests. `start()` / `stop()` may be repeated (same port and data)."""

    def __init__(
        self, jobs: Sequence[Job], *, scrape_interval: str = "1s", workdir: Path | None = None
    ) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus not found in .tools/bin or on PATH: run .ci/setup")
        self.binary = binary
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="tollway-prom-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.jobs = {j.name: j for j in jobs}
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()
        for job in jobs:
            self.set_targets(job.name, job.targets)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        relabel = chart_vllm_metric_relabel()
        scrape_configs = []
        for job in self.jobs.values():
            cfg: dict[str, Any] = {
                "job_name": job.name,
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "file_sd_configs": [{"files": [str(self._sd_file(job.name))], "refresh_interval": "1s"}],
            }
            if job.relabel:
                cfg["metric_relabel_configs"] = relabel
            scrape_configs.append(cfg)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": scrape_configs,
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))

    def _sd_file(self, job: str) -> Path:
        return self.dir / f"targets-{job}.json"

    def set_targets(self, job: str, targets: Sequence[str]) -> None:
        """Replace a job's targets (host:port); Prometheus picks the change up within ~1 s."""
        self.jobs[job].targets = list(targets)
        body = [{"targets": list(targets), "labels": self.jobs[job].labels}] if targets else []
        path = self._sd_file(job)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)

    def start(self, timeout: float = 20.0) -> LocalPrometheus:
        if self.proc is not None:
            raise RuntimeError("already running")
        (self.dir / "data").mkdir(exist_ok=True)
        log = (self.dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--storage.tsdb.retention.time=1h",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def log_tail(self, n: int = 2000) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def wait_for(
        self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
    ) -> list:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.2)
        raise AssertionError(f"{promql!r} never satisfied the condition in {timeout}s; last result {result}")

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_port(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://").rstrip("/")


class MemoryScaler:
    """An in-memory Deployment per name: ready replicas follow spec at once (or are held at 0)."""

    def __init__(self, replicas: dict[str, int], on_scale: Callable[[str, int], None] | None = None) -> None:
        self.replicas = dict(replicas)
        self.unready: set[str] = set()
        self.patches: list[tuple[float, str, int]] = []
        self._on_scale = on_scale

    async def read(self, namespace: str, name: str) -> DeploymentReplicas | None:
        if name not in self.replicas:
            return None
        n = self.replicas[name]
        return DeploymentReplicas(n, 0 if name in self.unready else n)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.replicas[name] = replicas
        self.patches.append((time.monotonic(), name, replicas))
        if self._on_scale is not None:
            self._on_scale(name, replicas)


class MemoryStatus:
    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []

    async def write(self, namespace: str, pool: str, autoscaling: dict[str, Any]) -> None:
        self.writes.append(autoscaling)

    @property
    def last(self) -> dict[str, Any]:
        return self.writes[-1] if self.writes else {}


class ClosedLoopLoad:
    """`concurrency` workers, each sending one completion at a time, round-robin over the URLs
    that `targets()` returns at each request; stops after `duration` seconds or `stop()`."""

    def __init__(
        self, targets: Callable[[], list[str]], model: str, *, concurrency: int, max_tokens: int = 20
    ) -> None:
        self.targets = targets
        self.model = model
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.completed = 0
        self.errors = 0
        self._stop = asyncio.Event()
        self._rr = itertools.count()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            deadline = time.monotonic() + duration
            await asyncio.gather(*(self._worker(client, deadline) for _ in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            urls = self.targets()
            if not urls:
                await asyncio.sleep(0.05)
                continue
            url = urls[next(self._rr) % len(urls)]
            body = {"model": self.model, "prompt": "hello there", "max_tokens": self.max_tokens}
            try:
                r = await client.post(f"{url}/v1/completions", json=body)
                if r.status_code == 200:
                    self.completed += 1
                else:
                    self.errors += 1
            except httpx.HTTPError:
                self.errors += 1
                await asyncio.sleep(0.05)


@dataclass
class AutoscalerLoop:
    """The operator's autoscaler loop (`run_pool`) running as a task against in-memory adapters."""

    task: asyncio.Task[int]
    stop: asyncio.Event
    status: MemoryStatus
    events: list[tuple[str, str, str]]
    autoscaler: PoolAutoscaler

    @classmethod
    def start(cls, autoscaler: PoolAutoscaler, spec: ModelPoolSpec, max_evaluations: int) -> AutoscalerLoop:
        stop = asyncio.Event()
        status = MemoryStatus()
        events: list[tuple[str, str, str]] = []

        async def wait(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        task = asyncio.create_task(
            run_pool(
                autoscaler,
                lambda: spec,
                status,
                lambda *e: events.append(e),
                stop.is_set,
                wait,
                max_evaluations=max_evaluations,
            )
        )
        return cls(task, stop, status, events, autoscaler)

    async def close(self, timeout: float = 60.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)
        await self.autoscaler.aclose()
