"""The OpenAI-compatible API, driven by the official openai client (sync and async)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

import httpx
import numpy as np
import openai
import pytest

from router_service.simulator import SimulatorServer
from router_service.simulator.textgen import (
    CHAT_GENERATION_PROMPT_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    count_tokens,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain KV caches, briefly!"},
]
CHAT_PROMPT_TOKENS = (
    CHAT_GENERATION_PROMPT_TOKENS + 2 * CHAT_TOKENS_PER_MESSAGE + count_tokens("You are terse.")
    + count_tokens("Explain KV caches, briefly!")
)  # fmt: skip


def client(sim: SimulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0, timeout=30)


def test_models_health_version(simulator: SimulatorServer) -> None:
    models = client(simulator).models.list()
    assert [m.id for m in models.data] == ["sim-small"]
    raw = httpx.get(f"{simulator.base_url}/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0] | {"created": 0} == {
        "id": "sim-small",
        "object": "model",
        "created": 0,
        "owned_by": "vllm",
        "root": "sim-small",
        "parent": None,
        "max_model_len": 8192,
    }
    health = httpx.get(f"{simulator.url}/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(f"{simulator.url}/version").json() == {"version": "0.33.0"}


def test_chat_completion_shape_and_exact_usage(simulator: SimulatorServer) -> None:
    r = client(simulator).chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=25)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "sim-small"
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert count_tokens(choice.message.content) == 25
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        CHAT_PROMPT_TOKENS,
        25,
        CHAT_PROMPT_TOKENS + 25,
    )


def test_completion_shape_and_exact_usage(simulator: SimulatorServer) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    r = client(simulator).completions.create(model="sim-small", prompt=prompt, max_tokens=12)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and count_tokens(r.choices[0].text) == 12
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (count_tokens(prompt), 12)


def test_without_max_tokens_length_is_drawn_from_prompt_and_ends_with_stop(
    simulator: SimulatorServer,
) -> None:
    c = client(simulator)
    lengths = set()
    for prompt in ("alpha", "beta", "gamma"):
        r = c.completions.create(model="sim-small", prompt=prompt)
        assert r.usage is not None and 16 <= r.usage.completion_tokens <= 256
        assert r.choices[0].finish_reason == "stop"
        assert count_tokens(r.choices[0].text) == r.usage.completion_tokens
        lengths.add(r.usage.completion_tokens)
    assert len(lengths) > 1


def test_same_request_same_text_across_servers(start_simulator: Callable[..., SimulatorServer]) -> None:
    a, b = start_simulator(), start_simulator()
    other_seed = start_simulator(seed=1)
    texts = [
        client(s)
        .chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=30)
        .choices[0]
        .message.content
        for s in (a, b, a, other_seed)
    ]
    assert texts[0] == texts[1] == texts[2]
    assert texts[3] != texts[0]
    different_prompt = client(a).chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "something else"}], max_tokens=30
    )
    assert different_prompt.choices[0].message.content != texts[0]


def test_chat_stream_with_include_usage(simulator: SimulatorServer) -> None:
    stream = client(simulator).chat.completions.create(
        model="sim-small",
        messages=MESSAGES,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 20  # one chunk per token
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (CHAT_PROMPT_TOKENS, 20)
    assert all(c.usage is None for c in chunks[:-1])
    # Streaming and non-streaming give the same text.
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    whole = client(simulator).chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=20)
    assert text == whole.choices[0].message.content


def test_raw_sse_framing_ends_with_done(simulator: SimulatorServer) -> None:
    with httpx.stream(
        "POST",
        f"{simulator.base_url}/completions",
        json={"model": "sim-small", "prompt": "hi", "max_tokens": 5, "stream": True},
        timeout=30,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2]) and len(events[:-2]) == 5
    assert '"usage"' not in body  # no include_usage: no usage chunk


def test_completion_stream_without_usage(simulator: SimulatorServer) -> None:
    stream = client(simulator).completions.create(
        model="sim-small", prompt="Count", max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert len(chunks) == 8 and chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


async def test_async_client_concurrent_requests(simulator: SimulatorServer) -> None:
    async with openai.AsyncOpenAI(base_url=simulator.base_url, api_key="x", max_retries=0) as aclient:

        async def one(i: int) -> int:
            r = await aclient.completions.create(model="sim-small", prompt=f"request {i}", max_tokens=10 + i)
            assert r.usage is not None
            return r.usage.completion_tokens

        assert await asyncio.gather(*(one(i) for i in range(16))) == [10 + i for i in range(16)]

        stream = await aclient.chat.completions.create(
            model="sim-small",
            messages=MESSAGES,
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_n_choices_and_batched_prompts(simulator: SimulatorServer) -> None:
    c = client(simulator)
    r = c.chat.completions.create(model="sim-small", messages=MESSAGES, max_tokens=6, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) == 3
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        CHAT_PROMPT_TOKENS,
        18,
    )
    batch = c.completions.create(model="sim-small", prompt=["one two", "three"], max_tokens=4)
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert batch.usage is not None and (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (3, 8)
    ids = c.completions.create(model="sim-small", prompt=[1, 2, 3, 4, 5], max_tokens=2)
    assert ids.usage is not None and ids.usage.prompt_tokens == 5


def test_stop_strings(simulator: SimulatorServer) -> None:
    c = client(simulator)
    full = c.completions.create(model="sim-small", prompt="stop test", max_tokens=40).choices[0].text
    stop = full.split()[5]
    r = c.completions.create(model="sim-small", prompt="stop test", max_tokens=40, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and full.startswith(r.choices[0].text)
    assert r.usage is not None and 0 < r.usage.completion_tokens < 40


def test_max_completion_tokens_is_honoured(simulator: SimulatorServer) -> None:
    r = client(simulator).chat.completions.create(
        model="sim-small", messages=MESSAGES, max_completion_tokens=9
    )
    assert r.usage is not None and r.usage.completion_tokens == 9


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


@pytest.mark.parametrize(
    ("path", "payload", "fragment", "param"),
    [
        ("/chat/completions", {"model": "sim-small", "messages": []}, "messages", "messages"),
        ("/chat/completions", {"model": "sim-small"}, "messages: Field required", "messages"),
        (
            "/chat/completions",
            {"model": "sim-small", "messages": [{"content": "x"}]},
            "messages.0.role",
            "messages",
        ),
        (
            "/chat/completions",
            {"model": "sim-small", "messages": MESSAGES, "max_tokens": 0},
            "max_tokens",
            "max_tokens",
        ),
        (
            "/chat/completions",
            {"model": "sim-small", "messages": MESSAGES, "max_tokens": 9000},
            "maximum context length",
            "max_tokens",
        ),
        (
            "/chat/completions",
            {"model": "sim-small", "messages": MESSAGES, "stream_options": {"include_usage": True}},
            "stream=True",
            "stream_options",
        ),
        (
            "/chat/completions",
            {
                "model": "sim-small",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "only text content",
            "messages",
        ),
        ("/completions", {"model": "sim-small", "prompt": ""}, "prompt cannot be empty", "prompt"),
        ("/completions", {"model": "sim-small", "prompt": 5}, "prompt", "prompt"),
        (
            "/completions",
            {"model": "sim-small", "prompt": "x", "temperature": -1},
            "temperature",
            "temperature",
        ),
        ("/embeddings", {"model": "sim-small", "input": "x"}, "does not support the Embeddings API", "model"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(
    simulator: SimulatorServer, path: str, payload: dict, fragment: str, param: str
) -> None:
    response = httpx.post(simulator.base_url + path, json=payload)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "BadRequestError" and fragment in error["message"] and error["param"] == param


def test_malformed_json_is_400(simulator: SimulatorServer) -> None:
    response = httpx.post(
        simulator.base_url + "/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]


def test_unknown_model_is_404_like_vllm(simulator: SimulatorServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(simulator).chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=3)
    assert info.value.status_code == 404
    error = error_of(info.value.response)
    assert error == {
        "message": "The model `gpt-9` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_openai_client_sees_bad_request_error(simulator: SimulatorServer) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client(simulator).completions.create(model="sim-small", prompt="x", max_tokens=10_000)


def test_embeddings_float_and_base64(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(model="sim-embed", task="embed", embedding_dimensions=64)
    c = client(sim)
    # The openai client asks for base64 by default and decodes it.
    r = c.embeddings.create(
        model="sim-embed", input=["sort a list in python", "how to sort a list in python"]
    )
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 64
    assert r.usage.prompt_tokens == count_tokens("sort a list in python how to sort a list in python")
    a, b = (np.array(d.embedding) for d in r.data)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5) and a @ b > 0.5
    raw = httpx.post(
        f"{sim.base_url}/embeddings",
        json={"model": "sim-embed", "input": "sort a list in python", "encoding_format": "float"},
    ).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    assert np.allclose(raw["data"][0]["embedding"], a, atol=1e-6)
    b64 = httpx.post(
        f"{sim.base_url}/embeddings",
        json={"model": "sim-embed", "input": "sort a list in python", "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), a, atol=1e-6)
    chat = httpx.post(f"{sim.base_url}/chat/completions", json={"model": "sim-embed", "messages": MESSAGES})
    assert chat.status_code == 400 and "Chat Completions API" in error_of(chat)["message"]


def wait_until_idle(sim: SimulatorServer, seconds: float = 3.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = sim.state()
        if state["num_requests_running"] == 0 and state["num_requests_waiting"] == 0:
            return state
        time.sleep(0.02)
    raise AssertionError(f"simulator still busy: {sim.state()}")


def test_client_timeout_aborts_a_non_streamed_request(
    start_simulator: Callable[..., SimulatorServer],
) -> None:
    # 2000 tokens at 60 tok/s is ~33 s (speedup 1): only an abort frees the engine early.
    sim = start_simulator(speedup=1.0)
    impatient = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="sim-small", prompt="long", max_tokens=2000)
    assert wait_until_idle(sim)["kv_cache_usage"] == 0


def test_closing_a_stream_aborts_the_request(start_simulator: Callable[..., SimulatorServer]) -> None:
    sim = start_simulator(speedup=1.0)
    stream = client(sim).completions.create(model="sim-small", prompt="long", max_tokens=2000, stream=True)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert sim.state()["num_requests_running"] == 1
    stream.close()
    assert wait_until_idle(sim)["kv_cache_usage"] == 0
