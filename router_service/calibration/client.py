"""Talking to the models being calibrated and to the judge, through the official `openai` client.

Every request carries ``x-tollway-priority: sheddable``: pointed at a tollway router, calibration
traffic is the first to be degraded or shed, so production traffic wins (a vLLM server ignores
the header). Retries with exponential backoff (and ``Retry-After``) are the client's own: on
connection errors, timeouts, 408, 409, 429 and 5xx, ``max_retries`` times. A call that still fails
raises `CallFailed`, which says whether it points at the backend (down, refusing, misconfigured)
or only at this one prompt.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

from router_service.calibration.graders import GradingError, judge_prompt, parse_judge_score

PRIORITY_HEADER = {"x-tollway-priority": "sheddable"}


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server and the model name to ask it for."""

    name: str
    """The model's name in the history (its column)."""
    base_url: str
    model: str
    """What requests put in ``model`` (the served model name; `name` unless told otherwise)."""
    api_key: str = "EMPTY"


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return url.rstrip("/") + "/v1" if parts.path in {"", "/"} else url.rstrip("/")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float


class CallFailed(Exception):
    """A request that failed after the client's retries.

    ``backend_fault``: the failure says the backend is unusable (unreachable, timing out, 5xx,
    401/403/404) rather than that this prompt is (400 for a too-long prompt, a malformed answer).
    """

    def __init__(self, message: str, *, backend_fault: bool) -> None:
        super().__init__(message)
        self.backend_fault = backend_fault


def _describe(exc: openai.OpenAIError) -> CallFailed:
    if isinstance(exc, openai.APITimeoutError):
        return CallFailed("timed out (after retries)", backend_fault=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return CallFailed(f"cannot connect (after retries): {cause}", backend_fault=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = re.sub(r"^Error code: \d+ - ", "", exc.message)
        message = message if len(message) <= 300 else message[:300] + "..."
        backend_fault = status >= 500 or status in {401, 403, 404, 408, 429}
        return CallFailed(f"HTTP {status}: {message}", backend_fault=backend_fault)
    return CallFailed(f"{type(exc).__name__}: {exc}", backend_fault=False)


class ChatClient:
    """Chat completions against one endpoint (one connection pool, shared by all its requests)."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 300.0, max_retries: int = 3) -> None:
        self.endpoint = endpoint
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=PRIORITY_HEADER,
        )

    async def complete(self, prompt: str, *, max_tokens: int | None, temperature: float = 0.0) -> Completion:
        """One user message in, the answer and its true token usage out; raises `CallFailed`."""
        started = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=temperature,
            )
        except openai.OpenAIError as exc:
            raise _describe(exc) from exc
        if not response.choices:
            raise CallFailed("the answer has no choices", backend_fault=False)
        choice = response.choices[0]
        if response.usage is None:
            raise CallFailed("the answer has no usage (prompt/completion tokens)", backend_fault=False)
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=int(response.usage.prompt_tokens),
            completion_tokens=int(response.usage.completion_tokens),
            finish_reason=choice.finish_reason,
            seconds=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        await self._client.close()


@dataclass(frozen=True)
class Verdict:
    """The judge's score (None when its reply held none) and what judging cost."""

    score: float | None
    prompt_tokens: int
    completion_tokens: int
    problem: str = ""


class Judge:
    """The ``judge`` grader: a model scores an answer against the reference with the rubric template."""

    def __init__(self, client: ChatClient, template: str, *, max_tokens: int = 256) -> None:
        self.client = client
        self.template = template
        self.max_tokens = max_tokens

    @property
    def name(self) -> str:
        return self.client.endpoint.name

    async def score(self, question: str, reference: str, answer: str) -> Verdict:
        """Raises `CallFailed` when the judge could not be asked; a reply without a score is a Verdict
        with ``score=None`` (its tokens were still spent)."""
        reply = await self.client.complete(
            judge_prompt(question, reference, answer, self.template), max_tokens=self.max_tokens
        )
        try:
            score: float | None = parse_judge_score(reply.text)
            problem = ""
        except GradingError as exc:
            score, problem = None, f"judge {self.name}: {exc}"
        return Verdict(score, reply.prompt_tokens, reply.completion_tokens, problem)
