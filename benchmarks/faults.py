"""Faults: backends die, fail, hang and cut streams, the router restarts, clients send garbage.

    .venv/bin/python benchmarks/faults.py            # ~2.5 min on 2 cores
    .venv/bin/python benchmarks/faults.py --quick    # ~45 s smoke run

Three simulators and tollway's router run as subprocesses on 127.0.0.1. A steady open-loop load
(`model: auto`, half streamed) runs through a sequence of phases; at the start of each phase a
fault is switched on or off while requests keep arriving:

    baseline -> kill strong (SIGKILL) -> strong restarted -> strong answers 500 -> cleared
    -> strong hangs -> cleared -> strong drops streams mid-way -> cleared
    -> router restarted (SIGTERM, drain, start again on the same port) -> recovered

Every request is classified by how it ended: ok; clear error (an HTTP error status with a body,
a refused connection, or an error event at the end of a stream); truncated (the connection closed
mid-answer, no error event); hung (no end before the client deadline); lost (never ended). The
assertions: nothing lost, nothing hung, and in each fault phase the traffic moves away from the
failing model and comes back once it recovers.

Then the HTTP API is fuzzed with hypothesis (malformed JSON, wrong types, huge and deeply nested
bodies, bad headers): no answer may be a 5xx, and the router must still answer afterwards.

The same scenario and strategies run as small CI tests in tests/resilience/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import httpx
from common import (
    RESULTS,
    ManagedProcess,
    Outcome,
    Step,
    fmt,
    free_port,
    make_client,
    markdown_table,
    new_figure,
    open_loop,
    percentile,
    send_chat,
    start_router,
    start_simulator,
    write_report,
)

MODELS = {
    "strong": "gpt-4-1106-preview",
    "medium": "mistralai/mixtral-8x7b-chat",
    "weak": "mistralai/mistral-7b-chat",
}
SIM_FLAGS = {"speedup": 10, "max-num-seqs": 64, "decode-tokens-per-second": 100, "ttft-ms": 20}
MAX_TOKENS = 12

# ---------------------------------------------------------------------------------------------
# the stack


@dataclass
class Stack:
    """Three simulators and a router, each a subprocess on a fixed 127.0.0.1 port."""

    log_dir: Path
    upstream_timeout: float = 30.0
    first_byte_timeout: float = 2.0
    breaker_open_seconds: float = 1.0
    breaker_max_open_seconds: float = 4.0
    drain_seconds: float = 3.0
    max_request_bytes: int = 64 * 1024
    sims: dict[str, ManagedProcess] = field(default_factory=dict)
    sim_urls: dict[str, str] = field(default_factory=dict)
    sim_ports: dict[str, int] = field(default_factory=dict)
    router: ManagedProcess | None = None
    router_url: str = ""
    router_port: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)
    blackholes: dict[str, socket.socket] = field(default_factory=dict)

    def start(self) -> Stack:
        for name in MODELS:
            self.start_sim(name)
        self.router_port = free_port()
        self.start_router()
        return self

    def router_config(self) -> dict[str, Any]:
        return {
            "backends": [{"name": n, "url": u, "profile": MODELS[n]} for n, u in self.sim_urls.items()],
            "degradation": {
                "maxInFlightPerReplica": 16,
                "scrapeIntervalSeconds": 0.5,
                "staleAfterSeconds": 2,
                "retryAfterSeconds": 1,
                "circuitBreaker": {
                    "failureThreshold": 3,
                    "openSeconds": self.breaker_open_seconds,
                    "maxOpenSeconds": self.breaker_max_open_seconds,
                },
            },
            "server": {
                "upstreamTimeoutSeconds": self.upstream_timeout,
                "firstByteTimeoutSeconds": self.first_byte_timeout,
                "connectTimeoutSeconds": 1,
                "drainSeconds": self.drain_seconds,
                "maxRequestBytes": self.max_request_bytes,
            },
        }

    def start_sim(self, name: str) -> None:
        port = self.sim_ports.get(name)
        proc, url = start_simulator(name, self.log_dir, port=port, flags=SIM_FLAGS)
        self.sims[name], self.sim_urls[name] = proc, url
        self.sim_ports[name] = int(url.rsplit(":", 1)[1])

    def start_router(self) -> None:
        self.router, self.router_url = start_router(self.router_config(), self.log_dir, port=self.router_port)

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    # faults (blocking; run them off the event loop)
    def kill_sim(self, name: str) -> None:
        self.note(f"kill {name}")
        self.sims[name].kill()

    def restart_sim(self, name: str) -> None:
        self.note(f"restart {name}")
        self.start_sim(name)

    def blackhole_sim(self, name: str) -> None:
        """Replace a simulator by a socket that never accepts: once its one-slot accept queue is
        full the kernel drops every SYN, as for a host that vanished (connects time out)."""
        self.note(f"blackhole {name}")
        self.sims[name].kill()
        hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", self.sim_ports[name]))
        hole.listen(0)
        self.blackholes[name] = hole

    def restore_sim(self, name: str) -> None:
        self.note(f"restore {name}")
        self.blackholes.pop(name).close()
        self.start_sim(name)

    def set_faults(self, name: str, **faults: Any) -> None:
        self.note(f"faults {name} {faults}")
        httpx.post(f"{self.sim_urls[name]}/admin/faults", json=faults, timeout=5).raise_for_status()

    def clear_faults(self, name: str) -> None:
        self.note(f"clear faults {name}")
        httpx.delete(f"{self.sim_urls[name]}/admin/faults", timeout=5).raise_for_status()

    def restart_router(self) -> None:
        self.note("router SIGTERM")
        assert self.router is not None
        self.router.stop(grace=self.drain_seconds + 5)
        self.note("router stopped")
        self.start_router()
        self.note("router ready")

    def stop(self) -> None:
        procs = [self.router, *self.sims.values()]
        for proc in procs:
            if proc is not None:
                proc.stop()
        for hole in self.blackholes.values():
            hole.close()


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    action: Callable[[Stack], None] | None = None
    failing: str | None = None
    """The model that is failing during this phase (traffic should avoid it)."""


def standard_phases(seconds: float) -> list[Phase]:
    s = seconds
    return [
        Phase("baseline", s),
        Phase("strong killed", s, lambda st: st.kill_sim("strong"), failing="strong"),
        Phase("strong restarted", s, lambda st: st.restart_sim("strong")),
        Phase("strong 500s", s, lambda st: st.set_faults("strong", error_rate=1.0), failing="strong"),
        Phase("500s cleared", s, lambda st: st.clear_faults("strong")),
        Phase("strong hangs", s, lambda st: st.set_faults("strong", hang=True), failing="strong"),
        Phase("hang cleared", s, lambda st: st.clear_faults("strong")),
        Phase("strong blackholed", s, lambda st: st.blackhole_sim("strong"), failing="strong"),
        Phase("blackhole cleared", s, lambda st: st.restore_sim("strong")),
        Phase(
            "strong cuts streams", s, lambda st: st.set_faults("strong", die_after_tokens=3), failing="strong"
        ),
        Phase("cuts cleared", s, lambda st: st.clear_faults("strong")),
        Phase("router restart", s, lambda st: st.restart_router()),
        Phase("recovered", s),
    ]


def history_prompts(n: int, seed: int = 1) -> list[str]:
    """`n` shuffled prompts of the shipped history, cut to 2,000 characters (tests/resilience
    draws its prompts here too)."""
    return common.history_prompts(n, seed=seed, max_chars=2000)


async def run_phases(
    stack: Stack, phases: list[Phase], *, rate: float, deadline: float, prompts: list[str]
) -> list[Outcome]:
    """Open-loop load through the router while the phases' actions fire (on threads)."""
    actions: list[asyncio.Task[None]] = []
    steps = [Step(p.name, rate, p.seconds) for p in phases]
    by_name = {p.name: p for p in phases}

    async def on_step(step: Step) -> None:
        action = by_name[step.tag].action
        if action is not None:
            actions.append(asyncio.create_task(asyncio.to_thread(action, stack)))

    async with make_client(1000, timeout=deadline) as client:

        async def one(i: int, t0: float) -> Outcome:
            return await send_chat(
                client,
                stack.router_url,
                model="auto",
                prompt=prompts[i % len(prompts)],
                max_tokens=MAX_TOKENS,
                stream=i % 2 == 1,
                t0=t0,
                deadline=deadline,
            )

        outcomes = await open_loop(
            one, steps, max_in_flight=1000, drain_seconds=deadline + 5, on_step=on_step
        )
    for task in actions:
        await task
    return outcomes


