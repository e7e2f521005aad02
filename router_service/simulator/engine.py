"""Drives the pure `Scheduler` in real time on one asyncio task, and feeds metrics and waiters.

One loop iteration = one engine step for the whole batch: the engine asks the scheduler for the
step, sleeps for its (scaled) duration, then wakes every request that got tokens. Requests never
poll; each HTTP request waits on one `asyncio.Event` shared by its sequences.

Time: the simulated clock is ``(monotonic() - start) * speedup``. Steps are paced against
deadlines rather than by sleeping for each duration, so timer overshoot does not accumulate;
when the process falls behind (CPU-starved), steps run back to back to catch up, and a lag of
more than `MAX_LAG_SECONDS` of wall time is forgiven so a stall does not become a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from router_service.simulator.capacity import Scheduler, SeqState, Sequence, StepResult
from router_service.simulator.faults import FaultInjector
from router_service.simulator.metrics import SimulatorMetrics
from router_service.simulator.profile import SimulatorProfile

log = logging.getLogger(__name__)

MAX_LAG_SECONDS = 0.05
MIN_SLEEP_SECONDS = 0.0005


class EngineStopped(RuntimeError):
    """The engine shut down while a request was in it."""


@dataclass(eq=False)
class RequestHandle:
    """One sequence as its HTTP handler sees it."""

    seq: Sequence
    created_at: float  # simulated time the HTTP request arrived (TTFT and e2e start here)
    finish_reason: str  # reported when all output tokens are generated ("length" or "stop")
    notify: asyncio.Event
    delivered: int = 0  # tokens generated and announced to the handler
    done: bool = False
    error: BaseException | None = None
    last_token_at: float | None = None


class Engine:
    """The asyncio side of one simulator: owns the scheduler, the clock and the step loop."""

    def __init__(
        self,
        profile: SimulatorProfile,
        faults: FaultInjector,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = profile
        self.faults = faults
        self.scheduler = Scheduler(profile)
        self.metrics = SimulatorMetrics(
            profile.model,
            profile.max_model_len,
            running=lambda: self.scheduler.num_running,
            waiting=lambda: self.scheduler.num_waiting,
            kv_cache_usage=lambda: self.scheduler.kv_cache_usage,
            preemptions=lambda: self.scheduler.num_preemptions,
        )
        self._clock = clock
        self._t0 = clock()
        self._handles: dict[int, RequestHandle] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sim-engine-{self.profile.model}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in list(self._handles.values()):
            self.scheduler.abort(handle.seq)
            handle.error = EngineStopped("the simulator is shutting down")
            handle.notify.set()
        self._handles.clear()

    # ---- time ----------------------------------------------------------------------------
    def now(self) -> float:
        """Simulated seconds since the engine was created."""
        return (self._clock() - self._t0) * self.profile.speedup

    async def sleep_simulated(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds / self.profile.speedup)

    # ---- requests ------------------------------------------------------------------------
    def submit(
        self,
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: str,
        created_at: float,
        notify: asyncio.Event,
    ) -> RequestHandle:
        if self._task is None or self._wake is None:
            raise EngineStopped("the simulator engine is not running")
        seq = self.scheduler.add(prompt_tokens, output_tokens, self.now())
        handle = RequestHandle(seq, created_at, finish_reason, notify)
        self._handles[seq.seq_id] = handle
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Forget a request whose client went away (no-op once it finished)."""
        if self._handles.pop(handle.seq.seq_id, None) is not None:
            self.scheduler.abort(handle.seq)

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail every waiter instead of leaving them hanging
            log.exception("simulator engine for %s crashed", self.profile.model)
            self._task = None
            for handle in list(self._handles.values()):
                handle.error = exc
                handle.notify.set()
            self._handles.clear()

    async def _loop(self) -> None:
        assert self._wake is not None
        speedup = self.profile.speedup
        deadline: float | None = None
        while True:
            now = self.now()
            if deadline is None or deadline < now - MAX_LAG_SECONDS * speedup:
                deadline = now
            result = self.scheduler.step(deadline, self.faults.settings.slowdown)
            if result is None:
                self._wake.clear()
                await self._wake.wait()
                deadline = None
                continue
            self.steps += 1
            deadline = result.end
            ahead = (result.end - self.now()) / speedup
            await asyncio.sleep(ahead if ahead > MIN_SLEEP_SECONDS else 0)
            self._deliver(result)

    def _deliver(self, result: StepResult) -> None:
        m = self.metrics
        for seq in result.prompts_done:
            if seq.seq_id in self._handles:
                m.prompt_tokens.inc(seq.prompt_tokens)
        if result.tokens:
            m.generation_tokens.inc(sum(1 for s in result.tokens if s.seq_id in self._handles))
        for seq in result.tokens:
            handle = self._handles.get(seq.seq_id)
            if handle is None:
                continue
            if handle.last_token_at is None:
                m.time_to_first_token.observe(max(0.0, result.end - handle.created_at))
            else:
                m.inter_token_latency.observe(result.end - handle.last_token_at)
            handle.last_token_at = result.end
            handle.delivered = seq.generated
            handle.notify.set()
        for seq in result.finished:
            handle = self._handles.pop(seq.seq_id, None)
            if handle is None or seq.state is not SeqState.FINISHED:
                continue
            end = result.end
            scheduled = seq.first_scheduled if seq.first_scheduled is not None else end
            first = seq.first_token_at if seq.first_token_at is not None else end
            m.e2e_request_latency.observe(max(0.0, end - handle.created_at))
            m.request_queue_time.observe(max(0.0, scheduled - seq.arrival))
            m.request_prefill_time.observe(max(0.0, first - scheduled))
            m.request_decode_time.observe(max(0.0, end - first))
            m.request_prompt_tokens.observe(seq.prompt_tokens)
            m.request_generation_tokens.observe(seq.generated)
            m.request_success("length" if handle.finish_reason == "length" else "stop")
            handle.delivered = seq.generated
            handle.done = True
            handle.notify.set()
