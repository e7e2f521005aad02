"""Where a model's replicas are: its endpoints, from the router's config or from the cluster.

An `Endpoint` is one address the router sends requests to: a pod (inside a cluster, read from the
EndpointSlices of the model's Service), one of a backend's static `urls`, or a backend's single
`url` (a Service, a load balancer or an external API, standing for `replicas` servers). The request
path picks one endpoint per request (`picker.py`); load, circuit breakers and connections are kept
per endpoint.

`static_endpoints` reads a backend's config; `endpoints_from_slices` reads EndpointSlice objects.
Both are pure; the watch that fetches the slices is `discovery.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from router_service.config import BackendConfig, EndpointSliceSource

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""The label every EndpointSlice of a Service carries (set by the EndpointSlice controller)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address that answers a model's requests."""

    url: str
    """Base URL without /v1 and without a trailing slash."""
    metrics_url: str
    replicas: int = 1
    """Servers behind this address: 1 for a pod or a static replica, `replicas` for a Service URL."""


def static_endpoints(backend: BackendConfig) -> tuple[Endpoint, ...]:
    """A backend's endpoints as its config lists them (a `url` with 0 replicas has none)."""
    if backend.urls is not None:
        return tuple(Endpoint(u.rstrip("/"), u.rstrip("/") + "/metrics") for u in backend.urls)
    assert backend.url is not None  # one of url / urls, enforced by BackendConfig
    if backend.replicas <= 0:
        return ()
    url = backend.url.rstrip("/")
    return (Endpoint(url, backend.metrics_url or url + "/metrics", backend.replicas),)


def takes_new_requests(conditions: Mapping[str, Any] | None) -> bool:
    """An EndpointSlice endpoint may get new requests when it is ready and not terminating.

    The API defines an unset `ready` as ready and an unset `terminating` as not terminating. A
    terminating pod may still be `serving` (finishing what it has); it gets nothing new.
    """
    conditions = conditions or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def _slice_port(ports: Any, name: str) -> int | None:
    for port in ports or []:
        if isinstance(port, Mapping) and isinstance(port.get("port"), int) and port.get("name") == name:
            return port["port"]
    return None


def _host(address: str, address_type: str | None) -> str:
    return f"[{address}]" if address_type == "IPv6" or ":" in address else address


def endpoints_from_slices(
    slices: Iterable[Mapping[str, Any]], source: EndpointSliceSource
) -> tuple[Endpoint, ...]:
    """The pods of a Service that may take new requests, one endpoint per address, sorted.

    Each slice carries its own port list: the port named `source.port_name` (the Service port's
    name) gives the pod's port; a slice without it is skipped. Of an endpoint's addresses the first is used (the
    API calls them fungible). An address listed by two slices (the controller moving endpoints
    between slices) counts once; it takes new requests only when every listing says so.
    """
    found: dict[str, bool] = {}
    for s in slices:
        port = _slice_port(s.get("ports"), source.port_name)
        if port is None:
            continue
        address_type = s.get("addressType")
        for ep in s.get("endpoints") or []:
            addresses = ep.get("addresses") if isinstance(ep, Mapping) else None
            if not addresses or not isinstance(addresses[0], str):
                continue
            url = f"{source.scheme}://{_host(addresses[0], address_type)}:{port}"
            found[url] = found.get(url, True) and takes_new_requests(ep.get("conditions"))
    return tuple(Endpoint(url, url + "/metrics") for url in sorted(found) if found[url])
