"""`POST /v1/tollway/calibration`: a model's calibration, pushed by `tollway calibrate --push`.

The body is one model's calibrated lines::

    {"model": "small", "revision": "3f2a9c01", "dataset": "builtin",
     "rows": [{"prompt": "...", "task": "arc-challenge", "score": 1.0,
               "promptTokens": 412, "completionTokens": 3}, ...]}

It replaces that model's earlier calibration in the state store (Redis: every replica; else the
state file) and this replica routes with it before answering; the others follow within the sync
bound plus an engine build. A model the config does not have (yet: the pool's new model reaches
the router's config by hot reload) or a revision the backend does not expect is stored all the
same and reported as not in use; it is used once the config names it. Authentication: the router's
bearer tokens (`auth.bearerTokensFile`), as for every endpoint.

`GET /v1/tollway/calibration` lists what the store holds and whether each one is in use.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from router_service.proxy import openai_errors as errors
from router_service.proxy.request import parse_json_object
from router_service.store.base import CalibratedRow, Calibration

MAX_BODY_BYTES = 64 * 1024 * 1024
"""A calibration carries its prompts: ~2 KB per line for few-shot sets, so tens of thousands of lines."""
MAX_ROWS = 200_000


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class RowWire(_Wire):
    prompt: str = Field(min_length=1)
    task: str = ""
    score: float = Field(ge=0.0, le=1.0)
    prompt_tokens: float = Field(0.0, ge=0)
    completion_tokens: float = Field(ge=0)


class CalibrationWire(_Wire):
    model: Annotated[str, Field(min_length=1, max_length=253)]
    revision: str = Field("", max_length=128)
    dataset: str = Field("", max_length=1000)
    rows: list[RowWire] = Field(min_length=1, max_length=MAX_ROWS)


def parse_calibration(body: bytes) -> Calibration:
    """The pushed calibration, or a 400 naming the first bad field."""
    data = parse_json_object(body)
    try:
        wire = CalibrationWire.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise errors.bad_request(f"Bad calibration: {where}: {message}.", param=where or None) from None
    rows = tuple(
        CalibratedRow(
            prompt=r.prompt,
            score=r.score,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            task=r.task,
        )
        for r in wire.rows
    )
    return Calibration(model=wire.model, revision=wire.revision, rows=rows, dataset=wire.dataset)
