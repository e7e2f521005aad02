"""A thin async client for the Prometheus HTTP API (instant queries only).

Every failure maps to one of three errors, so the autoscaler can say precisely why it holds:

* `PrometheusUnavailable`: nothing answered (connection refused, timeout, DNS) or the server
  said it cannot serve now (HTTP 5xx / 429 without an API error body).
* `PrometheusQueryError`: Prometheus answered and refused the query (`status: error`, e.g. a
  PromQL syntax error), or the URL does not serve the Prometheus API.
* `NoData`: the query ran and returned no samples (or only NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx


class PrometheusError(Exception):
    """Base class; `reason` is a CamelCase word for conditions and Events."""

    reason = "PrometheusError"


class PrometheusUnavailable(PrometheusError):
    reason = "PrometheusUnavailable"


class PrometheusQueryError(PrometheusError):
    reason = "PrometheusQueryError"


class NoData(PrometheusError):
    reason = "NoData"


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PrometheusClient:
    """`/api/v1/query` against one Prometheus. Reuse one instance; close it with `aclose()`."""

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"prometheusUrl must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def query(self, promql: str) -> list[Sample]:
        """Run an instant query; return its samples (a scalar result is one unlabelled sample)."""
        try:
            response = await self._client.post("/api/v1/query", data={"query": promql})
        except httpx.TimeoutException as e:
            raise PrometheusUnavailable(
                f"Prometheus at {self.base_url} timed out ({type(e).__name__})"
            ) from e
        except httpx.TransportError as e:
            raise PrometheusUnavailable(
                f"cannot reach Prometheus at {self.base_url}: {e or type(e).__name__}"
            ) from e
        body = self._json(response)
        if body is None:
            if response.status_code >= 500 or response.status_code == 429:
                raise PrometheusUnavailable(
                    f"Prometheus at {self.base_url} answered HTTP {response.status_code}: {_short(response.text)}"
                )
            raise PrometheusQueryError(
                f"{self.base_url}/api/v1/query answered HTTP {response.status_code} without a Prometheus API body "
                f"(is prometheusUrl right?): {_short(response.text)}"
            )
        if body.get("status") != "success":
            kind = body.get("errorType", "error")
            raise PrometheusQueryError(
                f"query {_short(promql, 120)!r} failed ({kind}): {body.get('error', '')}"
            )
        return self._samples(body.get("data") or {}, promql)

    async def value(self, promql: str) -> float:
        """The query's value: the sum of its samples. NoData when there are none (or all NaN)."""
        samples = [s for s in await self.query(promql) if not math.isnan(s.value)]
        if not samples:
            raise NoData(f"no data for {_short(promql, 160)}")
        return math.fsum(s.value for s in samples)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any] | None:
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) and "status" in body else None

    @staticmethod
    def _samples(data: dict[str, Any], promql: str) -> list[Sample]:
        kind = data.get("resultType")
        result = data.get("result")
        try:
            if kind == "vector":
                return [Sample(dict(item.get("metric", {})), float(item["value"][1])) for item in result]
            if kind == "scalar":
                return [Sample({}, float(result[1]))]
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise PrometheusQueryError(f"malformed {kind} result for {_short(promql, 120)!r}: {e}") from e
        raise PrometheusQueryError(
            f"query {_short(promql, 120)!r} returned a {kind}; an instant vector or scalar is needed"
        )
