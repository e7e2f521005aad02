"""Prometheus metrics and OpenTelemetry tracing for the router.

Metrics live in one registry per app (several routers can share a process in tests). Counters
and histograms are updated on the request path; gauges that mirror live state (budget left, dual
prices, in-flight, scraped load, demand for models at zero replicas) are read at scrape time by a
collector, so the request path never pays for them.

Tracing is off unless the standard OpenTelemetry variables ask for it: `OTEL_TRACES_EXPORTER`
(otlp / console; `none` keeps it off) or `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true` wins over both. The exporter reads
its own `OTEL_*` settings (endpoint, headers, service name via `OTEL_SERVICE_NAME`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router_service.proxy.breaker import STATE_VALUES
from router_service.store.base import StoreHealth

log = logging.getLogger("tollway.telemetry")

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LiveState:
    """What the scrape-time collector reads (built by the app on every scrape)."""

    budget_remaining: Mapping[str, float]
    budget_total: Mapping[str, float]
    dual_price: Mapping[str, float]
    load: Mapping[str, Mapping[str, Any]]
    pending_demand: Mapping[str, int]
    ready: bool
    circuits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Circuit breaker per endpoint: {"model", "state", "trips", ...} (see proxy/breaker.py)."""
    store: StoreHealth | None = None


def _add_per_model(family: GaugeMetricFamily, values: Mapping[str, float]) -> None:
    """One sample per model; infinite values (a model without a budget) are left out."""
    for model, value in values.items():
        if math.isfinite(value):
            family.add_metric([model], value)


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveState | None]) -> None:
        self._read = read

    def describe(self) -> list:
        return []  # read lazily: never called at registration time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._read()
        if state is None:
            return
        remaining = GaugeMetricFamily(
            "tollway_budget_remaining_tokens",
            "Tokens left in this window's budget as this replica sees it (models with a budget): the "
            "whole policy's with a shared store, its local share while that store is unreachable.",
            labels=["model"],
        )
        total = GaugeMetricFamily(
            "tollway_budget_tokens",
            "The token budget per window this replica enforces (the whole budget with a shared store).",
            labels=["model"],
        )
        _add_per_model(remaining, state.budget_remaining)
        _add_per_model(total, state.budget_total)
        dual = GaugeMetricFamily(
            "tollway_dual_price",
            "Dual price (gamma) per model: the value of one unit of its budget.",
            labels=["model"],
        )
        for model, value in state.dual_price.items():
            dual.add_metric([model], float(value))
        in_flight = GaugeMetricFamily(
            "tollway_in_flight", "Requests this router has in flight.", labels=["model"]
        )
        replicas = GaugeMetricFamily(
            "tollway_backend_replicas",
            "Ready replicas per model (its endpoints that take new requests, from the config or EndpointSlices).",
            labels=["model"],
        )
        signal = GaugeMetricFamily(
            "tollway_backend_load",
            "Scraped vLLM load per model over its replicas with fresh metrics (waiting and running summed, kv_cache_usage averaged).",
            labels=["model", "signal"],
        )
        age = GaugeMetricFamily(
            "tollway_backend_scrape_age_seconds",
            "Age of the last successful /metrics read.",
            labels=["model"],
        )
        ep_ready = GaugeMetricFamily(
            "tollway_endpoint_ready",
            "Per replica endpoint: 1 while it takes new requests, 0 while requests finish on a removed one.",
            labels=["model", "endpoint"],
        )
        ep_in_flight = GaugeMetricFamily(
            "tollway_endpoint_in_flight",
            "Requests this router has in flight per replica.",
            labels=["model", "endpoint"],
        )
        ep_fresh = GaugeMetricFamily(
            "tollway_endpoint_metrics_fresh",
            "1 when the replica's last /metrics read succeeded within staleAfterSeconds, 0 when its load is unknown.",
            labels=["model", "endpoint"],
        )
        ep_signal = GaugeMetricFamily(
            "tollway_endpoint_load",
            "Scraped vLLM load per replica (waiting, running, kv_cache_usage), fresh values only.",
            labels=["model", "endpoint", "signal"],
        )
        ep_picks = CounterMetricFamily(
            "tollway_endpoint_picks",
            "Requests sent to each replica (the replica picker's decisions).",
            labels=["model", "endpoint"],
        )
        for model, load in state.load.items():
            in_flight.add_metric([model], load["in_flight"])
            replicas.add_metric([model], load["replicas"])
            for key in ("waiting", "running", "kv_cache_usage"):
                if load.get(key) is not None:
                    signal.add_metric([model, key], load[key])
            if load.get("scrape_age_seconds") is not None:
                age.add_metric([model], load["scrape_age_seconds"])
            for endpoint, ep in (load.get("endpoints") or {}).items():
                labels = [model, endpoint]
                ep_ready.add_metric(labels, 1.0 if ep["ready"] else 0.0)
                ep_in_flight.add_metric(labels, ep["in_flight"])
                ep_fresh.add_metric(labels, 1.0 if ep["metrics"] == "fresh" else 0.0)
                ep_picks.add_metric(labels, float(ep["picks"]))
                for key in ("waiting", "running", "kv_cache_usage"):
                    if ep.get(key) is not None:
                        ep_signal.add_metric([*labels, key], ep[key])
        demand = GaugeMetricFamily(
            "tollway_model_pending_demand",
            "Requests in the last 60 s that wanted this model while it had no replicas (scale-from-zero signal).",
            labels=["model"],
        )
        for model, value in state.pending_demand.items():
            demand.add_metric([model], value)
        ready = GaugeMetricFamily("tollway_ready", "1 when the router is ready to serve.")
        ready.add_metric([], 1.0 if state.ready else 0.0)
        circuit = GaugeMetricFamily(
            "tollway_circuit_state",
            "Circuit breaker per backend endpoint: 0 closed (serving), 1 half-open (probing), 2 open (no work).",
            labels=["model", "endpoint"],
        )
        trips = CounterMetricFamily(
            "tollway_circuit_trips",
            "Times a backend endpoint's circuit breaker opened.",
            labels=["model", "endpoint"],
        )
        for endpoint, info in state.circuits.items():
            labels = [str(info.get("model") or ""), endpoint]
            circuit.add_metric(labels, STATE_VALUES.get(info["state"], 0))
            trips.add_metric(labels, float(info.get("trips", 0)))
        yield from (remaining, total, dual, in_flight, replicas, signal, age, demand, ready, circuit, trips)
        yield from (ep_ready, ep_in_flight, ep_fresh, ep_signal, ep_picks)
        if state.store is not None:
            yield from _store_metrics(state.store)


