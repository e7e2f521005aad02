"""Load signals per replica, and the decision whether a replica is saturated.

Two sources per endpoint (a model's replica, see `endpoints.py`): the router's own requests in
flight to it (exact, instant) and its vLLM `/metrics` (queue length, running requests, KV-cache
use), read every `scrapeIntervalSeconds`. A replica's metrics are *fresh* when its last read
succeeded within `staleAfterSeconds`; otherwise (never read, last read failed, or too old) they are
*unknown*: the saturation decision then rests on the in-flight count alone, and the replica picker
(`picker.py`) takes such a replica only when none with fresh metrics has room. A failed read never
makes a replica look idle.

Between scrapes a burst is seen through the in-flight count: with a replica's real concurrency
known (`maxNumSeqs`, vLLM's --max-num-seqs), the router's own requests beyond it are requests
queued on the replica, and count against `maxWaitingPerReplica` at once, before any scrape says so.

`assess()` is the pure decision for one replica; `LoadTracker` is the thin stateful adapter: each
model's current endpoints (from the config or from EndpointSlices), the counters, the scrape loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router_service.config import BackendConfig, DegradationSettings
from router_service.proxy.endpoints import Endpoint, static_endpoints

log = logging.getLogger("tollway.load")

PRIORITIES: tuple[str, ...] = ("critical", "standard", "sheddable")
DEFAULT_PRIORITY = "standard"

# vLLM gauge names (without the `vllm:` / `vllm_` prefix) that the router reads.
_WAITING = "num_requests_waiting"
_RUNNING = "num_requests_running"
_KV = "kv_cache_usage_perc"
_KV_LEGACY = "gpu_cache_usage_perc"  # vLLM < 0.10
_GENERATED = "generation_tokens_total"  # a counter: whether the engine makes progress at all
_WANTED = (_WAITING, _RUNNING, _KV, _KV_LEGACY, _GENERATED, "generation_tokens")

CIRCUIT_OPEN = "circuit_open"
"""The verdict reason for an endpoint whose circuit breaker keeps work away (see breaker.py)."""


@dataclass(frozen=True, slots=True)
class ScrapedLoad:
    """What one `/metrics` read said about a replica."""

    waiting: float
    running: float
    kv_usage: float | None
    at: float  # clock() when read
    generated: float | None = None  # vllm:generation_tokens_total, when exported


@dataclass(frozen=True, slots=True)
class LoadVerdict:
    """Whether a replica (or a model, by its best replica) can take one more request."""

    available: bool
    saturated: bool
    reason: str | None
    """"unavailable", "circuit_open", "in_flight", "waiting", "kv_cache" (the first limit crossed)"""
    pressure: float  # the largest signal/threshold ratio; >= 1 means at or over a limit
    queues: bool = False  # one more request would wait for a free sequence slot (maxNumSeqs known)
    endpoint: str | None = None  # a model's verdict: the replica that would serve (picker.py)

    @property
    def can_serve(self) -> bool:
        return self.available and not self.saturated


def _strip_prefix(name: str) -> str | None:
    if name.startswith(("vllm:", "vllm_")):
        return name[5:]
    return None


def _relevant(line: str) -> bool:
    if line.startswith("# "):
        parts = line.split(" ", 3)
        name = parts[2] if len(parts) > 2 else ""
    else:
        name = line.split("{", 1)[0].split(" ", 1)[0]
    base = _strip_prefix(name)
    return base is not None and base in _WANTED


def parse_vllm_metrics(text: str, at: float) -> ScrapedLoad:
    """Read the queue and KV-cache gauges from a vLLM `/metrics` exposition.

    Accepts both `vllm:` (text format) and `vllm_` (OpenMetrics) names. Only the few lines that
    matter are handed to prometheus_client's parser, so a large exposition (histograms with many
    buckets, many LoRA labels) costs a line scan, not a full parse. Several samples (engines, model
    labels) add up for the queues; KV-cache use is their mean.
    """
    kept = "\n".join(line for line in text.splitlines() if line and _relevant(line))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(kept + "\n" if kept else ""):
        for sample in family.samples:
            base = _strip_prefix(sample.name)
            if base is None or math.isnan(sample.value):
                continue
            sums[base] = sums.get(base, 0.0) + sample.value
            counts[base] = counts.get(base, 0) + 1
    kv_key = _KV if _KV in sums else (_KV_LEGACY if _KV_LEGACY in sums else None)
    kv = sums[kv_key] / counts[kv_key] if kv_key else None
    return ScrapedLoad(
        waiting=sums.get(_WAITING, 0.0),
        running=sums.get(_RUNNING, 0.0),
        kv_usage=kv,
        at=at,
        generated=sums.get(_GENERATED),
    )


def assess(
    *,
    replicas: int,
    in_flight: int,
    scraped: ScrapedLoad | None,
    settings: DegradationSettings,
    priority: str,
    now: float,
    max_num_seqs: int | None = None,
) -> LoadVerdict:
    """Whether an endpoint can take one more request of this priority.

    `replicas` is how many servers the endpoint stands for (1 for a pod). Thresholds scale with it and with the priority's headroom (sheddable work sees
    a backend as saturated sooner, critical work later). A backend with no replicas is unavailable.
    Saturated when: in-flight >= maxInFlightPerReplica x replicas x headroom (admitting one more
    would exceed it), or waiting > maxWaitingPerReplica x replicas x headroom, or KV-cache use >
    min(maxKvCacheUsage x headroom, 1). With `max_num_seqs` known, the router's own in-flight
    requests beyond max_num_seqs x replicas are waiting on the backend: admitting one more must not
    take that queue past the waiting limit (whatever the last scrape said).
    """
    if replicas <= 0:
        return LoadVerdict(available=False, saturated=True, reason="unavailable", pressure=math.inf)
    headroom = settings.priority_headroom.get(priority, 1.0)  # type: ignore[call-overload]
    ratios: list[tuple[str, float, bool]] = []
    in_flight_limit = settings.max_in_flight_per_replica * replicas * headroom
    ratios.append(("in_flight", in_flight / in_flight_limit, in_flight >= in_flight_limit))
    waiting_limit = settings.max_waiting_per_replica * replicas * headroom
    queued = 0
    if max_num_seqs is not None:
        queued = max(0, in_flight + 1 - max_num_seqs * replicas)  # were one more admitted
        over = queued > waiting_limit
        ratios.append(("waiting", queued / waiting_limit if waiting_limit > 0 else float(over), over))
    if scraped is not None and now - scraped.at <= settings.stale_after_seconds:
        if waiting_limit > 0:
            ratios.append(("waiting", scraped.waiting / waiting_limit, scraped.waiting > waiting_limit))
        else:
            ratios.append(("waiting", math.inf if scraped.waiting > 0 else 0.0, scraped.waiting > 0))
        if scraped.kv_usage is not None:
            kv_limit = min(settings.max_kv_cache_usage * headroom, 1.0)
            ratios.append(("kv_cache", scraped.kv_usage / kv_limit, scraped.kv_usage > kv_limit))
    crossed = next((name for name, _, over in ratios if over), None)
    return LoadVerdict(
        available=True,
        saturated=crossed is not None,
        reason=crossed,
        pressure=max(r for _, r, _ in ratios),
        queues=queued > 0,
    )


@dataclass(eq=False, slots=True)
class ReplicaLoad:
    """What the router knows of one endpoint of a model: its requests in flight and its metrics."""

    endpoint: Endpoint
    in_flight: int = 0
    scraped: ScrapedLoad | None = None  # the last successful read
    scrape_failed: bool = False  # the last read failed: unknown until one succeeds
    scrape_errors: int = 0
    last_error: str | None = None
    progress_at: float = 0.0  # when it was last seen generating, or idle
    picks: int = 0  # requests sent to it
    turn: int = 0  # the router-wide pick number of its last pick (0: never picked)
    ready: bool = True  # in its model's endpoint set; False: removed, kept while requests run

    @property
    def url(self) -> str:
        return self.endpoint.url

    def fresh(self, now: float, stale_after: float) -> ScrapedLoad | None:
        """The scraped load when it can be trusted now; None when unknown."""
        s = self.scraped
        if s is None or self.scrape_failed or now - s.at > stale_after:
            return None
        return s


@dataclass(eq=False)
class ModelLoad:
    """A model's endpoints (ready ones, plus removed ones with requests still in flight)."""

    max_num_seqs: int | None = None
    replicas: dict[str, ReplicaLoad] = field(default_factory=dict)
    ready: tuple[ReplicaLoad, ...] = ()  # the endpoints that may take new requests, in URL order
    discovered: bool = False  # the endpoints come from EndpointSlices, not the config

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas.values())

    @property
    def replica_count(self) -> int:
        return sum(r.endpoint.replicas for r in self.ready)


