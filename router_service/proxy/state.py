"""The router's state: what one config generation defines, and what outlives reloads.

`RouterState` is immutable and built whole from one `RouterConfig` (resolved backends, routing
engine, accepted tokens, the `/v1/models` answer). A reload builds a new one off the event loop
and swaps a single reference, so a request in flight keeps the generation it started with.

`Runtime` holds what outlives reloads: the budget ledger (resized, never rebuilt, so spent
budget stays spent) over the state store (in-process, or Redis shared by every replica), the sync
that keeps the engine in step with the store (dual prices, learned entries), the load tracker
(every model's endpoints and their load), the EndpointSlice discovery, the circuit breakers (one
per endpoint), the connection pools (one per endpoint), the metrics and the open streams. `drain`
is the graceful part of a shutdown.

Calibrations live in the store too. A new one (pushed to this replica, or seen by the sync) that
changes what the engine's backends are routed with builds a new generation, as a config change
of the history would: off the event loop, then swapped in (`rebuild_for_calibrations`). Config
reloads and these rebuilds take turns (`rebuild_lock`), so neither undoes the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from router_service.config import EndpointSliceSource, RouterConfig
from router_service.proxy.breaker import Breakers
from router_service.proxy.connections import Connections
from router_service.proxy.discovery import Discovery, KubeAccess
from router_service.proxy.load import LoadTracker
from router_service.proxy.telemetry import LiveState, RouterMetrics
from router_service.proxy.upstream import Backend
from router_service.routing.calibrated import fingerprint as calibration_fingerprint
from router_service.routing.ledger import BudgetLedger
from router_service.store.base import Calibration, LearnedEntry, state_url
from router_service.store.sync import EngineSync

log = logging.getLogger("tollway.router")


class Engine(Protocol):
    """What the router needs from `router_service.routing.engine.RoutingEngine`."""

    gamma: dict[str, float]

    def rank(self, prompt: str, priority: str | None = None) -> Any: ...


EngineFactory = Callable[[RouterConfig, BudgetLedger], Engine]

# Config blocks the routing engine is built from; when none of them changes, a reload keeps the
# engine (and what it learned) as it is. Budget sizes and this replica's share are not among
# them: the engine reads budgets from the ledger, which a reload resizes, and takes a new share
# in place (scaling the router must not rebuild every engine).
_ENGINE_FIELDS = ("objective", "history", "embedding", "ann", "estimator", "learning")


def default_engine_factory(config: RouterConfig, ledger: BudgetLedger) -> Engine:
    from router_service.routing.engine import RoutingEngine

    return RoutingEngine.from_config(config, ledger, calibrations=ledger.store.calibrations())


def engine_inputs(config: RouterConfig, calibrations: str = "") -> str:
    """A stable fingerprint of what the engine depends on (reuse it when unchanged);
    `calibrations`: the fingerprint of the calibrations its backends are routed with."""
    parts: dict[str, Any] = {f: getattr(config, f).model_dump(mode="json") for f in _ENGINE_FIELDS}
    # The expected calibration revision is an input too: the engine checks new calibrations against
    # its own config's revisions, so it must be rebuilt when they change.
    parts["backends"] = [
        (b.name, b.profile, b.price.model_dump(mode="json"), b.calibration_revision) for b in config.backends
    ]
    parts["calibrations"] = calibrations
    return json.dumps(parts, sort_keys=True)


def read_tokens(path: str | None) -> frozenset[str] | None:
    """Accepted bearer tokens: one per line, blank lines and `#` comments ignored; None: no auth."""
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"auth.bearerTokensFile {path!r} cannot be read: {exc}") from exc
    tokens = frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
    )
    if not tokens:
        raise ValueError(f"auth.bearerTokensFile {path!r} holds no token")
    return tokens


def token_accepted(tokens: frozenset[str], offered: str) -> bool:
    """Constant-time comparison against every accepted token."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(token.encode(), offered.encode())
    return found


def models_listing(config: RouterConfig, created: int) -> bytes:
    """The `/v1/models` answer: the served (routed) name first, then each backend."""
    data = [
        {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "tollway",
            "tollway": {"routed": True, "models": [b.name for b in config.backends]},
        }
    ]
    for b in config.backends:
        data.append(
            {
                "id": b.name,
                "object": "model",
                "created": created,
                "owned_by": "tollway",
                "tollway": {
                    "routed": False,
                    "profile": b.profile,
                    "capabilities": list(b.capabilities),
                    "replicas": b.replicas,
                    "endpoints": "endpointslices" if b.endpoint_slices is not None else "config",
                    "price": b.price.to_wire(),
                },
            }
        )
    return json.dumps({"object": "list", "data": data}).encode()