# ---------------------------------------------------------------------------------------------
# classification


def classify(o: Outcome) -> str:
    """ok | clear-error | truncated | hung | lost."""
    if o.error in ("abandoned", "client-overflow"):
        return "lost"
    if o.error == "timeout":
        return "hung"
    if o.ok:
        return "ok"
    if o.error == "connect" or o.error == "stream-error":
        return "clear-error"
    if o.status is not None and o.status >= 400 and o.error is None:
        return "clear-error"
    return "truncated"


def phase_stats(outcomes: list[Outcome], phases: list[Phase], deadline: float) -> list[dict[str, Any]]:
    rows = []
    for phase in phases:
        mine = [o for o in outcomes if o.tag == phase.name]
        kinds = Counter(classify(o) for o in mine)
        served = Counter(o.headers.get("x-tollway-model", "?") for o in mine if o.ok)
        ok = sum(served.values())
        statuses = Counter(
            (o.error or str(o.status)) for o in mine if classify(o) in ("clear-error", "truncated")
        )
        lat = [o.latency for o in mine if o.latency is not None]
        rows.append(
            {
                "phase": phase.name,
                "failing": phase.failing,
                "sent": len(mine),
                **{k: kinds.get(k, 0) for k in ("ok", "clear-error", "truncated", "hung", "lost")},
                "errors": dict(statuses),
                "served_share": {m: served[m] / ok for m in served} if ok else {},
                "latency_p50_s": percentile(lat, 50),
                "latency_max_s": max(lat, default=float("nan")),
                "over_deadline": sum(1 for x in lat if x > deadline + 1.0),
            }
        )
    return rows


