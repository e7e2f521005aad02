"""Fault injection: make a simulator misbehave on purpose, at start-up or at runtime.

The knobs (all off by default):

- ``error_rate``: this fraction of inference requests is answered with ``error_status``
  (500 by default) in the OpenAI error shape, before any work is done. Which requests fail
  is decided by a seeded random generator, so a run is reproducible.
- ``hang``: inference requests are accepted but get no answer while ``hang`` stays on; when it
  is switched off they proceed normally (a client timeout is the only way out meanwhile).
- ``die_after_tokens``: the connection is dropped after this many generated tokens: streams
  stop without a final chunk or ``[DONE]``, non-streamed answers are cut mid-body.
- ``slowdown``: every engine step and the front-end overhead take this many times longer
  (a throttled or shared GPU).
- ``unhealthy``: ``GET /health`` answers 503 (what a readiness probe would see).

At runtime: ``GET /admin/faults`` shows them, ``POST /admin/faults`` with a JSON object sets the
given fields and leaves the others, ``DELETE /admin/faults`` clears all.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(
        0.0, ge=0, le=1, description="Fraction of inference requests answered with an error."
    )
    error_status: int = Field(500, ge=400, le=599, description="HTTP status of injected errors.")
    hang: bool = Field(False, description="Inference requests get no answer while this is on.")
    die_after_tokens: int | None = Field(
        None, ge=0, description="Drop the connection after this many generated tokens (per request)."
    )
    slowdown: float = Field(1.0, ge=1.0, le=1000, description="Multiplier on every simulated duration.")
    unhealthy: bool = Field(False, description="GET /health answers 503.")


class FaultInjector:
    """The live fault settings of one simulator, plus the machinery to act on them."""

    def __init__(self, settings: FaultSettings, seed: int = 0) -> None:
        self._settings = settings
        self._rng = random.Random(seed)
        self._released: asyncio.Event | None = None

    @property
    def settings(self) -> FaultSettings:
        return self._settings

    def update(self, changes: dict[str, Any]) -> FaultSettings:
        """Apply a partial update (validated as a whole); raises pydantic.ValidationError."""
        merged = FaultSettings.model_validate({**self._settings.model_dump(), **changes})
        self._set(merged)
        return merged

    def reset(self) -> FaultSettings:
        self._set(FaultSettings())
        return self._settings

    def _set(self, settings: FaultSettings) -> None:
        self._settings = settings
        if not settings.hang and self._released is not None:
            self._released.set()
            self._released = None

    def should_fail(self) -> bool:
        """Draw whether this request gets an injected error."""
        rate = self._settings.error_rate
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    async def wait_while_hung(self) -> None:
        """Block while `hang` is on (must be called on the simulator's event loop)."""
        while self._settings.hang:
            if self._released is None:
                self._released = asyncio.Event()
            await self._released.wait()
