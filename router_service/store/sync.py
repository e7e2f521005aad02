"""Keeps a routing engine in step with the state store: the dual prices, the learned history
entries and the routed-query count that the router replicas share.

- Dual prices: every fit the engine runs itself is published; every replica routes with the
  highest published version (the newest fit in the fleet), except that an engine keeps a fit of
  its own that is newer than what it adopted.
- Learned entries: every entry in the store, this replica's and the others', goes into the
  engine's neighbour index once; a new engine (a config reload) gets all of them before it serves.
- Volume: the engine's routed-query count goes to the store, the fleet's count comes back (the
  re-fits spread the remaining budget over the remaining queries of the whole fleet).
- Calibrations: when the store holds calibrations the engine does not route with (pushed to
  another replica, or while this one was building), `on_calibrations_outdated` is called; the
  runtime then builds a new engine with them (an engine is built with its calibrations, not
  patched).

`EngineSync.run` steps every `state.syncIntervalSeconds` and at once when the store reports news.
With the store's own sync at the same interval, a re-fit or feedback on one replica is in use on
every other replica within two intervals (1 s at the default 0.5 s) while Redis answers.

Engines are duck-typed: a test double without these methods is simply left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router_service.store.base import StateStore

log = logging.getLogger("tollway.state")


@dataclass
class _Progress:
    """How far one engine is in step with the store."""

    learned: int = 0
    gamma_version: int = 0
    fits_published: int = 0
    fits_at_adoption: int = 0
    observed: int = 0


class EngineSync:
    """Moves shared state between one store and whichever engine is current."""

    def __init__(self, store: StateStore, interval_seconds: float) -> None:
        self.store = store
        self.interval = interval_seconds
        self.on_calibrations_outdated: Callable[[], None] | None = None
        self._progress: weakref.WeakKeyDictionary[Any, _Progress] = weakref.WeakKeyDictionary()
        self._lock = asyncio.Lock()
        self._news: asyncio.Event | None = None

    def _of(self, engine: Any) -> _Progress:
        progress = self._progress.get(engine)
        if progress is None:
            progress = self._progress[engine] = _Progress()
        return progress

    async def step(self, engine: Any) -> None:
        """One exchange: publish new fits, adopt the newest gamma, add new learned entries, trade
        query counts."""
        async with self._lock:
            progress = self._of(engine)
            self._publish_fits(engine, progress)
            self._adopt_gamma(engine, progress)
            await self._add_learned(engine, progress)
            self._trade_counts(engine, progress)
            self._check_calibrations(engine)

    def _check_calibrations(self, engine: Any) -> None:
        outdated = getattr(engine, "calibration_outdated", None)
        if outdated is None or self.on_calibrations_outdated is None:
            return
        if outdated(self.store.calibrations()):
            self.on_calibrations_outdated()

    def _publish_fits(self, engine: Any, progress: _Progress) -> None:
        fits = getattr(engine, "local_fits", None)
        if isinstance(fits, int) and fits > progress.fits_published:
            progress.fits_published = fits
            self.store.publish_gamma(dict(engine.gamma))

    def _adopt_gamma(self, engine: Any, progress: _Progress) -> None:
        adopt = getattr(engine, "adopt_gamma", None)
        shared = self.store.shared_gamma()
        if adopt is None or shared is None or shared.version <= progress.gamma_version:
            return
        progress.gamma_version = shared.version
        fits = getattr(engine, "local_fits", 0)
        if shared.origin == self.store.replica_id and fits > progress.fits_at_adoption:
            return  # one of our own fits, and the engine holds it (or a newer one of ours) already
        adopt(shared.gamma)
        progress.fits_at_adoption = fits if isinstance(fits, int) else 0
        log.debug("adopted dual prices version %d from %s", shared.version, shared.origin)

    async def _add_learned(self, engine: Any, progress: _Progress) -> None:
        add = getattr(engine, "add_learned", None)
        if add is None:
            return
        entries = list(self.store.learned(progress.learned))
        if not entries:
            return
        try:
            await asyncio.to_thread(add, entries)  # embeds the prompts: off the event loop
        except Exception:
            log.exception("adding %d learned history entries failed; skipping them", len(entries))
        progress.learned += len(entries)

    def _trade_counts(self, engine: Any, progress: _Progress) -> None:
        controller = getattr(engine, "controller", None)
        observed = getattr(controller, "observed", None)
        if not isinstance(observed, int) or not hasattr(engine, "fleet_observed"):
            return
        delta = observed - progress.observed if observed >= progress.observed else observed  # new window
        progress.observed = observed
        if delta:
            self.store.note_queries(delta)
        engine.fleet_observed = self.store.window_queries()

    async def run(self, current_engine: Callable[[], Any]) -> None:
        """Step forever (cancel to stop): every interval, and when the store has news."""
        loop = asyncio.get_running_loop()
        news = self._news = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to wake
                loop.call_soon_threadsafe(news.set)

        self.store.on_change(wake)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), self.interval)
            news.clear()
            try:
                await self.step(current_engine())
            except Exception:
                log.exception("state sync step failed; trying again")
