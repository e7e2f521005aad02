"""A model's endpoints from its config (url / urls) and from EndpointSlices, as pure functions."""

from __future__ import annotations

from typing import Any

from router_service.config import BackendConfig, EndpointSliceSource
from router_service.proxy.endpoints import (
    Endpoint,
    endpoints_from_slices,
    static_endpoints,
    takes_new_requests,
)

SOURCE = EndpointSliceSource(service="chat-large", namespace="team-a")


def endpoint(address: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [address], "conditions": conditions}


def eps_slice(
    *endpoints: dict[str, Any], port: int = 8000, name: str = "http", kind: str = "IPv4"
) -> dict[str, Any]:
    return {"addressType": kind, "endpoints": list(endpoints), "ports": [{"name": name, "port": port}]}


def test_static_endpoints_from_url_and_urls() -> None:
    one = BackendConfig(name="m", url="http://svc:8000/", profile="p", replicas=3)
    assert static_endpoints(one) == (Endpoint("http://svc:8000", "http://svc:8000/metrics", replicas=3),)
    scaled_to_zero = BackendConfig(name="m", url="http://svc:8000", profile="p", replicas=0)
    assert static_endpoints(scaled_to_zero) == ()
    custom = BackendConfig(name="m", url="http://svc:8000", profile="p", metricsUrl="http://svc:9000/m")
    assert static_endpoints(custom)[0].metrics_url == "http://svc:9000/m"
    many = BackendConfig(name="m", urls=["http://a:1", "http://b:1/"], profile="p")
    assert many.replicas == 2
    assert static_endpoints(many) == (
        Endpoint("http://a:1", "http://a:1/metrics"),
        Endpoint("http://b:1", "http://b:1/metrics"),
    )


def test_ready_means_ready_or_unset_and_not_terminating() -> None:
    assert takes_new_requests({"ready": True})
    assert takes_new_requests({}) and takes_new_requests(None)  # the API: unset ready is ready
    assert not takes_new_requests({"ready": False})
    assert not takes_new_requests({"ready": False, "serving": True, "terminating": True})  # draining
    assert not takes_new_requests({"ready": True, "terminating": True})


def test_endpoints_from_slices_keep_ready_pods_only() -> None:
    s = eps_slice(
        endpoint("10.0.0.2", ready=True),
        endpoint("10.0.0.1"),
        endpoint("10.0.0.3", ready=False),  # starting
        endpoint("10.0.0.4", ready=False, serving=True, terminating=True),  # draining
    )
    assert [e.url for e in endpoints_from_slices([s], SOURCE)] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
    ]
    assert endpoints_from_slices([s], SOURCE)[0].metrics_url == "http://10.0.0.1:8000/metrics"


def test_each_slice_has_its_own_port_and_a_slice_without_the_named_port_is_skipped() -> None:
    a = eps_slice(endpoint("127.0.0.1"), port=9001)
    b = eps_slice(endpoint("127.0.0.1"), port=9002)
    other = eps_slice(endpoint("10.0.0.9"), name="grpc")
    urls = [e.url for e in endpoints_from_slices([a, b, other], SOURCE)]
    assert urls == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def test_an_address_in_two_slices_counts_once_and_only_if_every_listing_is_ready() -> None:
    old = eps_slice(endpoint("10.0.0.1", ready=True))
    moved = eps_slice(endpoint("10.0.0.1", ready=False, terminating=True))
    assert endpoints_from_slices([old, old], SOURCE) == (
        Endpoint("http://10.0.0.1:8000", "http://10.0.0.1:8000/metrics"),
    )
    assert endpoints_from_slices([old, moved], SOURCE) == ()


def test_ipv6_and_malformed_entries() -> None:
    v6 = eps_slice(endpoint("fd00::5"), kind="IPv6")
    assert [e.url for e in endpoints_from_slices([v6], SOURCE)] == ["http://[fd00::5]:8000"]
    junk: list[dict[str, Any]] = [
        {"endpoints": [endpoint("10.0.0.1")]},  # no ports
        eps_slice({"addresses": []}, {"conditions": {"ready": True}}),  # no address
        {
            "ports": [{"name": "http", "port": "8000"}],
            "endpoints": [endpoint("10.0.0.2")],
        },  # port not a number
    ]
    assert endpoints_from_slices(junk, SOURCE) == ()
    https = EndpointSliceSource(service="s", namespace="n", scheme="https", portName="api")
    assert endpoints_from_slices([eps_slice(endpoint("10.0.0.1"), name="api", port=443)], https)[0].url == (
        "https://10.0.0.1:443"
    )
