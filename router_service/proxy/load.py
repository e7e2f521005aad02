"""Load signals per backend, and the decision whether a backend is saturated.

Two sources: the router's own in-flight count per model (exact, instant; kept per endpoint, the
server that answers) and each backend's vLLM `/metrics` (queue length and KV-cache use, read every
`scrapeIntervalSeconds`). Scraped values older than `staleAfterSeconds` are ignored, never turned
into errors: the decision then rests on the in-flight count alone.

Between scrapes a burst is seen through the in-flight count: with the backend's real concurrency
known (`maxNumSeqs`, vLLM's --max-num-seqs), the router's own requests beyond it are requests
queued on the backend, and count against `maxWaitingPerReplica` at once, before any scrape says so.

`assess()` is the pure decision; `LoadTracker` is the thin stateful adapter (counters, scrape loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router_service.config import BackendConfig, DegradationSettings

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


@dataclass(frozen=True)
class ScrapedLoad:
    """What one `/metrics` read said about a backend."""

    waiting: float
    running: float
    kv_usage: float | None
    at: float  # clock() when read
    generated: float | None = None  # vllm:generation_tokens_total, when exported


@dataclass(frozen=True)
class LoadVerdict:
    available: bool
    saturated: bool
    reason: str | None
    """"unavailable", "circuit_open", "in_flight", "waiting", "kv_cache" (the first limit crossed)"""
    pressure: float  # the largest signal/threshold ratio; >= 1 means at or over a limit
    queues: bool = False  # one more request would wait for a free sequence slot (maxNumSeqs known)

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
    """Whether a backend can take one more request of this priority.

    Thresholds scale with the replica count and with the priority's headroom (sheddable work sees
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


