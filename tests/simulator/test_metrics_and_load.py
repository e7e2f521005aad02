"""vLLM's /metrics series, and how they and latency respond to load."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_service.simulator import SimulatorServer

OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
LABELS = {"model_name": "sim-load", "engine": "0"}
SERIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
]


def samples(sim: SimulatorServer, accept: str | None = None) -> dict[tuple[str, frozenset], float]:
    headers = {"accept": accept} if accept else {}
    response = httpx.get(f"{sim.url}/metrics", headers=headers)
    assert response.status_code == 200
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset], float], name: str, **extra: str) -> float:
    return found[(name, frozenset({**LABELS, **extra}.items()))]


def test_series_names_labels_and_counts_match_usage(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(model="sim-load")
    c = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    usages = [
        c.completions.create(model="sim-load", prompt="one two three", max_tokens=7).usage,
        c.chat.completions.create(
            model="sim-load", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        ).usage,
        c.completions.create(model="sim-load", prompt="no limit here").usage,
    ]
    found = samples(sim)
    names = {name for name, _ in found}
    for series in SERIES:
        assert series in names, f"missing {series}"
    assert all(dict(labels).keys() >= {"model_name", "engine"} for _, labels in found)
    assert not any(name.endswith("_created") for name in names)
    assert value(found, "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages if u)
    assert value(found, "vllm:generation_tokens_total") == sum(u.completion_tokens for u in usages if u)
    assert value(found, "vllm:request_success_total", finished_reason="length") == 2
    assert value(found, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(found, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(found, "vllm:time_to_first_token_seconds_count") == 3
    assert value(found, "vllm:inter_token_latency_seconds_count") == sum(
        u.completion_tokens - 1 for u in usages if u
    )
    assert value(found, "vllm:request_generation_tokens_sum") == sum(u.completion_tokens for u in usages if u)
    assert value(found, "vllm:num_requests_running") == 0 and value(found, "vllm:kv_cache_usage_perc") == 0


def test_text_format_keeps_colon_names_even_when_openmetrics_is_asked(
    start_simulator: Callable[..., SimulatorServer],
) -> None:
    sim = start_simulator(model="sim-load")
    response = httpx.get(f"{sim.url}/metrics", headers={"accept": OPENMETRICS_ACCEPT})
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert re.search(
        r'^vllm:num_requests_waiting\{engine="0",model_name="sim-load"\} 0\.0$', response.text, re.M
    )
    assert "vllm_" not in response.text


def test_negotiate_mode_serves_openmetrics_like_vllm(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(model="sim-load", metrics_format="negotiate")
    om = httpx.get(f"{sim.url}/metrics", headers={"accept": OPENMETRICS_ACCEPT})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    # prometheus-client >= 0.23 escapes the colon in OpenMetrics sample names (as real vLLM does).
    assert re.search(r'^vllm_num_requests_waiting\{engine="0",model_name="sim-load"\} 0\.0$', om.text, re.M)
    plain = httpx.get(f"{sim.url}/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "vllm:num_requests_waiting{" in plain.text


async def test_requests_beyond_max_num_seqs_queue_and_latency_grows(
    start_simulator: Callable[..., SimulatorServer],
) -> None:
    # 30 tokens at 60 tok/s ~ 0.5 simulated s per request; speedup 5 -> ~0.1 s wall per wave of 2.
    sim = start_simulator(model="sim-load", max_num_seqs=2, speedup=5.0)
    observed_waiting: list[float] = []
    observed_kv: list[float] = []

    async with (
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client,
        httpx.AsyncClient() as http,
    ):

        async def request(i: int) -> float:
            start = time.perf_counter()
            await client.completions.create(model="sim-load", prompt=f"load {i} " * 50, max_tokens=30)
            return time.perf_counter() - start

        async def watch() -> None:
            for _ in range(200):  # bounded: at most ~2 s
                text = (await http.get(f"{sim.url}/metrics")).text
                found = {
                    s.name: s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if not s.labels.get("le")
                }
                observed_waiting.append(found["vllm:num_requests_waiting"])
                observed_kv.append(found["vllm:kv_cache_usage_perc"])
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        latencies = await asyncio.gather(*(request(i) for i in range(6)))
        watcher.cancel()

    assert max(observed_waiting) >= 2  # 6 requests, 2 slots
    assert max(observed_kv) > 0
    latencies.sort()
    assert latencies[-1] > 2.0 * latencies[0]  # the last wave waited for two earlier ones
    found = samples(sim)
    queue_sum = value(found, "vllm:request_queue_time_seconds_sum")
    assert queue_sum > 0.5  # simulated seconds: waves 2 and 3 waited ~0.5 s and ~1 s each
    assert value(found, "vllm:request_success_total", finished_reason="length") == 6


async def test_kv_cache_usage_rises_with_concurrent_long_prompts(
    start_simulator: Callable[..., SimulatorServer],
) -> None:
    sim = start_simulator(model="sim-load", kv_cache_tokens=16384, max_model_len=4096, speedup=10.0)
    prompt = "word " * 1000
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
        tasks = [
            asyncio.create_task(client.completions.create(model="sim-load", prompt=prompt, max_tokens=40))
            for _ in range(8)
        ]
        peak = 0.0
        for _ in range(300):  # bounded: at most ~3 s
            state = sim.state()
            peak = max(peak, state["kv_cache_usage"])
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    # 8 x ~1040 tokens in a 16384-token cache: about half of it, unless preempted.
    assert 0.3 < peak <= 1.0
    assert sim.state()["kv_cache_usage"] == 0


@pytest.mark.parametrize("concurrency", [64])
async def test_many_concurrent_streams_complete(
    start_simulator: Callable[..., SimulatorServer], concurrency: int
) -> None:
    sim = start_simulator(model="sim-load", max_num_seqs=32, speedup=20.0)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:

        async def stream(i: int) -> int:
            s = await client.chat.completions.create(
                model="sim-load",
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
            tokens = 0
            async for chunk in s:
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return tokens

        assert await asyncio.gather(*(stream(i) for i in range(concurrency))) == [20] * concurrency
