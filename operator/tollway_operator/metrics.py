"""The operator's own Prometheus metrics (reconciles, errors, durations, child changes)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("tollway.operator.metrics")

RECONCILES = Counter(
    "tollway_operator_reconciles_total",
    "Reconciles of tollway custom resources, by kind, trigger and result.",
    ["kind", "trigger", "result"],
)
ERRORS = Counter(
    "tollway_operator_reconcile_errors_total",
    "Reconciles that failed, by kind and reason (InvalidSpec, PoolNotFound, ApiError, ...).",
    ["kind", "reason"],
)
DURATION = Histogram(
    "tollway_operator_reconcile_duration_seconds",
    "Wall time of one reconcile, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHILD_CHANGES = Counter(
    "tollway_operator_child_changes_total",
    "Children the operator created, updated (incl. drift repairs) or deleted, by kind and action.",
    ["kind", "action"],
)
MANAGED = Gauge(
    "tollway_operator_managed_objects", "Custom resources the operator currently manages, by kind.", ["kind"]
)

_server: Any = None
_lock = threading.Lock()


def serve(port: int, host: str = "0.0.0.0") -> int:
    """Expose /metrics on `port` (0: any free port); returns the bound port. Idempotent."""
    global _server
    with _lock:
        if _server is None:
            server, _thread = start_http_server(port, addr=host)
            _server = server
            log.info("operator metrics on http://%s:%d/metrics", host, server.server_port)
        return int(_server.server_port)


def shutdown() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            _server = None
