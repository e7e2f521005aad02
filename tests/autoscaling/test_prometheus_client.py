"""The Prometheus client maps every failure to Unavailable / QueryError / NoData."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tollway_operator.prometheus import (
    NoData,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
)


def mock(handler) -> PrometheusClient:  # type: ignore[no-untyped-def]
    return PrometheusClient("http://prom:9090", transport=httpx.MockTransport(handler))


def ok(result_type: str, result: object) -> httpx.Response:
    return httpx.Response(
        200, json={"status": "success", "data": {"resultType": result_type, "result": result}}
    )


async def test_vector_value_is_the_sum_and_query_is_sent() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/query"
        seen.append(dict(httpx.QueryParams(request.content.decode()))["query"])
        return ok(
            "vector",
            [{"metric": {"pod": "a"}, "value": [1.0, "3"]}, {"metric": {"pod": "b"}, "value": [1.0, "4.5"]}],
        )

    async with mock(handler) as client:
        assert await client.value('sum(vllm:x{model_name="m"})') == 7.5
    assert seen == ['sum(vllm:x{model_name="m"})']


async def test_scalar_result() -> None:
    async with mock(lambda r: ok("scalar", [1.0, "2"])) as client:
        assert await client.value("vector(2)") == 2.0


async def test_empty_and_nan_results_are_no_data() -> None:
    async with mock(lambda r: ok("vector", [])) as client:
        with pytest.raises(NoData, match="no data for"):
            await client.value("sum(nothing)")
    async with mock(lambda r: ok("vector", [{"metric": {}, "value": [1.0, "NaN"]}])) as client:
        with pytest.raises(NoData):
            await client.value("x / 0")


async def test_bad_query_is_a_query_error_with_prometheus_message() -> None:
    body = {"status": "error", "errorType": "bad_data", "error": 'parse error: unexpected "}"'}
    async with mock(lambda r: httpx.Response(400, json=body)) as client:
        with pytest.raises(PrometheusQueryError, match=r"bad_data.*parse error") as info:
            await client.value("sum(}")
    assert info.value.reason == "PrometheusQueryError"


async def test_matrix_result_is_refused() -> None:
    async with mock(lambda r: ok("matrix", [])) as client:
        with pytest.raises(PrometheusQueryError, match="instant vector or scalar"):
            await client.value("x[5m]")


async def test_not_prometheus_is_a_query_error() -> None:
    async with mock(lambda r: httpx.Response(404, text="404 page not found")) as client:
        with pytest.raises(PrometheusQueryError, match="is prometheusUrl right"):
            await client.value("x")
    async with mock(lambda r: httpx.Response(200, text=json.dumps(["not", "an", "api"]))) as client:
        with pytest.raises(PrometheusQueryError):
            await client.value("x")


async def test_server_trouble_is_unavailable() -> None:
    async with mock(lambda r: httpx.Response(503, text="Service Unavailable")) as client:
        with pytest.raises(PrometheusUnavailable, match="HTTP 503"):
            await client.value("x")


async def test_timeout_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with mock(handler) as client:
        with pytest.raises(PrometheusUnavailable, match="timed out"):
            await client.value("x")


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with PrometheusClient(f"http://127.0.0.1:{port}", timeout=2.0) as client:
        with pytest.raises(
            PrometheusUnavailable, match=f"cannot reach Prometheus at http://127.0.0.1:{port}"
        ):
            await client.value("x")


def test_url_is_checked() -> None:
    with pytest.raises(ValueError, match="prometheusUrl"):
        PrometheusClient("prom:9090")
