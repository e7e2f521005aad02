"""Calibrated columns joined onto the routing history: a backend's own measurements replace the
borrowed `profile` columns wherever it was measured.

A calibration (`router_service.store.base.Calibration`, pushed by `tollway calibrate`) holds, per
calibration line, the backend's score and true token counts. Joined onto the history (whose
columns are the backends' profiles, in backend order):

- a history row whose prompt was calibrated gets the measured score and the measured completion
  tokens for that backend (several calibration lines with one prompt: their mean);
- a calibrated prompt the history does not have becomes an extra entry carrying the measured values
  of every backend calibrated on it; the engine estimates the other backends' values from their
  neighbours, as it does for a learned entry;
- everything else keeps the profile's values: the profile remains the prior where nothing was
  measured (and for a backend never calibrated, everywhere).

The built-in calibration set's prompts are the shipped history's, so calibrating on it replaces the
profile's values row for row. Pure functions; the engine calls `join_calibrations` when it is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router_service.config import BackendConfig
from router_service.routing.history import History
from router_service.store.base import Calibration, LearnedEntry


def applicable(
    calibrations: Mapping[str, Calibration], backends: Sequence[BackendConfig]
) -> dict[str, Calibration]:
    """Per backend, the calibration it is routed with: the one pushed for its name, when the
    backend names no `calibrationRevision` or names this calibration's revision."""
    out: dict[str, Calibration] = {}
    for backend in backends:
        calibration = calibrations.get(backend.name)
        if calibration is None or not calibration.rows:
            continue
        if backend.calibration_revision is not None and calibration.revision != backend.calibration_revision:
            continue
        out[backend.name] = calibration
    return out


def fingerprint(calibrations: Mapping[str, Calibration], backends: Sequence[BackendConfig]) -> str:
    """Identifies what a set of backends is routed with ("" when nothing is calibrated): equal
    fingerprints, equal engines."""
    used = applicable(calibrations, backends)
    if not used:
        return ""
    text = json.dumps(sorted((name, c.digest) for name, c in used.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class JoinedHistory:
    """The history with calibrated columns, plus the calibrated prompts it did not have."""

    history: History
    extra: list[LearnedEntry] = field(default_factory=list)
    """Calibrated prompts the history lacks: measured values for the backends calibrated on them."""
    matched: dict[str, int] = field(default_factory=dict)
    """Per calibrated backend: history rows whose values are now measured ones."""
    added: dict[str, int] = field(default_factory=dict)
    """Per calibrated backend: extra entries carrying its measured values."""


def _per_prompt(calibration: Calibration) -> dict[str, tuple[float, float]]:
    """prompt -> (mean score, mean completion tokens) over the calibration's lines."""
    sums: dict[str, list[float]] = {}
    for row in calibration.rows:
        acc = sums.setdefault(row.prompt, [0.0, 0.0, 0.0])
        acc[0] += row.score
        acc[1] += row.completion_tokens
        acc[2] += 1
    return {prompt: (s / n, c / n) for prompt, (s, c, n) in sums.items()}


def join_calibrations(history: History, calibrations: Mapping[str, Calibration]) -> JoinedHistory:
    """`history` (columns = backend names) with each calibrated backend's measurements in place of
    its profile's values; see the module docstring. `calibrations`: backend name -> calibration
    (only backends of the history are used)."""
    used = {name: c for name, c in calibrations.items() if name in history.models}
    if not used:
        return JoinedHistory(history)
    rows_of: dict[str, list[int]] = {}
    for i, prompt in enumerate(history.prompts):
        rows_of.setdefault(prompt, []).append(i)
    scores = history.scores.copy()
    tokens = history.tokens.copy()
    prompt_tokens = history.prompt_tokens  # the router's own estimate, which the engine subtracts
    extra_quality: dict[str, dict[str, float]] = {}
    extra_completion: dict[str, dict[str, float]] = {}
    matched: dict[str, int] = {}
    added: dict[str, int] = {}
    for name, calibration in sorted(used.items()):
        j = history.models.index(name)
        matched[name] = added[name] = 0
        for prompt, (score, completion) in _per_prompt(calibration).items():
            rows = rows_of.get(prompt)
            if rows is None:
                extra_quality.setdefault(prompt, {})[name] = score
                extra_completion.setdefault(prompt, {})[name] = completion
                added[name] += 1
                continue
            for i in rows:
                scores[i, j] = score
                tokens[i, j] = prompt_tokens[i] + completion
            matched[name] += len(rows)
    joined = History(
        prompts=history.prompts,
        models=list(history.models),
        scores=scores,
        costs=history.costs,
        tokens=tokens,
        eval_names=history.eval_names,
        split=history.split,
        skipped=history.skipped,
    )
    extra = [
        LearnedEntry(
            prompt=prompt,
            quality=extra_quality[prompt],
            completion=extra_completion[prompt],
            uid=f"calibration:{n}",  # never stored: unique within this join is enough
        )
        for n, prompt in enumerate(extra_quality)
    ]
    return JoinedHistory(joined, extra, matched, added)
