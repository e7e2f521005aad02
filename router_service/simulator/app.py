"""The HTTP face of the simulator: a FastAPI app shaped like `vllm serve` for one model.

A skill file (``profile.skill``, see `skill.py`) scripts the answers to known chat prompts.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE
with ``stream_options.include_usage``), ``POST /v1/embeddings`` (task=embed), ``GET /health``,
``GET /version``, ``GET /metrics``; and, not in vLLM, ``GET/POST/DELETE /admin/faults`` (fault
injection, see `faults.py`) and ``GET /admin/state`` (the scheduler's counters).

A request's life: validate (400/404 in OpenAI's error shape) -> faults -> the front-end overhead
(``ttft_ms``) -> its sequences enter the engine's waiting queue -> tokens arrive as the engine
steps -> the answer (streamed token by token, or whole at the end). A client that disconnects
has its sequences aborted, freeing their batch slots and KV cache.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from router_service.simulator.engine import Engine, EngineStopped, RequestHandle
from router_service.simulator.faults import FaultInjector
from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SimulatorError,
    created_now,
    new_id,
    parse_json,
    sse,
    usage,
    validation_error,
)
from router_service.simulator.skill import Skill, load_skill
from router_service.simulator.textgen import (
    drawn_length,
    generate_pieces,
    hashed_embedding,
    stable_hash,
    text_pieces,
    truncate_at_stop,
)

VLLM_VERSION = "0.33.0"
CLIENT_CLOSED_REQUEST = 499

M = TypeVar("M", bound=BaseModel)


@dataclass
class ChoicePlan:
    """What one choice will generate, decided before it enters the engine."""

    index: int
    prompt_tokens: int
    deltas: list[str]  # text per generated token (joins to the choice's text)
    finish_reason: str

    @property
    def output_tokens(self) -> int:
        return len(self.deltas)

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class _DropConnection(Exception):
    """Raised inside a response body to cut the connection (fault injection)."""


def _is_drop(exc: BaseException) -> bool:
    if isinstance(exc, _DropConnection):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_drop(e) for e in exc.exceptions)
    return False


class DroppableStreamingResponse(StreamingResponse):
    """A streaming response whose body may end by dropping the connection mid-way.

    When the body iterator raises `_DropConnection` the app returns without completing the
    response, and the server closes the connection: the client sees a truncated body.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            if not _is_drop(exc):
                raise


