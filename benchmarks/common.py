"""Shared helpers for the benchmarks: processes, one load generator, statistics, reports.

Run benchmarks as scripts (``.venv/bin/python benchmarks/NAME.py``), never with ``-m`` from the
repository root: the root holds ``operator/``, which would shadow the standard library's
``operator`` module. Scripts in this folder import this module as ``common``.

Pieces:
- `ManagedProcess`: a server subprocess on 127.0.0.1 with its log in a file, stopped (TERM, then
  KILL) on `stop()`, on context exit and at interpreter exit.
- `send_chat`: one OpenAI chat request with httpx, streamed or not, classified into an
  `Outcome` (status, latency, time to first token, transport error, selected headers). Every
  target of a comparison goes through this same function and the same client settings.
- `closed_loop` (N clients, each sends its next request when the last one ends) and
  `open_loop` (a schedule of arrival rates, requests sent whether or not earlier ones ended);
  both bounded in count and time.
- `percentile`, `summarize`, `markdown_table`, `write_report` (results/NAME.{md,json,png} with
  the reproducing command and the machine).
- `history_prompts`: a seeded sample of the shipped history's prompts, the requests' texts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The `tollway` entry point of the running interpreter's environment (normally .venv).
TOLLWAY = Path(sys.executable).parent / "tollway"
if not TOLLWAY.exists():
    TOLLWAY = ROOT / ".venv" / "bin" / "tollway"

# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LIVE: set[ManagedProcess] = set()


def _stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop()


atexit.register(_stop_all)


class ManagedProcess:
    """One server subprocess. Output goes to `log_path`; `stop()` is idempotent."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        # Never the repository root: its operator/ folder shadows the stdlib module.
        self.cwd = cwd or log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL at once (a crash, not a shutdown)."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _LIVE.discard(self)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        _LIVE.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_http(self, url: str, timeout: float = 60.0, ok: Iterable[int] = (200,)) -> None:
        """Poll `url` until it answers one of `ok`; raise with the log tail if the process dies."""
        wanted = set(ok)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code in wanted:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {url} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the process (Linux /proc)."""
        return rss_of(self.pid)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------
# one request


@dataclass(slots=True)
class Outcome:
    """How one request ended. Exactly one of `status` / `error` says so."""

    tag: str
    start: float
    """Seconds since the run started, when the request was sent."""
    latency: float | None = None
    """Seconds until the full answer (or the error) arrived."""
    ttft: float | None = None
    """Seconds until the first content token (streamed) or the full answer (not streamed)."""
    status: int | None = None
    error: str | None = None
    """Transport-level failure: timeout, connect, read, incomplete-stream, ..."""
    headers: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None


KEEP_HEADERS = (
    "x-tollway-model",
    "x-tollway-route",
    "x-tollway-endpoint",
    "retry-after",
    "x-tollway-decision-ms",
)


def make_client(concurrency: int, timeout: float) -> httpx.AsyncClient:
    """The one client configuration used against every target."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        http2=False,
    )


