"""Step 1 of the request path, parse: the body read within its size and time limits, the few
fields the router relies on checked, the routing text, the priority and what admission needs to
bound the request's tokens (a prompt bound from `tokens.py`, how many sequences it generates,
its max_tokens) taken out.

The backend validates everything else; a request that fails here gets a 400 (or 413) in OpenAI's
error shape that names the field.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from router_service.proxy import openai_errors as errors
from router_service.proxy.load import DEFAULT_PRIORITY, PRIORITIES
from router_service.proxy.tokens import chat_prompt_bound, completion_prompts_bound, embedding_inputs_bound

PRIORITY_HEADER = "x-tollway-priority"
ROUTING_TEXT_CHARS = 4096  # the routing decision reads at most this much of the prompt

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
"""Capability -> the OpenAI path that serves it (the router's and the backends')."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    raw: bytes
    payload: dict[str, Any]
    model: str
    stream: bool
    routing_text: str
    prompt_bound: int  # the prompt's tokens are at most this (template included)
    max_tokens: int | None
    sequences: int = 1  # completions generated: max(n, best_of) per prompt
    usage_requested: bool = False  # stream_options.include_usage asked by the client


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _encodable(payload: object) -> bool:
    """False when a JSON string escape left a lone surrogate that UTF-8 cannot carry upstream."""
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"Request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise errors.bad_request("Request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise errors.bad_request("Request body must be a JSON object.")
    if (b"\\ud" in body or b"\\uD" in body) and not _encodable(payload):
        raise errors.bad_request(
            "Request body contains an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF)."
        )
    return payload


def _positive_int(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise errors.bad_request(f"`{name}` must be a positive integer.", param=name)
    return value


def _usage_requested(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def parse_request(body: bytes, capability: str) -> ParsedRequest:
    """Validate the few fields the router relies on; the backend validates the rest."""
    payload = parse_json_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("`model` is required and must be a non-empty string.", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.bad_request("`stream` must be a boolean.", param="stream")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise errors.bad_request("`max_tokens` must be a non-negative integer.", param="max_tokens")
    if capability == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.bad_request("`messages` must be a non-empty list.", param="messages")
        turns = [m for m in messages if isinstance(m, dict)]
        last_user = next((m for m in reversed(turns) if m.get("role") == "user"), None)
        if last_user is not None:
            routing = _text_of(last_user.get("content"))
        else:
            routing = " ".join(_text_of(m.get("content")) for m in turns)
        bound, prompts = chat_prompt_bound(payload), 1
    elif capability == "completions":
        prompt = payload.get("prompt")
        bound, prompts = completion_prompts_bound(prompt)
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        if not isinstance(prompt, str):
            raise errors.bad_request("`prompt` must be a string or a list of strings.", param="prompt")
        routing = prompt
    else:  # embeddings
        inputs = payload.get("input")
        if not isinstance(inputs, str | list):
            raise errors.bad_request("`input` must be a string or a list.", param="input")
        bound, prompts = embedding_inputs_bound(inputs), 1
        routing = ""
        stream = False
    per_prompt = (
        1
        if capability == "embeddings"
        else max(_positive_int(payload, "n"), _positive_int(payload, "best_of"))
    )
    return ParsedRequest(
        raw=body,
        payload=payload,
        model=model,
        stream=stream,
        routing_text=routing[:ROUTING_TEXT_CHARS],
        prompt_bound=bound,
        max_tokens=max_tokens,
        sequences=per_prompt * prompts,
        usage_requested=_usage_requested(payload),
    )


def parse_priority(value: str | None) -> str:
    if value is None or value == "":
        return DEFAULT_PRIORITY
    v = value.strip().lower()
    if v not in PRIORITIES:
        raise errors.bad_request(
            f"Header {PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)} (got {value!r}).",
            param=PRIORITY_HEADER,
        )
    return v


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all, and answering
    408 when it has not arrived whole within `timeout` seconds."""
    if timeout is None:
        return await _read_body(request, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body(request, limit)
    except TimeoutError:
        raise errors.request_timeout(timeout) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.too_large(limit)
        except ValueError as exc:
            raise errors.bad_request("Invalid Content-Length header.") from exc
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
