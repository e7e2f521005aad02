"""Config reload on file change, without dropping requests.

The operator updates the router's ConfigMap; the kubelet swaps the mounted file (a symlink
flip). `ConfigWatcher` notices by polling `stat()` (cheap) and then the content hash (so a touch
or a flip to identical content does nothing). A new config is parsed and validated, the new state
is built off the event loop (an engine rebuild can take seconds), and then swapped in with one
reference assignment. A bad file is reported and ignored: the router keeps serving the last good
config. The budget ledger is resized, never rebuilt, so spent budget stays spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError

from router_service.config import RouterConfig, load_router_config
from router_service.proxy.state import EngineFactory, Runtime, build_state

log = logging.getLogger("tollway.reload")

ReloadOutcome = Literal["applied", "unchanged", "invalid", "failed"]


def stat_fingerprint(paths: Iterable[str | Path]) -> tuple:
    """(path, inode, size, mtime) of every file; a missing file reads as None."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), None))
    return tuple(out)


def content_digest(paths: Iterable[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
        try:
            h.update(Path(p).read_bytes())
        except OSError:
            h.update(b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def watched_paths(config_path: Path, config: RouterConfig) -> list[Path]:
    paths = [config_path]
    if config.auth.bearer_tokens_file:
        paths.append(Path(config.auth.bearer_tokens_file))
    return paths


async def reload_from(runtime: Runtime, path: Path, engine_factory: EngineFactory) -> ReloadOutcome:
    """Read `path`, and when it is valid switch the runtime to it. Never raises."""
    try:
        config = load_router_config(path)
    except (OSError, ValueError, ValidationError, yaml.YAMLError) as exc:
        log.error("config reload: %s is invalid, keeping the running config: %s", path, exc)
        runtime.metrics.reloads.labels("invalid").inc()
        return "invalid"
    async with runtime.rebuild_lock:  # a calibration rebuild in flight finishes first
        try:
            state = await asyncio.to_thread(
                build_state, config, engine_factory, runtime.ledger, runtime.state
            )
        except Exception as exc:
            log.exception("config reload: building the new router state failed, keeping the running config")
            runtime.metrics.reloads.labels("failed").inc()
            if isinstance(exc, ValueError):
                return "invalid"
            return "failed"
        await runtime.prepare(state)  # a new engine gets the shared prices and learned entries first
        runtime.apply(state)
    runtime.metrics.reloads.labels("applied").inc()
    log.info("config reloaded from %s (generation %d)", path, state.generation)
    return "applied"


class ConfigWatcher:
    """Polls the config file (and the tokens file it names) and reloads on change."""

    def __init__(
        self,
        path: Path,
        runtime: Runtime,
        engine_factory: EngineFactory,
        interval_seconds: float = 1.0,
        on_reload: Callable[[ReloadOutcome], Awaitable[None] | None] | None = None,
    ) -> None:
        self.path = path
        self.runtime = runtime
        self.engine_factory = engine_factory
        self.interval = interval_seconds
        self.on_reload = on_reload
        paths = watched_paths(path, runtime.state.config)
        self._stat = stat_fingerprint(paths)
        self._digest = content_digest(paths)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> ReloadOutcome:
        """One poll: reload when the watched files' content changed."""
        async with self._lock:
            paths = watched_paths(self.path, self.runtime.state.config)
            fingerprint = stat_fingerprint(paths)
            if fingerprint == self._stat:
                return "unchanged"
            self._stat = fingerprint
            digest = content_digest(paths)
            if digest == self._digest:
                return "unchanged"
            self._digest = digest  # a bad file is reported once, not every second
            outcome = await reload_from(self.runtime, self.path, self.engine_factory)
            if outcome == "applied":
                # The new config may name another tokens file: watch that from now on.
                paths = watched_paths(self.path, self.runtime.state.config)
                self._stat, self._digest = stat_fingerprint(paths), content_digest(paths)
        if self.on_reload is not None:
            result = self.on_reload(outcome)
            if asyncio.iscoroutine(result):
                await result
        return outcome

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                log.exception("config watch failed; trying again")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="tollway-config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