class Simulator:
    """Request handling for one simulated model; one instance per app."""

    def __init__(self, profile: SimulatorProfile) -> None:
        self.profile = profile
        self.faults = FaultInjector(profile.faults, seed=profile.seed)
        self.engine = Engine(profile, self.faults)
        self.skill: Skill | None = load_skill(profile.skill) if profile.skill else None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- checks --------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.profile.model:
            raise SimulatorError(404, f"The model `{model}` does not exist.", "model")

    def require_task(self, task: str, api: str) -> None:
        if self.profile.task != task:
            raise SimulatorError(
                400, f"The model `{self.profile.model}` does not support the {api}.", "model"
            )

    def plan_choice(
        self,
        index: int,
        sample: int,
        identity: str,
        prompt_tokens: int,
        limit: int | None,
        stops: list[str],
        seed: int | None,
        scripted: str | None = None,
    ) -> ChoicePlan:
        """What one choice generates: `scripted` text (the skill's answer) or text drawn from the seed."""
        max_len = self.profile.max_model_len
        if prompt_tokens < 1:
            raise SimulatorError(400, "The prompt cannot be empty.", "prompt")
        if prompt_tokens >= max_len:
            raise SimulatorError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
                "messages",
            )
        if limit is not None and prompt_tokens + limit > max_len:
            raise SimulatorError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_tokens + limit} tokens ({prompt_tokens} in the messages, {limit} in the "
                "completion). Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        room = max_len - prompt_tokens
        if scripted is not None:
            pieces = text_pieces(scripted)
            cap = room if limit is None else limit
            reason = "length" if len(pieces) > cap else "stop"
            deltas, hit_stop = truncate_at_stop(pieces[:cap], stops)
            return ChoicePlan(index, prompt_tokens, deltas, "stop" if hit_stop else reason)
        key = stable_hash(self.profile.seed, self.profile.model, identity, sample, seed)
        if limit is not None:
            length, reason = limit, "length"
        else:
            drawn = drawn_length(stable_hash("length", key))
            length, reason = (drawn, "stop") if drawn <= room else (room, "length")
        deltas, hit_stop = truncate_at_stop(generate_pieces(key, length), stops)
        return ChoicePlan(index, prompt_tokens, deltas, "stop" if hit_stop else reason)

    # ---- the common path -----------------------------------------------------------------
    async def admit(self, request: Request) -> float | None:
        """Apply faults and the front-end overhead; the request's creation time, or None if the client left."""
        created_at = self.engine.now()
        if self.faults.settings.hang and not await _unless_disconnected(
            request, self.faults.wait_while_hung()
        ):
            return None
        if self.faults.should_fail():
            raise SimulatorError(self.faults.settings.error_status, "Injected fault: simulated server error.")
        await self.engine.sleep_simulated(self.profile.ttft_ms / 1000 * self.faults.settings.slowdown)
        return created_at

    def submit(self, plans: list[ChoicePlan], created_at: float) -> tuple[list[RequestHandle], asyncio.Event]:
        notify = asyncio.Event()
        handles: list[RequestHandle] = []
        try:
            for p in plans:
                handles.append(
                    self.engine.submit(p.prompt_tokens, p.output_tokens, p.finish_reason, created_at, notify)
                )
        except EngineStopped as exc:
            self.abort(handles)
            raise SimulatorError(503, f"The simulator engine is not running: {exc}") from None
        return handles, notify

    def abort(self, handles: list[RequestHandle]) -> None:
        for handle in handles:
            self.engine.abort(handle)

    async def wait_for(
        self, handles: list[RequestHandle], notify: asyncio.Event, tokens: int | None = None
    ) -> None:
        """Until every handle finished (or, with `tokens`, that many tokens were generated in all)."""
        while not all(h.done for h in handles):
            if any(h.error for h in handles):
                raise SimulatorError(503, "The simulator engine stopped before the request finished.")
            if tokens is not None and sum(h.delivered for h in handles) >= tokens:
                return
            await notify.wait()
            notify.clear()

    async def generate(
        self,
        request: Request,
        kind: str,
        plans: list[ChoicePlan],
        prompt_tokens: int,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        created_at = await self.admit(request)
        if created_at is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        handles, notify = self.submit(plans, created_at)
        response_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = created_now()
        die_after = self.faults.settings.die_after_tokens
        if stream:
            body = self._stream(
                kind, response_id, created, plans, handles, notify, prompt_tokens, include_usage, die_after
            )
            return DroppableStreamingResponse(body, media_type="text/event-stream")
        if die_after is not None:
            # Work until the fault's token count, then "crash": a truncated body and a dropped connection.
            reached = await _unless_disconnected(request, self.wait_for(handles, notify, tokens=die_after))
            self.abort(handles)
            if not reached:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return DroppableStreamingResponse(_truncated_json(response_id), media_type="application/json")
        if not await _unless_disconnected(request, self.wait_for(handles, notify)):
            self.abort(handles)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion_tokens = sum(p.output_tokens for p in plans)
        if kind == "chat":
            choices = [
                {
                    "index": p.index,
                    "message": {"role": "assistant", "content": p.text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": p.finish_reason,
                    "stop_reason": None,
                }
                for p in plans
            ]
            obj = "chat.completion"
        else:
            choices = [
                {
                    "index": p.index,
                    "text": p.text,
                    "logprobs": None,
                    "finish_reason": p.finish_reason,
                    "stop_reason": None,
                }
                for p in plans
            ]
            obj = "text_completion"
        return JSONResponse(
            {
                "id": response_id,
                "object": obj,
                "created": created,
                "model": self.profile.model,
                "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens),
                "system_fingerprint": None,
            }
        )

    async def _stream(
        self,
        kind: str,
        response_id: str,
        created: int,
        plans: list[ChoicePlan],
        handles: list[RequestHandle],
        notify: asyncio.Event,
        prompt_tokens: int,
        include_usage: bool,
        die_after: int | None,
    ) -> AsyncIterator[bytes]:
        chat = kind == "chat"
        head: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.profile.model,
        }
        tail: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = None
            return sse({**head, "choices": [choice], **tail})

        sent = [0] * len(plans)
        sent_total = 0
        try:
            if chat:
                yield b"".join(chunk(p.index, None, None, role=True) for p in plans)
            while True:
                parts: list[bytes] = []
                for i, (plan, handle) in enumerate(zip(plans, handles, strict=True)):
                    while sent[i] < handle.delivered:
                        if die_after is not None and sent_total >= die_after:
                            if parts:
                                yield b"".join(parts)
                            raise _DropConnection
                        k = sent[i]
                        sent[i] += 1
                        sent_total += 1
                        last = sent[i] == plan.output_tokens
                        parts.append(chunk(plan.index, plan.deltas[k], plan.finish_reason if last else None))
                if parts:
                    yield b"".join(parts)
                if all(sent[i] >= p.output_tokens for i, p in enumerate(plans)):
                    break
                if any(h.error for h in handles):
                    raise _DropConnection
                await notify.wait()
                notify.clear()
            if include_usage:
                completion_tokens = sum(p.output_tokens for p in plans)
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield SSE_DONE
        finally:
            self.abort(handles)

    async def embed(self, request: Request, body: EmbeddingRequest) -> Response:
        inputs = body.inputs()
        for i, (_, tokens) in enumerate(inputs):
            if tokens < 1:
                raise SimulatorError(400, f"input.{i}: the input cannot be empty.", "input")
            if tokens > self.profile.max_model_len:
                raise SimulatorError(
                    400,
                    f"This model's maximum context length is {self.profile.max_model_len} tokens. However, "
                    f"input {i} has {tokens} tokens. Please reduce the length of the input.",
                    "input",
                )
        created_at = await self.admit(request)
        if created_at is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        plans = [ChoicePlan(i, tokens, [], "stop") for i, (_, tokens) in enumerate(inputs)]
        handles, notify = self.submit(plans, created_at)
        if not await _unless_disconnected(request, self.wait_for(handles, notify)):
            self.abort(handles)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        dimensions = body.dimensions or self.profile.embedding_dimensions
        data = []
        for i, (text, _) in enumerate(inputs):
            vector = hashed_embedding(text, dimensions)
            encoded: list[float] | str = (
                base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else vector
            )
            data.append({"index": i, "object": "embedding", "embedding": encoded})
        prompt_tokens = sum(tokens for _, tokens in inputs)
        return JSONResponse(
            {
                "id": new_id("embd"),
                "object": "list",
                "created": created_now(),
                "model": self.profile.model,
                "data": data,
                "usage": usage(prompt_tokens, 0),
            }
        )

    def state(self) -> dict[str, Any]:
        s = self.engine.scheduler
        return {
            "model": self.profile.model,
            "num_requests_running": s.num_running,
            "num_requests_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "num_preemptions": s.num_preemptions,
            "engine_steps": self.engine.steps,
            "simulated_seconds": self.engine.now(),
        }


async def _truncated_json(response_id: str) -> AsyncIterator[bytes]:
    yield f'{{"id":"{response_id}","object":"'.encode()
    raise _DropConnection


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> bool:
    """Run `work` until done (True) or until the client disconnects first (False)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task in done:
        task.result()
        return True
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate(parse_json(raw))
    except ValidationError as exc:
        raise validation_error(exc) from None


def create_app(profile: SimulatorProfile) -> FastAPI:
    """A FastAPI app serving one simulated model; its engine runs while the app's lifespan does."""
    sim = Simulator(profile)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sim.loop = asyncio.get_running_loop()
        sim.engine.start()
        try:
            yield
        finally:
            await sim.engine.stop()

    app = FastAPI(
        title=f"tollway simulate: {profile.model}", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.simulator = sim

    @app.exception_handler(SimulatorError)
    async def _on_error(request: Request, exc: SimulatorError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    if profile.api_key is not None:
        expected = f"Bearer {profile.api_key}".encode()

        @app.middleware("http")
        async def _require_api_key(request: Request, call_next: Any) -> Response:
            """vLLM's --api-key: /v1 paths need the bearer key; /health, /metrics stay open."""
            if request.method == "OPTIONS" or not request.url.path.startswith("/v1"):
                return await call_next(request)
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if sim.faults.settings.unhealthy else 200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VLLM_VERSION}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": profile.model,
                    "object": "model",
                    "created": created_now(),
                    "owned_by": "vllm",
                    "root": profile.model,
                    "parent": None,
                    "max_model_len": profile.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = sim.engine.metrics.render(request.headers.get("accept"), profile.metrics_format)
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await request.body())
        sim.check_model(body.model)
        sim.require_task("generate", "Completions API")
        body.check_stream_options()
        if body.echo:
            raise SimulatorError(400, "echo: not supported by the simulator", "echo")
        if body.logprobs is not None:
            raise SimulatorError(400, "logprobs: not supported by the simulator", "logprobs")
        prompts = body.prompts()
        plans = [
            sim.plan_choice(
                p * body.n + j, j, identity, tokens, body.max_tokens, body.stop_strings(), body.seed
            )
            for p, (identity, tokens) in enumerate(prompts)
            for j in range(body.n)
        ]
        prompt_tokens = sum(tokens for _, tokens in prompts)
        return await sim.generate(
            request, "completion", plans, prompt_tokens, bool(body.stream), body.include_usage
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await request.body())
        sim.check_model(body.model)
        sim.require_task("generate", "Chat Completions API")
        body.check_stream_options()
        if body.logprobs:
            raise SimulatorError(400, "logprobs: not supported by the simulator", "logprobs")
        identity, prompt_tokens = body.prompt_identity_and_tokens()
        scripted = sim.skill.answer_for(body.last_user_text()) if sim.skill else None
        plans = [
            sim.plan_choice(
                j, j, identity, prompt_tokens, body.output_limit, body.stop_strings(), body.seed, scripted
            )
            for j in range(body.n)
        ]
        return await sim.generate(
            request, "chat", plans, prompt_tokens, bool(body.stream), body.include_usage
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = _parse(EmbeddingRequest, await request.body())
        sim.check_model(body.model)
        sim.require_task("embed", "Embeddings API")
        return await sim.embed(request, body)

    @app.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        return sim.faults.settings.model_dump()

    @app.post("/admin/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        changes = parse_json(await request.body())
        try:
            return sim.faults.update(changes).model_dump()
        except ValidationError as exc:
            raise validation_error(exc) from None

    @app.delete("/admin/faults")
    async def clear_faults() -> dict[str, Any]:
        return sim.faults.reset().model_dump()

    @app.get("/admin/state")
    async def state() -> dict[str, Any]:
        return sim.state()

    return app