@dataclass(frozen=True)
class RouterState:
    config: RouterConfig
    engine: Engine
    engine_key: str
    backends: dict[str, Backend]
    tokens: frozenset[str] | None
    models_body: bytes
    generation: int

    @property
    def names(self) -> list[str]:
        return list(self.backends)


def build_state(
    config: RouterConfig,
    engine_factory: EngineFactory,
    ledger: BudgetLedger,
    previous: RouterState | None = None,
    engine: Engine | None = None,
) -> RouterState:
    """A complete state for `config` (may take seconds: runs the engine build)."""
    backends = {b.name: Backend.from_config(b) for b in config.backends}
    tokens = read_tokens(config.auth.bearer_tokens_file)
    key = engine_inputs(config, calibration_fingerprint(ledger.store.calibrations(), config.backends))
    if engine is None:
        engine = (
            previous.engine
            if previous is not None and previous.engine_key == key
            else engine_factory(config, ledger)
        )
    return RouterState(
        config=config,
        engine=engine,
        engine_key=key,
        backends=backends,
        tokens=tokens,
        models_body=models_listing(config, int(time.time())),
        generation=(previous.generation + 1) if previous else 1,
    )


def slice_sources(config: RouterConfig) -> dict[str, EndpointSliceSource]:
    """The models whose endpoints come from EndpointSlices, and where."""
    return {b.name: b.endpoint_slices for b in config.backends if b.endpoint_slices is not None}