@dataclass
class DemandWindow:
    """Requests that wanted a model while it had no replicas, counted over a sliding window.

    Bounded memory: one counter per second of the window.
    """

    window_seconds: float = 60.0
    _buckets: dict[int, int] = field(default_factory=dict)

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        self._buckets[second] = self._buckets.get(second, 0) + n
        if len(self._buckets) > self.window_seconds + 2:
            self._prune(now)

    def total(self, now: float) -> int:
        self._prune(now)
        return sum(self._buckets.values())

    def _prune(self, now: float) -> None:
        oldest = int(now - self.window_seconds)
        for second in [s for s in self._buckets if s <= oldest]:
            del self._buckets[second]


class LoadTracker:
    """Every model's endpoints, their in-flight counts and scraped vLLM gauges, and the scrape loop."""

    def __init__(
        self,
        backends: Iterable[BackendConfig],
        settings: DegradationSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_stall: Callable[[str, str], None] | None = None  # told of each (model, endpoint) stalled
        self.stall_after = math.inf  # seconds without progress that count as a stall
        self._clock = clock
        self._models: dict[str, ModelLoad] = {}
        self._demand: dict[str, DemandWindow] = {}
        self._turns = 0
        self._wake: asyncio.Event | None = None
        self.settings = settings
        self.configure(backends, settings)
        self._task: asyncio.Task[None] | None = None

    def configure(self, backends: Iterable[BackendConfig], settings: DegradationSettings) -> None:
        """Apply a (re)loaded config; keeps the counts of endpoints that stay. A backend whose
        endpoints come from EndpointSlices keeps the discovered ones while it still has a source."""
        new: dict[str, ModelLoad] = {}
        added = False
        for b in backends:
            load = new[b.name] = self._models.get(b.name) or ModelLoad()
            load.max_num_seqs = b.max_num_seqs
            if not (load.discovered and b.endpoint_slices is not None):
                added |= self._apply_endpoints(load, static_endpoints(b), discovered=False)
        self._models = new
        self.settings = settings
        if added:
            self.wake()
        if settings.stale_after_seconds < settings.scrape_interval_seconds:
            log.warning(
                "degradation.staleAfterSeconds (%s) is shorter than scrapeIntervalSeconds (%s): scraped "
                "load will often be unknown",
                settings.stale_after_seconds,
                settings.scrape_interval_seconds,
            )

    def set_endpoints(self, model: str, endpoints: Iterable[Endpoint], *, discovered: bool = True) -> None:
        """The endpoints that may take `model`'s new requests from now on. New ones start unknown
        and are scraped at once; removed ones get no new request (those in flight finish)."""
        load = self._models.get(model)
        if load is not None and self._apply_endpoints(load, endpoints, discovered=discovered):
            self.wake()  # scrape the new ones now, not at the next round

    def _apply_endpoints(self, load: ModelLoad, endpoints: Iterable[Endpoint], *, discovered: bool) -> bool:
        """Make `endpoints` the ready set of `load`; True when one was added."""
        wanted = {e.url: e for e in endpoints}
        for url, replica in list(load.replicas.items()):
            if url not in wanted:
                replica.ready = False
                if replica.in_flight == 0:
                    del load.replicas[url]
        added = False
        for url, endpoint in wanted.items():
            replica = load.replicas.get(url)
            if replica is None:
                load.replicas[url] = ReplicaLoad(endpoint, progress_at=self._clock())
                added = True
            else:
                replica.endpoint, replica.ready = endpoint, True
        load.ready = tuple(load.replicas[url] for url in sorted(wanted))
        load.discovered = discovered
        return added

    # --- in-flight accounting -------------------------------------------------------------------

    def acquire(self, model: str, endpoint: str) -> None:
        """One more request in flight to `endpoint`, a replica of `model` (it was picked)."""
        load = self._models.get(model)
        replica = load.replicas.get(endpoint) if load is not None else None
        if replica is not None:
            self._turns += 1
            replica.in_flight += 1
            replica.picks += 1
            replica.turn = self._turns

    def release(self, model: str, endpoint: str) -> None:
        load = self._models.get(model)
        replica = load.replicas.get(endpoint) if load is not None else None
        if replica is None:
            return
        replica.in_flight = max(0, replica.in_flight - 1)
        if replica.in_flight == 0 and not replica.ready:
            del load.replicas[endpoint]  # type: ignore[union-attr]

    def in_flight(self, model: str) -> int:
        load = self._models.get(model)
        return load.in_flight if load else 0

    # --- what the picker reads ------------------------------------------------------------------

    def model(self, name: str) -> ModelLoad | None:
        return self._models.get(name)

    def now(self) -> float:
        return self._clock()

    def endpoint_urls(self) -> set[str]:
        """Every endpoint tracked: ready ones and removed ones with requests in flight."""
        return {url for load in self._models.values() for url in load.replicas}

    def record_demand(self, model: str) -> None:
        self._demand.setdefault(model, DemandWindow()).add(self._clock())

    def pending_demand(self, model: str) -> int:
        window = self._demand.get(model)
        return window.total(self._clock()) if window else 0

    def snapshot(self) -> dict[str, dict]:
        """Per model: totals over its ready endpoints (fresh metrics only), then each endpoint."""
        now, stale = self._clock(), self.settings.stale_after_seconds
        out: dict[str, dict] = {}
        for name, load in self._models.items():
            fresh = [s for s in (r.fresh(now, stale) for r in load.ready) if s is not None]
            kv = [s.kv_usage for s in fresh if s.kv_usage is not None]
            ages = [now - r.scraped.at for r in load.ready if r.scraped is not None]
            out[name] = {
                "replicas": load.replica_count,
                "endpoints_from": "endpointslices" if load.discovered else "config",
                "max_num_seqs": load.max_num_seqs,
                "in_flight": load.in_flight,
                "waiting": sum(s.waiting for s in fresh) if fresh else None,
                "running": sum(s.running for s in fresh) if fresh else None,
                "kv_cache_usage": sum(kv) / len(kv) if kv else None,
                "scrape_age_seconds": max(ages) if ages else None,
                "scrape_errors": sum(r.scrape_errors for r in load.replicas.values()),
                "endpoints": {url: self._replica_snapshot(r, now, stale) for url, r in load.replicas.items()},
            }
        return out

    @staticmethod
    def _replica_snapshot(r: ReplicaLoad, now: float, stale: float) -> dict:
        s = r.fresh(now, stale)
        return {
            "ready": r.ready,
            "replicas": r.endpoint.replicas,
            "in_flight": r.in_flight,
            "metrics": "fresh" if s is not None else "unknown",
            "waiting": s.waiting if s else None,
            "running": s.running if s else None,
            "kv_cache_usage": s.kv_usage if s else None,
            "scrape_age_seconds": (now - r.scraped.at) if r.scraped else None,
            "scrape_errors": r.scrape_errors,
            "last_error": r.last_error,
            "picks": r.picks,
        }

    # --- scraping -------------------------------------------------------------------------------

    def record_scrape(self, model: str, endpoint: str, text: str) -> None:
        """A successful `/metrics` read of one endpoint (ValueError: a malformed exposition)."""
        load = self._models.get(model)
        replica = load.replicas.get(endpoint) if load is not None else None
        if replica is None:
            return
        before, now = replica.scraped, self._clock()
        try:
            replica.scraped = parse_vllm_metrics(text, now)
        except ValueError as exc:
            self.record_scrape_failure(model, endpoint, f"parse: {exc}")
            return
        replica.scrape_failed = False
        generated = replica.scraped.generated
        progressed = generated is not None and (before is None or before.generated != generated)
        if progressed or replica.in_flight == 0 or generated is None:
            replica.progress_at = now

    def record_scrape_failure(self, model: str, endpoint: str, error: str) -> None:
        """A failed read: the endpoint's load is unknown until a read succeeds (never idle)."""
        load = self._models.get(model)
        replica = load.replicas.get(endpoint) if load is not None else None
        if replica is None:
            return
        replica.scrape_failed = True
        replica.scrape_errors += 1
        replica.last_error = error

    def stalled(self, limit: float) -> list[tuple[str, str]]:
        """(model, endpoint) pairs that generated nothing for `limit` seconds while this router had
        requests in flight to them (a hung engine: no token, no error); each reported once per stall."""
        now = self._clock()
        out = []
        for name, load in self._models.items():
            for url, replica in load.replicas.items():
                if replica.in_flight and replica.scraped is not None and now - replica.progress_at > limit:
                    out.append((name, url))
                    replica.progress_at = now
        return out

    def _targets(self) -> list[tuple[str, ReplicaLoad]]:
        return [(name, r) for name, load in self._models.items() for r in load.ready]

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        timeout = max(0.25, min(self.settings.scrape_interval_seconds, 2.0))
        targets = self._targets()
        results = await asyncio.gather(
            *(self._fetch(session, r.endpoint.metrics_url, timeout) for _, r in targets),
            return_exceptions=True,
        )
        for (name, replica), result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                self.record_scrape_failure(name, replica.url, f"{type(result).__name__}: {result}")
            else:
                self.record_scrape(name, replica.url, result)
        if self.on_stall is not None:
            for name, url in self.stalled(self.stall_after):
                self.on_stall(name, url)

    @staticmethod
    async def _fetch(session: aiohttp.ClientSession, url: str, timeout: float) -> str:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout), headers={"accept": "text/plain"}
        ) as response:
            response.raise_for_status()
            return await response.text()

    def wake(self) -> None:
        """Scrape now instead of at the end of the current interval."""
        if self._wake is not None:
            self._wake.set()

    async def _loop(self, session: aiohttp.ClientSession, after_round: Callable[[], object] | None) -> None:
        assert self._wake is not None
        while True:
            started = self._clock()
            self._wake.clear()
            try:
                await self.scrape_once(session)
                if after_round is not None:
                    after_round()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("metrics scrape failed")
            elapsed = self._clock() - started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, self.settings.scrape_interval_seconds - elapsed)):
                    await self._wake.wait()

    def start(self, session: aiohttp.ClientSession, after_round: Callable[[], object] | None = None) -> None:
        """Scrape every ready endpoint every interval (and at once when endpoints are added);
        `after_round` runs after each round (the runtime closes connections to removed endpoints)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._loop(session, after_round), name="tollway-scrape"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._wake = None
