"""Step 1 of the request path, parse: the body read within its size limit, the few fields the
router relies on checked, the routing text and the priority taken out.

The backend validates everything else; a request that fails here gets a 400 (or 413) in OpenAI's
error shape that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from router_service.proxy import openai_errors as errors
from router_service.proxy.load import DEFAULT_PRIORITY, PRIORITIES

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
    prompt_chars: int
    max_tokens: int | None


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
        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [
            _text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
        ]
        routing = users[-1] if users else " ".join(texts)
        chars = sum(len(t) for t in texts)
    elif capability == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        if not isinstance(prompt, str):
            raise errors.bad_request("`prompt` must be a string or a list of strings.", param="prompt")
        routing, chars = prompt, len(prompt)
    else:  # embeddings
        inputs = payload.get("input")
        if isinstance(inputs, str):
            chars = len(inputs)
        elif isinstance(inputs, list):
            chars = sum(
                len(x) if isinstance(x, str) else 4 * len(x) if isinstance(x, list) else 4 for x in inputs
            )
        else:
            raise errors.bad_request("`input` must be a string or a list.", param="input")
        routing = ""
        stream = False
    return ParsedRequest(
        raw=body,
        payload=payload,
        model=model,
        stream=stream,
        routing_text=routing[:ROUTING_TEXT_CHARS],
        prompt_chars=chars,
        max_tokens=max_tokens,
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
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
