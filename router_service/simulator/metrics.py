"""vLLM's Prometheus series, with vLLM's names, labels and buckets, one registry per simulator.

Names follow vLLM 0.33 (labels ``model_name`` and ``engine``): the gauges
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (1 = 100%);
the counters ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:request_success_total`` (plus ``finished_reason``), ``vllm:num_preemptions_total``; the
histograms ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``,
``vllm:request_prefill_time_seconds``, ``vllm:request_decode_time_seconds``,
``vllm:request_prompt_tokens`` and ``vllm:request_generation_tokens``. Latencies are simulated
seconds. ``_created`` samples are left out (vLLM disables them too).

Exposition: the classic text format 0.0.4 keeps the colon in every name. prometheus-client >= 0.23
writes ``vllm_`` in OpenMetrics sample lines unless the scraper allows UTF-8 names, so by default
(`metrics_format="text"`) the simulator answers text 0.0.4 whatever the Accept header says;
``"negotiate"`` honours Accept as vLLM itself does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

ENGINE = "0"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """[1, 2, 5, 10, 20, 50, ...] up to max_value, as vLLM buckets token-count histograms."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _WithoutCreated(Collector):
    """Wraps a registry and drops the `_created` samples prometheus-client adds."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class SimulatorMetrics:
    """The metric objects of one simulator; gauges read the engine's state at scrape time."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_cache_usage: Callable[[], float],
        preemptions: Callable[[], float],
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposed = _WithoutCreated(self.registry)
        labels = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": ENGINE}
        reg = self.registry

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, labels, registry=reg).labels(**values).set_function(fn)

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_cache_usage)

        class _Preemptions(Collector):
            def collect(self) -> Iterable[Metric]:

                family = CounterMetricFamily(
                    "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels
                )
                family.add_metric([model_name, ENGINE], preemptions())
                yield family

        reg.register(_Preemptions())

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*labels, *extra], registry=reg)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(
            **values
        )
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(**values)
        self._request_success = counter(
            "vllm:request_success", "Count of successfully processed requests.", ("finished_reason",)
        )
        for reason in ("stop", "length"):
            self._request_success.labels(**values, finished_reason=reason)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=list(buckets), registry=reg).labels(**values)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self._values = values

    def request_success(self, finished_reason: Literal["stop", "length"]) -> None:
        self._request_success.labels(**self._values, finished_reason=finished_reason).inc()

    def render(self, accept: str | None, metrics_format: Literal["text", "negotiate"]) -> tuple[bytes, str]:
        """The exposition body and its Content-Type for a scrape with this Accept header."""
        if metrics_format == "negotiate":
            encoder, content_type = choose_encoder(accept or "")
            return encoder(self._exposed), content_type
        return generate_latest(self._exposed), TEXT_CONTENT_TYPE