async def send_chat(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    model: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    tag: str = "",
    t0: float = 0.0,
    headers: dict[str, str] | None = None,
    deadline: float | None = None,
) -> Outcome:
    """POST /v1/chat/completions and classify the result. Never raises for network trouble.

    `deadline` (seconds) bounds the whole request, streaming included; past it the request is
    abandoned and reported as error "timeout" (a hang)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    start = time.perf_counter()
    out = Outcome(tag=tag, start=start - t0)
    try:
        coro = _exchange(client, base_url, body, headers or {}, stream, start, out)
        if deadline is None:
            await coro
        else:
            await asyncio.wait_for(coro, deadline)
    except (TimeoutError, httpx.TimeoutException):
        out.error = "timeout"
    except httpx.ConnectError:
        out.error = "connect"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        out.error = "disconnect"
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__
    out.latency = time.perf_counter() - start
    return out


async def _exchange(
    client: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    stream: bool,
    start: float,
    out: Outcome,
) -> None:
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers) as resp:
        out.status = resp.status_code
        out.headers = {k: resp.headers[k] for k in KEEP_HEADERS if k in resp.headers}
        if not stream or resp.status_code != 200:
            raw = await resp.aread()
            out.ttft = time.perf_counter() - start
            if resp.status_code == 200:
                try:
                    data = json.loads(raw)
                    out.meta["model"] = data.get("model")
                    out.meta["completion_tokens"] = (data.get("usage") or {}).get("completion_tokens")
                except (ValueError, AttributeError):
                    out.error = "bad-json"
            else:
                out.meta["body"] = raw[:300].decode(errors="replace")
            return
        done = False
        chunks = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if "error" in event:
                out.meta["stream_error"] = str(event["error"])[:200]
                continue
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                if out.ttft is None:
                    out.ttft = time.perf_counter() - start
            out.meta.setdefault("model", event.get("model"))
        out.meta["chunks"] = chunks
        # An error event ends a stream without [DONE] (the router's, as OpenAI's): a clear error,
        # not a cut. Only a stream with neither is incomplete.
        if "stream_error" in out.meta:
            out.error = "stream-error"
        elif not done:
            out.error = "incomplete-stream"


# --------------------------------------------------------------------------------------------
# load shapes

RequestFn = Callable[[int, float], Awaitable[Outcome]]
"""make_request(sequence_number, t0) -> Outcome"""


async def closed_loop(
    make_request: RequestFn, *, concurrency: int, total: int, max_seconds: float
) -> tuple[list[Outcome], float]:
    """`concurrency` clients send back to back until `total` requests or `max_seconds` elapse.

    Returns the outcomes and the wall time of the run."""
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    counter = iter(range(total))
    results: list[Outcome] = []

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            results.append(await make_request(i, t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


@dataclass(frozen=True, slots=True)
class Step:
    """`rate` requests per second for `seconds`, labelled `tag`."""

    tag: str
    rate: float
    seconds: float


async def open_loop(
    make_request: RequestFn,
    steps: Sequence[Step],
    *,
    max_in_flight: int = 2000,
    drain_seconds: float = 60.0,
    on_step: Callable[[Step], Awaitable[None]] | None = None,
) -> list[Outcome]:
    """Send requests at each step's rate (evenly spaced), whether or not earlier ones ended.

    At most `max_in_flight` requests are outstanding; an arrival beyond that is recorded as
    error "client-overflow" rather than silently dropped. After the last step, requests still
    running get `drain_seconds` to finish; any left then are cancelled and recorded as
    error "abandoned" (they would count as lost)."""
    t0 = time.perf_counter()
    tasks: list[tuple[str, asyncio.Task[Outcome]]] = []
    overflow: list[Outcome] = []
    in_flight = 0
    seq = 0

    async def tracked(i: int, tag: str) -> Outcome:
        nonlocal in_flight
        try:
            out = await make_request(i, t0)
            out.tag = out.tag or tag
            return out
        finally:
            in_flight -= 1

    next_at = time.perf_counter()
    for step in steps:
        if on_step is not None:
            await on_step(step)
        step_end = time.perf_counter() + step.seconds
        interval = 1.0 / step.rate if step.rate > 0 else math.inf
        next_at = max(next_at, time.perf_counter())
        while True:
            now = time.perf_counter()
            if next_at >= step_end:
                await asyncio.sleep(max(0.0, step_end - now))
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            if in_flight >= max_in_flight:
                overflow.append(
                    Outcome(tag=step.tag, start=time.perf_counter() - t0, error="client-overflow")
                )
            else:
                in_flight += 1
                tasks.append((step.tag, asyncio.create_task(tracked(seq, step.tag))))
            seq += 1
            next_at += interval
        next_at = step_end
    if tasks:
        await asyncio.wait([t for _, t in tasks], timeout=drain_seconds)
    results: list[Outcome] = []
    for tag, task in tasks:
        if task.done() and not task.cancelled() and task.exception() is None:
            results.append(task.result())
        else:
            task.cancel()
            results.append(Outcome(tag=tag, start=math.nan, error="abandoned"))
    return results + overflow


# --------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return math.nan
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(outcomes: Sequence[Outcome], wall: float | None = None) -> dict[str, Any]:
    """Counts by status/error and latency/TTFT percentiles (ms) of the successful requests."""
    ok = [o for o in outcomes if o.ok]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = o.error if o.error else str(o.status)
        statuses[key] = statuses.get(key, 0) + 1
    lat = [o.latency * 1000 for o in ok if o.latency is not None]
    ttft = [o.ttft * 1000 for o in ok if o.ttft is not None]
    out: dict[str, Any] = {
        "requests": len(outcomes),
        "ok": len(ok),
        "outcomes": dict(sorted(statuses.items())),
        "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99)},
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
    }
    if wall:
        out["wall_s"] = wall
        out["ok_per_s"] = len(ok) / wall
    return out


# --------------------------------------------------------------------------------------------
# reporting


def fmt(x: float | int | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_1m_at_report": round(os.getloadavg()[0], 2),
    }


def command_line() -> str:
    """How this run was started, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_report(
    name: str,
    *,
    title: str,
    body_md: str,
    data: dict[str, Any],
    figure: Any | None = None,
    out_dir: Path = RESULTS,
) -> dict[str, Path]:
    """Write out_dir/NAME.md (+ .json, + .png when a matplotlib figure is given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    cmd = command_line()
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json"}
    if figure is not None:
        paths["png"] = out_dir / f"{name}.png"
        figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
    header = [
        f"# {title}",
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"Python {machine['python']}; commit {machine['commit']}; {machine['date']}; "
        f"1-minute load average when the report was written: {machine['load_average_1m_at_report']} "
        "(anything above ~0.5 before the run means other work shared the cores).",
        "",
    ]
    if "png" in paths:
        header += [f"![{name}]({paths['png'].name})", ""]
    paths["md"].write_text("\n".join(header) + body_md.rstrip() + "\n")
    payload = {"command": cmd, "machine": machine, **data}
    paths["json"].write_text(json.dumps(_finite(payload), indent=2, default=_json_default) + "\n")
    return paths


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Outcome):
        return _finite(asdict(obj))
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A matplotlib figure with the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


# --------------------------------------------------------------------------------------------
# the stack under test: simulators and the router as subprocesses


def history_prompts(n: int, *, seed: int, max_chars: int | None = None) -> list[str]:
    """`n` prompts of the shipped history's "history" part, shuffled with `seed`, each cut to
    `max_chars` characters (None: whole)."""
    from router_service.routing.history import load_builtin_history

    prompts = [p[:max_chars] for p in load_builtin_history("history").prompts]
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def start_simulator(
    name: str, log_dir: Path, *, port: int | None = None, flags: dict[str, Any] | None = None
) -> tuple[ManagedProcess, str]:
    """`tollway simulate --model NAME` on 127.0.0.1; returns the process and its base URL.

    `flags` maps `tollway simulate` options without dashes ({"speedup": 100, "max-num-seqs": 8});
    pass `port` to restart a killed simulator on the same address."""
    port = port or free_port()
    args: list[Any] = [TOLLWAY, "simulate", "--model", name, "--port", port, "--log-level", "error"]
    for key, value in (flags or {}).items():
        args += [f"--{key}"] if value is True else [f"--{key}", value]
    proc = ManagedProcess(f"sim-{name}", args, log_dir=log_dir).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health", timeout=30)
    return proc, url


def start_router(
    config: dict[str, Any], log_dir: Path, *, port: int | None = None, name: str = "router"
) -> tuple[ManagedProcess, str]:
    """`tollway router --config FILE` with `config` (a RouterConfig as a wire dict)."""
    import yaml

    port = port or free_port()
    cfg_path = log_dir / f"{name}.yaml"
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [TOLLWAY, "router", "--config", cfg_path, "--port", port, "--log-level", "warning", "--no-reload"]
    proc = ManagedProcess(name, args, log_dir=log_dir).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/readyz", timeout=120)
    return proc, url


def histogram_from_metrics(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of one unlabelled Prometheus histogram."""
    buckets: dict[float, float] = {}
    prefix = f'{name}_bucket{{le="'
    for line in text.splitlines():
        if line.startswith(prefix):
            le, _, count = line[len(prefix) :].partition('"}')
            buckets[math.inf if le == "+Inf" else float(le)] = float(count)
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Prometheus-style quantile (linear within a bucket) of the observations between two scrapes."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in zip(les, counts, strict=True):
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le