def second_half_share(outcomes: list[Outcome], phase: Phase, model: str) -> float:
    """Share of `model` among ok answers sent in the second half of the phase (after the switch)."""
    mine = sorted((o for o in outcomes if o.tag == phase.name and o.ok), key=lambda o: o.start)
    tail = mine[len(mine) // 2 :]
    return sum(o.headers.get("x-tollway-model") == model for o in tail) / len(tail) if tail else float("nan")


# ---------------------------------------------------------------------------------------------
# fuzzing the HTTP API

API_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/feedback", "/v1/models"]


def fuzz_strategy(max_request_bytes: int) -> Any:
    """A hypothesis strategy of (method, path, headers, body bytes) aimed at the router's API."""
    from hypothesis import strategies as st

    json_scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    )
    json_values = st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )
    fields = {
        "model": st.one_of(st.sampled_from(["auto", "strong", "weak", "nope", ""]), json_values),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.one_of(
                            st.sampled_from(["user", "system", "assistant", "tool", "x"]), json_values
                        )
                    },
                    optional={"content": st.one_of(st.text(max_size=200), json_values)},
                ),
                max_size=3,
            ),
            json_values,
        ),
        "prompt": st.one_of(st.text(max_size=200), st.lists(st.text(max_size=20), max_size=3), json_values),
        "input": st.one_of(st.text(max_size=100), json_values),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=10**9), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": json_values,
        "n": st.one_of(st.integers(min_value=-1, max_value=1000), json_values),
        "temperature": st.one_of(st.floats(), json_values),
        "score": json_values,
        "tokens": json_values,
    }
    objects = st.fixed_dictionaries({}, optional=fields).map(lambda d: json.dumps(d).encode())
    malformed = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [
                b"",
                b"{",
                b'{"model": "auto", "messages": [}',
                b"null",
                b"[]",
                b'"just a string"',
                b'{"model": NaN, "messages": Infinity}',
                b'{"model": "auto", "model": 5}',
                b"\xff\xfe\x00{",
                b'{"messages": [{"role": "user", "content": "\\ud800"}], "model": "auto"}',
            ]
        ),
        st.integers(min_value=100, max_value=50_000).map(lambda d: b"[" * d + b"]" * d),
        st.integers(min_value=100, max_value=50_000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
        json_values.map(lambda v: json.dumps(v).encode()),
    )
    huge = st.sampled_from([max_request_bytes + 1, 4 * max_request_bytes]).map(
        lambda n: b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"x" * n + b'"}]}'
    )
    bodies = st.one_of(objects, objects, malformed, huge)
    header_values = st.one_of(
        st.sampled_from(["", "critical", "standard", "sheddable", "CRITICAL", "nope", "0", "-1", "a" * 5000]),
        # h11 refuses to send values with surrounding whitespace; the raw-socket cases cover those
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(str.strip),
    )
    headers = st.fixed_dictionaries(
        {},
        optional={
            "content-type": st.sampled_from(
                [
                    "application/json",
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data",
                    "",
                    "*/*",
                ]
            ),
            "x-tollway-priority": header_values,
            "authorization": st.sampled_from(
                ["Bearer", "Bearer x", "Bearer  two  spaces", "Basic Zm9vOmJhcg==", "garbage"]
            ),
            "accept": st.sampled_from(["text/event-stream", "application/json", "*/*", "nonsense"]),
            "x-request-id": header_values,
            "accept-encoding": st.sampled_from(["gzip", "br", "identity", "nonsense;q=x"]),
        },
    )
    methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
    paths = st.one_of(
        st.sampled_from(API_PATHS),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%", max_size=30).map(lambda p: "/" + p),
    )
    return st.tuples(methods, paths, headers, bodies)


