"""The OpenAI/vLLM wire format: request models, prompt accounting and response builders.

Requests are validated like vLLM's (unknown fields are accepted and ignored; wrong types and
out-of-range values are HTTP 400). Errors use the shape vLLM sends:
``{"error": {"message", "type", "param", "code"}}`` with ``type`` the error class name
(``BadRequestError``, ``NotFoundError``, ...) and ``code`` the HTTP status.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router_service.simulator.textgen import (
    CHAT_GENERATION_PROMPT_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    count_tokens,
)

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class SimulatorError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def validation_error(exc: ValidationError) -> SimulatorError:
    """A 400 naming every offending field, e.g. ``messages.0.role: Field required``."""
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{location}: {err['msg']}")
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    return SimulatorError(400, "; ".join(parts), str(first[0]) if first else None)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimulatorError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SimulatorError(400, "request body must be a JSON object")
    return body


# ---- requests ------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingRequest(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise SimulatorError(
                400, "Stream options can only be defined when `stream=True`.", "stream_options"
            )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)

    def prompts(self) -> list[tuple[str, int]]:
        """(identity text, token count) per prompt; token-id prompts count their ids."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise SimulatorError(400, "prompt: must not be an empty list", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                out.append((item, count_tokens(item)))
            else:
                out.append((" ".join(map(str, item)), len(item)))
        return out


class ChatMessage(_Lenient):
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_identity_and_tokens(self) -> tuple[str, int]:
        """The text the output is seeded from, and the prompt's token count through the chat template."""
        total = CHAT_GENERATION_PROMPT_TOKENS
        texts = []
        for i, message in enumerate(self.messages):
            text = message_text(message.content, i)
            texts.append(f"{message.role}\x1e{text}")
            total += CHAT_TOKENS_PER_MESSAGE + count_tokens(text)
        return "\x1d".join(texts), total

    def last_user_text(self) -> str | None:
        """The text of the last message with role ``user`` (None if there is none)."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                return message_text(self.messages[i].content, i)
        return None


def message_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise SimulatorError(
                400,
                f"messages.{index}.content.{j}: only text content parts are supported by this model "
                f"(got type {kind!r})",
                "messages",
            )
        parts.append(part["text"])
    return "\n".join(parts)


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[tuple[str, int]]:
        p = self.input
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise SimulatorError(400, "input: must not be an empty list", "input")
        return [
            (item, count_tokens(item)) if isinstance(item, str) else (" ".join(map(str, item)), len(item))
            for item in items
        ]


# ---- responses -----------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created_now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