@dataclass
class _BackendLoad:
    replicas: int
    metrics_url: str
    max_num_seqs: int | None = None
    in_flight_by_endpoint: dict[str, int] = field(default_factory=dict)
    scraped: ScrapedLoad | None = None
    scrape_errors: int = 0
    last_error: str | None = None
    progress_at: float = 0.0  # when it was last seen generating, or idle

    @property
    def in_flight(self) -> int:
        return sum(self.in_flight_by_endpoint.values())


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
    """In-flight counts and scraped vLLM gauges for every backend, plus the scrape loop."""

    def __init__(
        self,
        backends: Iterable[BackendConfig],
        settings: DegradationSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_stall: Callable[[str], None] | None = None  # told of each model `stalled` finds
        self.stall_after = math.inf  # seconds without progress that count as a stall
        self._clock = clock
        self._loads: dict[str, _BackendLoad] = {}
        self._demand: dict[str, DemandWindow] = {}
        self.settings = settings
        self.configure(backends, settings)
        self._task: asyncio.Task[None] | None = None

    def configure(self, backends: Iterable[BackendConfig], settings: DegradationSettings) -> None:
        """Apply a (re)loaded config; keeps the counts of backends that stay."""
        new: dict[str, _BackendLoad] = {}
        for b in backends:
            metrics_url = b.metrics_url or b.url.rstrip("/") + "/metrics"
            old = self._loads.get(b.name)
            if old is not None:
                old.replicas, old.metrics_url, old.max_num_seqs = b.replicas, metrics_url, b.max_num_seqs
                if b.replicas == 0:
                    old.scraped = None
                new[b.name] = old
            else:
                new[b.name] = _BackendLoad(
                    replicas=b.replicas, metrics_url=metrics_url, max_num_seqs=b.max_num_seqs
                )
        self._loads = new
        self.settings = settings
        if settings.stale_after_seconds < settings.scrape_interval_seconds:
            log.warning(
                "degradation.staleAfterSeconds (%s) is shorter than scrapeIntervalSeconds (%s): scraped "
                "load will often be ignored",
                settings.stale_after_seconds,
                settings.scrape_interval_seconds,
            )

    # --- in-flight accounting -------------------------------------------------------------------

    def acquire(self, model: str, endpoint: str) -> None:
        """One more request in flight to `endpoint`, a server of `model`."""
        load = self._loads.get(model)
        if load is not None:
            load.in_flight_by_endpoint[endpoint] = load.in_flight_by_endpoint.get(endpoint, 0) + 1

    def release(self, model: str, endpoint: str) -> None:
        load = self._loads.get(model)
        if load is None:
            return
        count = load.in_flight_by_endpoint.get(endpoint, 0)
        if count > 1:
            load.in_flight_by_endpoint[endpoint] = count - 1
        else:
            load.in_flight_by_endpoint.pop(endpoint, None)

    def in_flight(self, model: str) -> int:
        load = self._loads.get(model)
        return load.in_flight if load else 0

    # --- decisions ------------------------------------------------------------------------------

    def verdict(self, model: str, priority: str = DEFAULT_PRIORITY) -> LoadVerdict:
        load = self._loads.get(model)
        if load is None:
            return LoadVerdict(available=False, saturated=True, reason="unavailable", pressure=math.inf)
        return assess(
            replicas=load.replicas,
            in_flight=load.in_flight,
            scraped=load.scraped,
            settings=self.settings,
            priority=priority,
            now=self._clock(),
            max_num_seqs=load.max_num_seqs,
        )

    def record_demand(self, model: str) -> None:
        self._demand.setdefault(model, DemandWindow()).add(self._clock())

    def pending_demand(self, model: str) -> int:
        window = self._demand.get(model)
        return window.total(self._clock()) if window else 0

    def snapshot(self) -> dict[str, dict]:
        now = self._clock()
        out: dict[str, dict] = {}
        for name, load in self._loads.items():
            s = load.scraped
            fresh = s is not None and now - s.at <= self.settings.stale_after_seconds
            out[name] = {
                "replicas": load.replicas,
                "max_num_seqs": load.max_num_seqs,
                "in_flight": load.in_flight,
                "in_flight_by_endpoint": dict(load.in_flight_by_endpoint),
                "waiting": s.waiting if fresh and s else None,
                "running": s.running if fresh and s else None,
                "kv_cache_usage": s.kv_usage if fresh and s else None,
                "scrape_age_seconds": (now - s.at) if s else None,
                "scrape_errors": load.scrape_errors,
            }
        return out

    # --- scraping -------------------------------------------------------------------------------

    def record_scrape(self, model: str, text: str) -> None:
        load = self._loads.get(model)
        if load is None:
            return
        before, now = load.scraped, self._clock()
        load.scraped = parse_vllm_metrics(text, now)
        generated = load.scraped.generated
        progressed = generated is not None and (before is None or before.generated != generated)
        if progressed or load.in_flight == 0 or generated is None:
            load.progress_at = now

    def stalled(self, limit: float) -> list[str]:
        """Models that generated nothing for `limit` seconds while this router had requests in
        flight to them (a hung engine: no token, no error); each is reported once per stall."""
        now = self._clock()
        out = []
        for name, load in self._loads.items():
            if load.in_flight and load.scraped is not None and now - load.progress_at > limit:
                out.append(name)
                load.progress_at = now
        return out

    async def scrape_once(self, client: httpx.AsyncClient) -> None:
        timeout = max(0.25, min(self.settings.scrape_interval_seconds, 2.0))
        targets = [(name, load) for name, load in self._loads.items() if load.replicas > 0]
        results = await asyncio.gather(
            *(self._fetch(client, load.metrics_url, timeout) for _, load in targets), return_exceptions=True
        )
        for (name, load), result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                load.scrape_errors += 1
                load.last_error = f"{type(result).__name__}: {result}"
                continue
            try:
                self.record_scrape(name, result)
            except ValueError as exc:  # malformed exposition: keep the previous value until it goes stale
                load.scrape_errors += 1
                load.last_error = f"parse: {exc}"
        if self.on_stall is not None:
            for name in self.stalled(self.stall_after):
                self.on_stall(name)

    @staticmethod
    async def _fetch(client: httpx.AsyncClient, url: str, timeout: float) -> str:
        response = await client.get(url, timeout=timeout, headers={"accept": "text/plain"})
        response.raise_for_status()
        return response.text

    async def _loop(self, client: httpx.AsyncClient) -> None:
        while True:
            started = self._clock()
            try:
                await self.scrape_once(client)
            except Exception:  # never let the loop die; the next round tries again
                log.exception("metrics scrape failed")
            elapsed = self._clock() - started
            await asyncio.sleep(max(0.05, self.settings.scrape_interval_seconds - elapsed))

    def start(self, client: httpx.AsyncClient) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(client), name="tollway-scrape")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