def _store_metrics(health: StoreHealth) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    up = GaugeMetricFamily(
        "tollway_state_store_up",
        "1 when the state store answers (always for the in-process store); 0 while Redis is "
        "unreachable and this replica serves on its local budget share.",
        labels=["store"],
    )
    up.add_metric([health.kind], 1.0 if health.connected else 0.0)
    pending = GaugeMetricFamily(
        "tollway_state_store_pending_operations", "Budget and learning writes waiting for the shared store."
    )
    pending.add_metric([], health.pending_operations)
    live = GaugeMetricFamily(
        "tollway_state_store_live_replicas", "Router replicas of this policy seen alive by the shared store."
    )
    live.add_metric([], health.live_replicas)
    outages = CounterMetricFamily(
        "tollway_state_store_outages", "Times the shared store became unreachable (local-share mode began)."
    )
    outages.add_metric([], health.outages)
    errors = CounterMetricFamily("tollway_state_store_errors", "Failed calls to the shared store.")
    errors.add_metric([], health.errors)
    share = GaugeMetricFamily(
        "tollway_state_store_local_share_tokens",
        "While the shared store is unreachable: tokens this replica may still spend per model.",
        labels=["model"],
    )
    _add_per_model(share, health.local_share)
    yield from (up, pending, live, outages, errors, share)


class RouterMetrics:
    """Every metric the router exports, in its own registry."""

    def __init__(self, read_live: Callable[[], LiveState | None] | None = None) -> None:
        disable_created_metrics()  # no `_created` twin for every series: half the scrape size
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "tollway_requests",
            "Requests by served model, route (routed/degraded/fallback/pinned/none) and outcome.",
            ["model", "route", "outcome"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "tollway_routing_decision_seconds",
            "Time to choose a model (embedding, neighbour search, scoring, filters).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "tollway_upstream_seconds",
            "Upstream call duration per model: stage first_byte (response headers) and total.",
            ["model", "stage"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.degradations = Counter(
            "tollway_degradations",
            "Requests served by a lower-ranked model, by the model passed over and why.",
            ["from_model", "to_model", "reason"],
            registry=r,
        )
        self.sheds = Counter(
            "tollway_sheds",
            "Requests refused (429/503) by reason and priority.",
            ["reason", "priority"],
            registry=r,
        )
        self.retries = Counter(
            "tollway_upstream_retries",
            "Requests retried on another model after an upstream failure before the first byte.",
            ["from_model", "reason"],
            registry=r,
        )
        self.demand = Counter(
            "tollway_model_demand",
            "Requests that wanted this model (ranked above the one that served, or pinned) while it had no replicas.",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "tollway_tokens",
            "Tokens served per model, kind prompt/completion.",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "tollway_cost_usd", "Cost of served tokens at the configured prices.", ["model"], registry=r
        )
        self.reloads = Counter(
            "tollway_config_reloads", "Config reloads by outcome.", ["outcome"], registry=r
        )
        if read_live is not None:
            r.register(_LiveCollector(read_live))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the label sets are few (models x routes x outcomes) and
        `labels()` validates and locks on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


# --- tracing ------------------------------------------------------------------------------------

_tracing_configured = False


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for trace export."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(env: Mapping[str, str] | None = None) -> bool:
    """Install a global tracer provider when the environment asks for one; True when tracing is on.

    Idempotent within a process. Without it, spans go to OpenTelemetry's no-op tracer.
    """
    global _tracing_configured
    env = os.environ if env is None else env
    if _tracing_configured:
        return True
    if not tracing_requested(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter_name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in exporter_name.split(",")):
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name in {"otlp", "otlp_proto_http"}:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console); ignored", name)
    if not exporters:
        return False
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "tollway-router")})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracing_configured = True
    log.info("OpenTelemetry tracing on (%s)", exporter_name)
    return True


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    if provider is not None:
        return provider.get_tracer("tollway.router")
    return trace.get_tracer("tollway.router")


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if _tracing_configured and callable(shutdown):
        shutdown()