class Runtime:
    """Everything the request handlers share."""

    def __init__(
        self,
        state: RouterState,
        ledger: BudgetLedger,
        *,
        clock: Callable[[], float] = time.monotonic,
        kube: KubeAccess | None = None,
        state_url_override: str | None = None,
        engine_factory: EngineFactory = default_engine_factory,
    ) -> None:
        config = state.config
        self.state = state
        self.engine_factory = engine_factory
        self.rebuild_lock = asyncio.Lock()
        """Held while a new generation is built and swapped in (config reloads, calibrations)."""
        self._rebuild_task: asyncio.Task[None] | None = None
        self.clock = clock
        self.ledger = ledger
        self.store = ledger.store
        self.sync = EngineSync(self.store, config.state.sync_interval_seconds)
        self.sync.on_calibrations_outdated = self.schedule_calibration_rebuild
        self._state_url_override = state_url_override
        self._store_url = state_url(config, state_url_override)
        self._sync_task: asyncio.Task[None] | None = None
        self.load = LoadTracker(config.backends, config.degradation, clock=clock)
        self.breakers = Breakers(config.degradation.circuit_breaker, clock=clock)
        self.connections = Connections(config.server)
        self.discovery = Discovery(kube, self.load.set_endpoints)
        self.discovery.configure(slice_sources(config))
        self.load.on_stall = self.endpoint_stalled
        self.load.stall_after = config.server.first_byte_timeout_seconds
        self.metrics = RouterMetrics(self.live_state)
        self.rng = random.Random()
        self.control: aiohttp.ClientSession | None = None  # metric scrapes
        self.ready = False
        self.draining = False
        self.active = 0  # requests inside the request path (streams being relayed: `streams`)
        self.streams: set[Any] = set()  # open `forward.Relay`s
        self._budget_event: asyncio.Event | None = None
        self._rank_pool: ThreadPoolExecutor | None = None
        self._sweeping: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.control = aiohttp.ClientSession()
        self.load.start(self.control, after_round=self.sweep)
        self.discovery.start()
        self.store.start()
        await self.sync.step(self.state.engine)  # shared prices and learned entries before serving
        self._sync_task = asyncio.get_running_loop().create_task(
            self.sync.run(lambda: self.state.engine), name="tollway-state-sync"
        )
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.discovery.stop()
        for task in (self._sync_task, self._rebuild_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.load.stop()
        if self._sweeping is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
        await self.connections.close()
        if self.control is not None:
            await self.control.close()
        if self._rank_pool is not None:
            self._rank_pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.state.engine, "close", None)
        if callable(close):
            await asyncio.to_thread(close)  # let a running dual-price fit finish
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.sync.step(self.state.engine)  # publish a fit that just finished
        self.ledger.save()
        await asyncio.to_thread(self.store.close)  # writes what is queued for Redis

    def sweep(self) -> None:
        """After every scrape round: endpoints that left their model's set and have nothing in
        flight lose their connection pool and circuit breaker."""
        in_use = self.load.endpoint_urls()
        self.breakers.configure(self.state.config.degradation.circuit_breaker, in_use)
        if any(e not in in_use for e in self.connections.endpoints()) and (
            self._sweeping is None or self._sweeping.done()
        ):
            self._sweeping = asyncio.get_running_loop().create_task(self.connections.close_unused(in_use))

    def endpoint_stalled(self, model: str, endpoint: str) -> None:
        """A replica generated nothing for a first-byte limit with requests in flight: open its
        circuit (the requests waiting on it go elsewhere)."""
        log.warning(
            "%s at %s generated nothing for %.1f s with requests in flight: circuit opened",
            model,
            endpoint,
            self.load.stall_after,
        )
        self.breakers.trip(endpoint)

    async def drain(self, seconds: float) -> None:
        """The graceful part of a shutdown: /readyz answers 503 from now on while requests in flight
        get up to `seconds` to finish; streams still open then end with an error event."""
        self.draining = True
        deadline = time.monotonic() + seconds
        while (self.active or self.streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.streams):
            relay.stop("shutdown")
        give_up = time.monotonic() + 2.0  # they only have an error event left to write
        while self.streams and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        if self.streams or self.active:
            log.warning(
                "drain ended with %d streams and %d requests still open", len(self.streams), self.active
            )

    # --- budget waits ---------------------------------------------------------------------------

    def budget_changed(self) -> None:
        """A reservation was settled or released: wake the requests waiting for budget."""
        event, self._budget_event = self._budget_event, None
        if event is not None:
            event.set()

    async def wait_budget_change(self, timeout: float) -> None:
        """Until the next `budget_changed` or `timeout` seconds."""
        if self._budget_event is None:
            self._budget_event = asyncio.Event()
        event = self._budget_event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await event.wait()

    # --- config generations ---------------------------------------------------------------------

    async def prepare(self, state: RouterState) -> None:
        """Bring a new generation's engine up to date with the store before it serves."""
        if state.engine is not self.state.engine:
            await self.sync.step(state.engine)

    def apply(self, state: RouterState) -> None:
        """Swap to a new generation; budgets carry over, load counts of kept backends too."""
        config = state.config
        wanted = state_url(config, self._state_url_override)
        if wanted != self._store_url:
            log.warning("state.url changed in the config; the router keeps its store until it restarts")
            self._store_url = wanted
        self.ledger.resize(config.budgets)
        rescale = getattr(state.engine, "set_replica_share", None)
        if callable(rescale):
            rescale(config.budgets.replica_share)
        self.load.configure(config.backends, config.degradation)
        self.discovery.configure(slice_sources(config))
        self.load.stall_after = config.server.first_byte_timeout_seconds
        self.connections.configure(config.server)
        self.breakers.configure(config.degradation.circuit_breaker, self.load.endpoint_urls())
        self.state = state

    async def learn(self, entry: LearnedEntry) -> None:
        """A learned history entry from this replica: into the store, and into the engine now."""
        self.store.append_learned(entry)
        await self.sync.step(self.state.engine)

    # --- calibrations ---------------------------------------------------------------------------

    async def ingest_calibration(self, calibration: Calibration) -> bool:
        """A pushed calibration: into the store (durably; raises StoreUnavailable when it cannot
        be written), then in use by this replica before returning (the others: within the sync
        bound plus their own rebuild). Returns whether the current engine routes with it."""
        await asyncio.to_thread(self.store.put_calibration, calibration)
        await self.rebuild_for_calibrations()
        return calibration.model in (getattr(self.state.engine, "calibrated", None) or {})

    def schedule_calibration_rebuild(self) -> None:
        """The sync saw calibrations the engine does not route with: rebuild, once at a time."""
        if self._rebuild_task is not None and not self._rebuild_task.done():
            return
        self._rebuild_task = asyncio.get_running_loop().create_task(
            self.rebuild_for_calibrations(), name="tollway-calibration-rebuild"
        )

    async def rebuild_for_calibrations(self) -> None:
        """Build a new generation when the store's calibrations would route the backends
        differently from the current engine; never raises (a failed build keeps the old one)."""
        async with self.rebuild_lock:
            state = self.state
            outdated = getattr(state.engine, "calibration_outdated", None)
            if outdated is None or not outdated(self.store.calibrations()):
                return
            try:
                new = await asyncio.to_thread(
                    build_state, state.config, self.engine_factory, self.ledger, state
                )
            except Exception:
                log.exception(
                    "building the routing engine with the new calibrations failed; keeping the old one"
                )
                return
            await self.prepare(new)
            self.apply(new)
            calibrated = sorted(getattr(new.engine, "calibrated", None) or {})
            log.info(
                "routing engine rebuilt with calibrations (generation %d): calibrated %s",
                new.generation,
                ", ".join(calibrated) or "none",
            )

    # --- routing decision off the loop for slow embedders ---------------------------------------

    async def rank(self, state: RouterState, prompt: str, priority: str) -> Any:
        """The engine's ranking; inline for the hashed embedder (sub-ms), else on one worker thread."""
        if state.config.embedding.kind == "hashed":
            return state.engine.rank(prompt, priority)
        if self._rank_pool is None:
            self._rank_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-rank")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._rank_pool, state.engine.rank, prompt, priority)

    # --- metrics --------------------------------------------------------------------------------

    def live_state(self) -> LiveState:
        state = self.state
        remaining: dict[str, float] = {}
        totals: dict[str, float] = {}
        for name in state.backends:
            budget = self.ledger.budget(name)
            if math.isfinite(budget):
                totals[name] = budget
                remaining[name] = self.ledger.remaining(name)
        gamma = getattr(state.engine, "gamma", {}) or {}
        return LiveState(
            budget_remaining=remaining,
            budget_total=totals,
            dual_price={m: float(v) for m, v in dict(gamma).items()},
            load=self.load.snapshot(),
            pending_demand={m: self.load.pending_demand(m) for m in state.backends},
            ready=self.ready and not self.draining,
            circuits=self.circuits(),
            store=self.store.health(),
        )

    def circuits(self) -> dict[str, dict[str, Any]]:
        """Circuit breaker state per endpoint, with the model it serves."""
        models = {}
        for name in self.state.backends:
            load = self.load.model(name)
            models.update(dict.fromkeys(load.replicas if load is not None else (), name))
        return {
            endpoint: {"model": models.get(endpoint), **info}
            for endpoint, info in self.breakers.snapshot().items()
        }

    def status(self) -> dict:
        """JSON for `GET /v1/tollway/status`: what the router sees right now."""
        state = self.state
        engine = state.engine
        return {
            "generation": state.generation,
            "served_model_name": state.config.served_model_name,
            "ready": self.ready and not self.draining,
            "engine": engine.status() if callable(getattr(engine, "status", None)) else None,
            "gamma": {m: float(v) for m, v in dict(getattr(engine, "gamma", {}) or {}).items()},
            "budgets": self.ledger.snapshot(),
            "state": self.store.health().to_json(),
            "load": self.load.snapshot(),
            "pending_demand": {m: self.load.pending_demand(m) for m in state.backends},
            "circuits": self.circuits(),
            "discovery": self.discovery.status(),
            "endpoint_picker": state.config.endpoint_picker.strategy,
            "open_streams": len(self.streams),
            "calibrations": self.calibrations(),
        }

    def calibrations(self) -> dict[str, dict[str, Any]]:
        """Per model: the calibration the store holds, and whether the engine routes with it."""
        used = getattr(self.state.engine, "calibrated", None) or {}
        expected = {b.name: b.calibration_revision for b in self.state.config.backends}
        out: dict[str, dict[str, Any]] = {}
        for model, c in sorted(self.store.calibrations().items()):
            if model in used:
                why = "in use"
            elif model not in expected:
                why = "no backend of that name in this router's config"
            else:
                why = f"the backend expects calibration revision {expected[model]!r}"
            out[model] = {
                "revision": c.revision,
                "dataset": c.dataset,
                "lines": len(c.rows),
                "digest": c.digest,
                "inUse": model in used,
                "detail": why,
            }
        return out
