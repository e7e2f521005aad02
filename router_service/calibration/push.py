"""Handing a calibration to tollway routers (`tollway calibrate --push NAME=URL`).

After a run, each calibrated model's graded lines (from the journal, under the model's revision)
are POSTed to ``URL/v1/tollway/calibration`` of every router named (`proxy/calibration.py` takes
them: stored in the router's state store, routed with at once). A router that is starting, being
rolled or whose store is briefly unreachable answers 5xx/429 or not at all: the push is retried
with backoff (honouring ``Retry-After``); anything else (401, 400) fails at once. A failed push
makes `tollway calibrate` exit 1, and rerunning the same command (a Job's retry) sends nothing
to the models again, only the push.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from router_service.calibration.dataset import Dataset
from router_service.calibration.journal import Journal

PATH = "/v1/tollway/calibration"
ATTEMPTS = 6
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class PushTarget:
    """A router to hand calibrations to."""

    name: str
    url: str
    """The router's base URL (``http://chat-auto.default.svc``), with or without ``/v1``."""
    token: str | None = None
    """Its bearer token, when the router requires one."""

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1") + PATH


def read_token(path: str | Path) -> str:
    """The first token of a bearer tokens file (the router's format: one per line, `#` comments)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the push token file {str(path)!r}: {exc}") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise ValueError(f"the push token file {str(path)!r} holds no token")


def calibration_payload(
    dataset: Dataset, model: str, revision: str, journal: Journal, label: str
) -> dict[str, Any] | None:
    """What the router takes for one model: every line graded under `revision` (None: none is)."""
    rows = []
    for item in dataset.items:
        record = journal.graded(item.key, model, revision)
        if record is None:
            continue
        rows.append(
            {
                "prompt": item.prompt,
                "task": item.task,
                "score": record.score,
                "promptTokens": record.prompt_tokens,
                "completionTokens": record.completion_tokens,
            }
        )
    if not rows:
        return None
    return {"model": model, "revision": revision, "dataset": label, "rows": rows}


@dataclass(frozen=True)
class PushResult:
    target: str
    model: str
    ok: bool
    in_use: bool = False
    detail: str = ""


def _retry_after(resp: httpx.Response, default: float) -> float:
    try:
        return min(MAX_BACKOFF_SECONDS, max(0.0, float(resp.headers.get("retry-after", default))))
    except ValueError:
        return default


def _error(resp: httpx.Response) -> str:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:300]
    return f"HTTP {resp.status_code}: {message}"


def push(
    target: PushTarget,
    payload: dict[str, Any],
    *,
    client: httpx.Client,
    attempts: int = ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> PushResult:
    """POST one model's calibration to one router, retrying what may pass later."""
    headers = {"authorization": f"Bearer {target.token}"} if target.token else {}
    model = str(payload["model"])
    backoff = FIRST_BACKOFF_SECONDS
    detail = ""
    for attempt in range(1, attempts + 1):
        wait = backoff
        try:
            resp = client.post(target.endpoint, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"
        else:
            if resp.status_code == 200:
                answer = resp.json()
                return PushResult(
                    target.name, model, True, bool(answer.get("inUse")), str(answer.get("detail", ""))
                )
            detail = _error(resp)
            if resp.status_code != 429 and resp.status_code < 500:
                return PushResult(target.name, model, False, detail=detail)  # retrying will not help
            wait = _retry_after(resp, backoff)
        if attempt < attempts:
            sleep(wait)
            backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
    return PushResult(target.name, model, False, detail=f"{detail} (after {attempts} attempts)")
