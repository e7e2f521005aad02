"""Errors in the shape OpenAI's API uses, so every OpenAI client reports them properly.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the status code the
OpenAI API itself uses for the same situation (the official clients map the status code to an
exception class: 400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429
RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.responses import Response


@dataclass
class ApiError(Exception):
    """An error answer: raise it anywhere in request handling, the app turns it into JSON."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        return error_response(self, extra_headers)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: ApiError, extra_headers: dict[str, str] | None = None) -> Response:
    headers = dict(err.headers)
    if extra_headers:
        headers.update(extra_headers)
    return Response(
        content=json.dumps(err.body()).encode(),
        status_code=err.status,
        media_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    """A server-sent event that makes OpenAI clients raise `APIError` mid-stream."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"


# The situations the router answers itself, with OpenAI's status codes and types.


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str = "Invalid or missing bearer token.") -> ApiError:
    return ApiError(
        401, message, "authentication_error", "invalid_api_key", headers={"www-authenticate": "Bearer"}
    )


def model_not_found(model: str, available: list[str]) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist. Available models: {', '.join(available)}.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown path {path}.", "invalid_request_error", "not_found")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(
        405, f"Method {method} is not allowed on {path}.", "invalid_request_error", "method_not_allowed"
    )


def request_timeout(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"The request body did not arrive whole within {seconds:g} s.",
        "invalid_request_error",
        "request_timeout",
        headers={"connection": "close"},
    )


def not_served(path: str, what: str) -> ApiError:
    """No model in the pool serves this kind of request at all (not a transient 503)."""
    return ApiError(
        400,
        f"No model behind this endpoint serves {path} ({what}).",
        "invalid_request_error",
        "capability_not_served",
        "model",
    )


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"Request body exceeds the limit of {limit} bytes.", "invalid_request_error", "request_too_large"
    )


def shed(message: str, retry_after: int) -> ApiError:
    return ApiError(
        429, message, "rate_limit_error", "rate_limit_exceeded", headers={"retry-after": str(retry_after)}
    )


def budget_exhausted(message: str, retry_after: int) -> ApiError:
    return ApiError(
        429, message, "insufficient_quota", "insufficient_quota", headers={"retry-after": str(retry_after)}
    )


def unavailable(message: str, retry_after: int) -> ApiError:
    return ApiError(
        503, message, "server_error", "model_unavailable", headers={"retry-after": str(retry_after)}
    )


def not_ready(message: str) -> ApiError:
    return ApiError(503, message, "server_error", "not_ready")


def upstream_failed(message: str, status: int = 502) -> ApiError:
    return ApiError(status, message, "server_error", "upstream_error")


def upstream_timeout(message: str) -> ApiError:
    return ApiError(504, message, "server_error", "upstream_timeout")
