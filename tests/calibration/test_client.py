"""The OpenAI adapter: true usage, the priority header, retries, clear failures, the judge."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ScriptedServer, chat_reply

from router_service.calibration.client import (
    CallFailed,
    ChatClient,
    Endpoint,
    Judge,
    normalise_base_url,
)
from router_service.calibration.graders import load_judge_template

Start = Callable[[list[tuple[int, dict[str, Any]]]], ScriptedServer]


def client_for(server: ScriptedServer, retries: int = 2, model: str = "m") -> ChatClient:
    return ChatClient(Endpoint("m", server.base_url, model), timeout=10, max_retries=retries)


async def ask(client: ChatClient, prompt: str = "hello") -> Any:
    try:
        return await client.complete(prompt, max_tokens=16)
    finally:
        await client.aclose()


def test_base_urls_get_v1_unless_they_have_a_path() -> None:
    assert normalise_base_url("http://svc:8000") == "http://svc:8000/v1"
    assert normalise_base_url("http://svc:8000/") == "http://svc:8000/v1"
    assert normalise_base_url("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"
    with pytest.raises(ValueError):
        normalise_base_url("svc:8000")


def test_answer_usage_and_the_sheddable_priority_header(scripted_server: Start) -> None:
    server = scripted_server([(200, chat_reply("B", usage=(123, 4)))])
    answer = asyncio.run(ask(client_for(server, model="upstream-name"), "Which one?"))
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens) == ("B", 123, 4)
    assert server.headers[0]["x-tollway-priority"] == "sheddable"
    body = server.requests[0]
    assert body["model"] == "upstream-name" and body["messages"] == [
        {"role": "user", "content": "Which one?"}
    ]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 16


def test_server_errors_are_retried(scripted_server: Start) -> None:
    error = {"error": {"message": "overloaded", "type": "InternalServerError", "code": 500}}
    server = scripted_server([(500, error), (503, error), (200, chat_reply("A"))])
    answer = asyncio.run(ask(client_for(server, retries=2)))
    assert answer.text == "A" and len(server.requests) == 3


@pytest.mark.parametrize(
    ("script", "message", "backend_fault"),
    [
        ([(500, {"error": {"message": "boom"}})], "HTTP 500: boom", True),
        ([(404, {"error": {"message": "The model `m` does not exist."}})], "HTTP 404", True),
        ([(400, {"error": {"message": "prompt too long"}})], "HTTP 400: prompt too long", False),
        ([(200, chat_reply("B", usage=None))], "no usage", False),
        ([(200, {**chat_reply("B"), "choices": []})], "no choices", False),
    ],
)
def test_failures_say_what_and_whose_fault(
    scripted_server: Start, script: list[tuple[int, dict[str, Any]]], message: str, backend_fault: bool
) -> None:
    server = scripted_server(script)
    with pytest.raises(CallFailed) as info:
        asyncio.run(ask(client_for(server, retries=0)))
    assert message in str(info.value) and info.value.backend_fault is backend_fault


def test_a_dead_backend_is_a_backend_fault() -> None:
    from router_service.simulator.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    client = ChatClient(Endpoint("m", f"http://127.0.0.1:{port}/v1", "m"), timeout=5, max_retries=0)
    with pytest.raises(CallFailed, match="cannot connect") as info:
        asyncio.run(ask(client))
    assert info.value.backend_fault


def test_the_judge_scores_and_counts_its_tokens(scripted_server: Start) -> None:
    server = scripted_server([(200, chat_reply("Same as the reference.\nSCORE: 1", usage=(300, 9)))])
    judge = Judge(client_for(server), load_judge_template())

    async def run() -> Any:
        try:
            return await judge.score("Write f.", "def f(): pass", "def f(): return None")
        finally:
            await judge.client.aclose()

    verdict = asyncio.run(run())
    assert (verdict.score, verdict.prompt_tokens, verdict.completion_tokens) == (1.0, 300, 9)
    sent = server.requests[0]["messages"][0]["content"]
    assert "Write f." in sent and "def f(): pass" in sent and "def f(): return None" in sent


def test_a_judge_reply_without_score_still_costs_tokens(scripted_server: Start) -> None:
    server = scripted_server([(200, chat_reply("It seems fine.", usage=(300, 5)))])
    judge = Judge(client_for(server), load_judge_template())

    async def run() -> Any:
        try:
            return await judge.score("q", "r", "a")
        finally:
            await judge.client.aclose()

    verdict = asyncio.run(run())
    assert verdict.score is None and verdict.prompt_tokens == 300 and "no 'SCORE" in verdict.problem