def fuzz_router(
    base_url: str, *, examples: int, max_request_bytes: int, seed: int = 0, raise_on_failure: bool = True
) -> dict[str, Any]:
    """Send `examples` fuzzed requests. A 5xx or a dropped connection raises AssertionError (and
    hypothesis shrinks it) when `raise_on_failure`, else is recorded and the run goes on.
    Returns status counts, failures and the slowest answer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    counts: Counter[str] = Counter()
    failures: list[str] = []
    slowest = 0.0
    with httpx.Client(base_url=base_url, timeout=30) as client:

        @hseed(seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        @given(fuzz_strategy(max_request_bytes))
        def check(case: tuple[str, str, dict[str, str], bytes]) -> None:
            nonlocal slowest
            method, path, headers, body = case
            t = time.perf_counter()
            try:
                resp = client.request(
                    method, path, headers=headers, content=body if method != "GET" else None
                )
            except httpx.TransportError as exc:
                failures.append(f"{method} {path} body={body[:80]!r}: transport error {exc!r}")
                if not raise_on_failure:
                    return
                raise AssertionError(
                    f"{method} {path} {headers}: the router dropped the connection: {exc!r}"
                ) from exc
            slowest = max(slowest, time.perf_counter() - t)
            counts[str(resp.status_code)] += 1
            if resp.status_code >= 500:
                failures.append(
                    f"{method} {path} body={body[:80]!r} -> {resp.status_code}: {resp.text[:200]}"
                )
                if not raise_on_failure:
                    return
                raise AssertionError(
                    f"{method} {path} headers={headers} body={body[:120]!r} -> {resp.status_code}: {resp.text[:300]}"
                )

        check()
    return {
        "examples": examples,
        "statuses": dict(sorted(counts.items())),
        "slowest_s": slowest,
        "failures": failures,
    }


def raw_http_garbage(host: str, port: int) -> dict[str, str]:
    """A few requests no HTTP client library would send; the answer must not be a 5xx."""
    cases = {
        "bad content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        "short body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
        "non-ascii header": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-tollway-priority: \xff\xfe\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        "huge header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n",
    }
    results = {}
    for name, payload in cases.items():
        with socket.create_connection((host, port), timeout=10) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while len(data) < 65536:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                results[name] = f"closed ({type(exc).__name__})"
                continue
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        results[name] = line or "closed without an answer"
    return results


# ---------------------------------------------------------------------------------------------
# issue 17's numbers: budget probes, a hung or blackholed top model, a burst on the demo pool,
# the prompt bound's error

BUDGET = 5000
PROBE_PROMPT = "Write a Python function that reverses a list."


def _generated(sim_url: str) -> float:
    text = httpx.get(f"{sim_url}/metrics", timeout=5).text
    return sum(
        float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("vllm:generation_tokens_total")
    )


def budget_probes(stack: Stack, log_dir: Path, concurrency: int) -> list[dict[str, Any]]:
    """`concurrency` requests at once against 5,000-token budgets, per probe; the spend measured at
    the simulators (tokens generated plus each simulator's own prompt count per answered request)."""
    from router_service.simulator.protocol import ChatCompletionRequest

    def chat(**extra: Any) -> dict[str, Any]:
        return {"model": "strong", "messages": [{"role": "user", "content": PROBE_PROMPT}], **extra}

    punctuation = {"role": "user", "content": "!?" * 12}
    strong_only = ["strong"]
    probes: list[tuple[str, list[str], list[dict[str, Any]]]] = [
        ("pinned, max_tokens 50", strong_only, [chat(max_tokens=50)] * concurrency),
        ("pinned, n 8, max_tokens 50", strong_only, [chat(max_tokens=50, n=8)] * concurrency),
        ("one request, n 128, max_tokens 50", strong_only, [chat(max_tokens=50, n=128)]),
        (
            "pinned, punctuation prompt",
            strong_only,
            [{**chat(max_tokens=50), "messages": [punctuation]}] * concurrency,
        ),
        ("pinned, no max_tokens", strong_only, [chat()] * concurrency),
        ("streams without include_usage", strong_only, [chat(max_tokens=50, stream=True)] * concurrency),
        (
            "auto (routed), no max_tokens, every model",
            list(MODELS),
            [{**chat(), "model": "auto"}] * concurrency,
        ),
    ]
    rows = []
    for name, budgeted, bodies in probes:
        config = stack.router_config()
        config["budgets"] = {"tokens": dict.fromkeys(budgeted, BUDGET), "admissionWaitSeconds": 30}
        config["degradation"]["maxWaitingPerReplica"] = 10_000  # budget admission alone decides
        config["degradation"]["maxInFlightPerReplica"] = 10_000
        router, url = start_router(config, log_dir, name="router-budget")
        try:
            before = {m: _generated(stack.sim_urls[m]) for m in budgeted}
            t0 = time.perf_counter()
            results = asyncio.run(_send_bodies(url, bodies))
            seconds = time.perf_counter() - t0
        finally:
            router.stop()
        spend = {}
        for model in budgeted:
            served = [b for b, (code, m) in zip(bodies, results, strict=True) if code == 200 and m == model]
            prompts = sum(
                ChatCompletionRequest.model_validate(b).prompt_identity_and_tokens()[1] for b in served
            )
            spend[model] = _generated(stack.sim_urls[model]) - before[model] + prompts
        codes = Counter(code for code, _ in results)
        demand_exceeds = codes.get(429, 0) > 0  # refused for budget: the budgets were the limit
        rows.append(
            {
                "probe": name,
                "requests": len(bodies),
                "served_by": dict(Counter(m for code, m in results if code == 200)),
                "statuses": dict(codes),
                "spend_tokens": spend,
                "spend_share": max(v / BUDGET for v in spend.values()),
                "unused_share": (BUDGET * len(budgeted) - sum(spend.values())) / (BUDGET * len(budgeted))
                if demand_exceeds
                else None,
                "seconds": seconds,
            }
        )
    return rows


async def _send_bodies(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    """All at once; (status, serving model) per body (streams read to the end)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000)) as client:

        async def one(body: dict[str, Any]) -> tuple[int, str | None]:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                await r.aread()
                return r.status_code, r.headers.get("x-tollway-model")

        return await asyncio.gather(*(one(b) for b in bodies))


def failing_top_model(outcomes: list[Outcome], phases: list[Phase], settle_s: float = 2.0) -> dict[str, Any]:
    """For the hang and blackhole phases: requests that tried the top model first (route
    "fallback"), and latency of those sent after the breaker had time to open."""
    out: dict[str, Any] = {}
    for phase in phases:
        if phase.name not in ("strong hangs", "strong blackholed"):
            continue
        mine = sorted((o for o in outcomes if o.tag == phase.name), key=lambda o: o.start)
        if not mine:
            continue
        start = mine[0].start
        after = [o for o in mine if o.start - start >= settle_s and o.latency is not None]
        lat = [o.latency for o in after]
        out[phase.name] = {
            "sent": len(mine),
            "tried_strong_first": sum(o.headers.get("x-tollway-route") == "fallback" for o in mine),
            "ok": sum(o.ok for o in mine),
            "after_breaker": len(after),
            "after_breaker_ok": sum(o.ok for o in after),
            "after_breaker_latency_p50_s": percentile(lat, 50),
            "after_breaker_latency_max_s": max(lat, default=float("nan")),
            "after_breaker_over_5s": sum(x > 5 for x in lat),
        }
    return out


def demo_burst(log_dir: Path, streams: int, max_tokens: int) -> dict[str, Any]:
    """`streams` simultaneous `auto` streams on the demo pool (tollway demo's simulators and
    router config), with and without the backends' maxNumSeqs (the old, scrape-only load view)."""
    from router_service import demo

    models = demo.example_models()
    prompts = history_prompts(streams, seed=3)
    arms: dict[str, Any] = {}
    for arm in ("scrapes only (before)", "in-flight vs maxNumSeqs"):
        arm_dir = log_dir / arm.split(" ")[0]
        arm_dir.mkdir(parents=True, exist_ok=True)
        with demo.running_stack(models, 2.0, arm_dir) as st:
            urls = st.start_simulators()
            config = demo.router_config(models, urls, demo.example_policy(), {}, 3600, 1000)
            if arm.startswith("scrapes"):
                for backend in config["backends"]:
                    backend.pop("maxNumSeqs", None)
            url = st.start_router(config)

            async def burst(url: str = url) -> list[Outcome]:
                async with make_client(streams, timeout=120) as client:
                    return await asyncio.gather(
                        *(
                            send_chat(client, url, model="auto", prompt=p, max_tokens=max_tokens, stream=True)
                            for p in prompts
                        )
                    )

            outcomes = asyncio.run(burst())
        ttft = [o.ttft for o in outcomes if o.ok and o.ttft is not None]
        arms[arm] = {
            "ok": sum(o.ok for o in outcomes),
            "served_by": dict(Counter(o.headers.get("x-tollway-model", "?") for o in outcomes if o.ok)),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_max_s": max(ttft, default=float("nan")),
        }
    return {"streams": streams, "max_tokens": max_tokens, "arms": arms}


def prompt_bound_error(n: int = 400) -> dict[str, Any]:
    """The prompt bound (router_service/proxy/tokens.py) against real counts on held-out prompts:
    the simulator's tokenizer and OpenAI's o200k_base / cl100k_base with a ChatML template."""
    import bpe_openai

    from router_service.proxy.request import parse_request
    from router_service.routing.history import load_builtin_history
    from router_service.simulator.protocol import ChatCompletionRequest

    prompts = [p for p in load_builtin_history("stream").prompts if p][:n]
    out: dict[str, Any] = {"prompts": len(prompts)}
    counters: dict[str, Callable[[dict[str, Any]], int]] = {
        "simulator": lambda body: ChatCompletionRequest.model_validate(body).prompt_identity_and_tokens()[1]
    }
    for name in ("o200k_base", "cl100k_base"):
        enc = bpe_openai.get_encoding(name)

        def chatml(body: dict[str, Any], enc: Any = enc) -> int:
            m = body["messages"][0]
            return (
                3
                + 4
                + len(enc.encode(m["role"], disallowed_special=()))
                + len(enc.encode(m["content"], disallowed_special=()))
            )

        counters[f"{name} (ChatML)"] = chatml
    for name, count in counters.items():
        ratios = []
        for text in prompts:
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            bound = parse_request(json.dumps(body).encode(), "chat").prompt_bound
            ratios.append(bound / count(body))
        out[name] = {
            "bound_at_least_real": sum(r >= 1 for r in ratios) / len(ratios),
            "ratio_min": min(ratios),
            "ratio_p50": percentile(ratios, 50),
            "ratio_p90": percentile(ratios, 90),
            "ratio_max": max(ratios),
        }
    return out


# ---------------------------------------------------------------------------------------------
# benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="tollway-bench-faults-"))
    stack = Stack(
        log_dir, upstream_timeout=args.upstream_timeout, first_byte_timeout=args.first_byte_timeout
    ).start()
    phases = standard_phases(args.phase_seconds)
    try:
        t_start = time.time()
        outcomes = asyncio.run(
            run_phases(
                stack,
                phases,
                rate=args.rate,
                deadline=args.deadline,
                prompts=history_prompts(500),
            )
        )
        router_alive = stack.router is not None and stack.router.alive()
        fuzz = fuzz_router(
            stack.router_url,
            examples=args.fuzz_examples,
            max_request_bytes=stack.max_request_bytes,
            raise_on_failure=False,
        )
        raw = raw_http_garbage("127.0.0.1", stack.router_port)
        after = httpx.get(f"{stack.router_url}/healthz", timeout=5).status_code
        ready = httpx.get(f"{stack.router_url}/readyz", timeout=5).status_code
        probe = asyncio.run(_probe(stack.router_url))
        alive = stack.router is not None and stack.router.alive()
        budgets = budget_probes(stack, log_dir, args.budget_concurrency)
    finally:
        stack.stop()
    burst = demo_burst(log_dir, args.burst_streams, args.burst_max_tokens)
    bound = prompt_bound_error()
    rows = phase_stats(outcomes, phases, args.deadline)
    moves = {p.name: second_half_share(outcomes, p, "strong") for p in phases}
    return {
        "rate": args.rate,
        "phase_seconds": args.phase_seconds,
        "client_deadline_s": args.deadline,
        "router_upstream_timeout_s": args.upstream_timeout,
        "router_first_byte_timeout_s": args.first_byte_timeout,
        "router_config": stack.router_config(),
        "phases": rows,
        "strong_share_second_half": moves,
        "events": [(round(t - t_start, 2), what) for t, what in stack.events],
        "totals": dict(Counter(classify(o) for o in outcomes)),
        "router_alive_after_load": router_alive,
        "fuzz": fuzz,
        "raw_http": raw,
        "after_fuzz": {"healthz": after, "readyz": ready, "chat": probe, "router_alive": alive},
        "failing_top_model": failing_top_model(outcomes, phases),
        "budget_probes": budgets,
        "demo_burst": burst,
        "prompt_bound": bound,
    }


async def _probe(url: str) -> int | None:
    async with make_client(1, timeout=10) as client:
        out = await send_chat(client, url, model="auto", prompt="Still there?", max_tokens=4, stream=False)
    return out.status


def report(data: dict[str, Any], out_dir: Path) -> Path:
    rows = []
    for r in data["phases"]:
        share = data["strong_share_second_half"][r["phase"]]
        rows.append(
            [
                r["phase"],
                r["sent"],
                r["ok"],
                r["clear-error"],
                r["truncated"],
                r["hung"],
                r["lost"],
                ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "-",
                ", ".join(f"{m} {100 * s:.0f}%" for m, s in sorted(r["served_share"].items())),
                "-" if share != share else f"{100 * share:.0f}%",
                fmt(r["latency_max_s"], 2),
            ]
        )
    table = markdown_table(
        [
            "phase",
            "sent",
            "ok",
            "clear error",
            "truncated",
            "hung",
            "lost",
            "errors",
            "served by (ok)",
            "strong share, 2nd half",
            "max latency s",
        ],
        rows,
    )
    totals = data["totals"]
    sent = sum(totals.values())
    fuzz = data["fuzz"]
    lines = [
        "## Setup",
        "",
        f"- Three `tollway simulate` servers ({', '.join(f'{k}={v}' for k, v in MODELS.items())}), flags {SIM_FLAGS}, "
        "and `tollway router`, each its own process on 127.0.0.1.",
        f"- Load: {data['rate']:g} requests/s open loop, `model: auto`, every other one streamed, {MAX_TOKENS} "
        f"tokens; {data['phase_seconds']:g} s per phase; client deadline {data['client_deadline_s']:g} s; router "
        f"upstream timeout {data['router_upstream_timeout_s']:g} s, first-byte timeout "
        f"{data['router_first_byte_timeout_s']:g} s, circuit breaker "
        f"{data['router_config']['degradation']['circuitBreaker']}.",
        "- Each phase's fault is switched at its start (on a thread, load keeps flowing). 'strong share, 2nd half': "
        "share of ok answers served by the strong model among requests sent in the phase's second half.",
        "",
        "## Results",
        "",
        table,
        "",
        f"Totals: {sent} sent; " + ", ".join(f"{k}: {v}" for k, v in sorted(totals.items())) + ".",
        "",
        "Fault timeline (s from the load's start): "
        + "; ".join(f"{t}: {w}" for t, w in data["events"])
        + ".",
        "",
        "## Fuzzing the HTTP API",
        "",
        f"- {fuzz['examples']} hypothesis examples (malformed JSON, wrong types, bodies up to 4x the "
        f"{data['router_config']['server']['maxRequestBytes']} byte limit, JSON nested 50,000 deep, bad headers, odd "
        f"methods and paths): statuses {fuzz['statuses']}; slowest answer {fuzz['slowest_s']:.2f} s; "
        f"5xx / dropped connections: {len(fuzz['failures'])}.",
        "- Raw-socket garbage: " + "; ".join(f"{k}: `{v}`" for k, v in data["raw_http"].items()) + ".",
        f"- After fuzzing: /healthz {data['after_fuzz']['healthz']}, /readyz {data['after_fuzz']['readyz']}, a chat "
        f"request {data['after_fuzz']['chat']}, router process alive: {data['after_fuzz']['router_alive']}.",
        "",
        "## Verdict",
        "",
        f"- Lost: {totals.get('lost', 0)}; hung past the deadline: {totals.get('hung', 0)}; every other request "
        "ended with an answer or an error the client can see.",
    ]
    truncated = totals.get("truncated", 0)
    if truncated:
        lines.append(
            f"- {truncated} answers were cut mid-way without an error event (connection closed); the client "
            "sees the cut, but not a reason. See the phases where they happened."
        )
    lines += issue17_sections(data)
    fig, axes = new_figure(1, 1, size=(10.0, 4.0))
    ax = axes[0][0]
    names = [r["phase"] for r in data["phases"]]
    bottoms = [0.0] * len(names)
    for model, color in (("strong", "tab:blue"), ("medium", "tab:green"), ("weak", "tab:olive")):
        vals = [r["ok"] * r["served_share"].get(model, 0) for r in data["phases"]]
        ax.bar(names, vals, bottom=bottoms, color=color, label=f"ok via {model}")
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    for kind, color in (
        ("clear-error", "tab:orange"),
        ("truncated", "tab:red"),
        ("hung", "black"),
        ("lost", "purple"),
    ):
        vals = [r[kind] for r in data["phases"]]
        ax.bar(names, vals, bottom=bottoms, color=color, label=kind)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_ylabel("requests")
    ax.set_title("How each request ended, per phase")
    ax.tick_params(axis="x", rotation=35)
    ax.legend(fontsize=7, ncol=2)
    paths = write_report(
        "faults",
        title="Faults: nothing lost, nothing hung",
        body_md="\n".join(lines),
        data=data,
        figure=fig,
        out_dir=out_dir,
    )
    return paths["md"]


def issue17_sections(data: dict[str, Any]) -> list[str]:
    """Budget probes, the failing top model, the demo burst and the prompt bound, as markdown."""
    lines = ["", "## A failing top model (circuit breaker)", ""]
    for phase, r in data["failing_top_model"].items():
        lines.append(
            f"- {phase}: {r['sent']} requests, {r['ok']} ok; {r['tried_strong_first']} tried strong first "
            f"(and fell back); of the {r['after_breaker']} sent 2 s or more after the fault began, "
            f"{r['after_breaker_ok']} ok, latency p50 {fmt(r['after_breaker_latency_p50_s'], 2)} s, max "
            f"{fmt(r['after_breaker_latency_max_s'], 2)} s, {r['after_breaker_over_5s']} over 5 s."
        )
    rows = [
        [
            r["probe"],
            r["requests"],
            ", ".join(f"{m} {n}" for m, n in sorted(r["served_by"].items())),
            ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())),
            f"{100 * r['spend_share']:.1f}%",
            "-" if r["unused_share"] is None else f"{100 * r['unused_share']:.1f}%",
            fmt(r["seconds"], 1),
        ]
        for r in data["budget_probes"]
    ]
    lines += [
        "",
        f"## Budget probes ({BUDGET:,}-token budgets)",
        "",
        "Each probe sends its requests at once through a fresh router; spend is measured at the simulator "
        "(tokens it generated plus its prompt count per answered request). Spend: the highest share of a "
        "model's budget spent. Unused: budget left when demand exceeded it (some requests refused 429). "
        "Pinned probes: a budget on strong; the routed probe: on every model, the real routing engine.",
        "",
        markdown_table(["probe", "requests", "served by", "statuses", "spend", "unused", "seconds"], rows),
    ]
    burst = data["demo_burst"]
    rows = [
        [
            arm,
            r["ok"],
            ", ".join(f"{m} {n}" for m, n in sorted(r["served_by"].items())),
            fmt(r["ttft_p50_s"], 2),
            fmt(r["ttft_max_s"], 2),
        ]
        for arm, r in burst["arms"].items()
    ]
    lines += [
        "",
        f"## Burst: {burst['streams']} simultaneous `auto` streams on the demo pool",
        "",
        f"`tollway demo`'s simulators (large: 4 sequences at once) and router config, {burst['max_tokens']} tokens "
        "each, prompts from the held-out split; the same burst with the router's load view from scrapes only.",
        "",
        markdown_table(["load view", "ok", "served by", "TTFT p50 s", "TTFT max s"], rows),
    ]
    bound = data["prompt_bound"]
    rows = [
        [
            name,
            f"{100 * r['bound_at_least_real']:.0f}%",
            fmt(r["ratio_min"], 2),
            fmt(r["ratio_p50"], 2),
            fmt(r["ratio_p90"], 2),
            fmt(r["ratio_max"], 2),
        ]
        for name, r in bound.items()
        if isinstance(r, dict)
    ]
    lines += [
        "",
        f"## The prompt bound against real counts ({bound['prompts']} held-out prompts, one user message)",
        "",
        markdown_table(["counted by", "bound >= real", "bound/real min", "p50", "p90", "max"], rows),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/faults.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--phase-seconds", type=float, default=8.0)
    parser.add_argument("--deadline", type=float, default=15.0, help="client deadline per request (s)")
    parser.add_argument("--upstream-timeout", type=float, default=120.0, help="router upstreamTimeoutSeconds")
    parser.add_argument(
        "--first-byte-timeout", type=float, default=2.0, help="router firstByteTimeoutSeconds"
    )
    parser.add_argument(
        "--budget-concurrency", type=int, default=200, help="requests at once per budget probe"
    )
    parser.add_argument("--burst-streams", type=int, default=40, help="simultaneous auto streams (demo pool)")
    parser.add_argument("--burst-max-tokens", type=int, default=128)
    parser.add_argument("--fuzz-examples", type=int, default=600)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.phase_seconds, args.fuzz_examples, args.rate = 3.0, 150, 10.0
        args.budget_concurrency = 60
    data = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    data |= run(args)
    print(report(data, args.out_dir).read_text())
    totals = data["totals"]
    bad = totals.get("lost", 0) + totals.get("hung", 0) + len(data["fuzz"]["failures"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
