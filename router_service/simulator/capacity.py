"""The capacity model: a pure, clock-free imitation of vLLM's continuous-batching scheduler.

`Scheduler.step(now)` runs one engine iteration starting at simulated time `now` and says how
long it takes and what it produced. Nothing here sleeps or touches asyncio; the engine
(`engine.py`) drives it in real time. The model:

- **Waiting queue, FIFO.** A request waits until fewer than ``max_num_seqs`` sequences run and
  the KV cache has free blocks for its whole prompt; the head of the queue blocks the rest
  (no overtaking), as in vLLM.
- **One step = one forward pass.** Every decoding sequence gets one token; the rest of the
  ``max_num_batched_tokens`` budget goes to prefill chunks of admitted sequences, oldest first
  (chunked prefill). A sequence whose prefill completes emits its first token in that step.
- **Step time** = prefill tokens / ``prefill_tokens_per_second`` + decode time, where decoding
  ``b`` sequences takes ``max(1 / decode_tokens_per_second, b / decode_throughput_cap)``: alone
  a sequence decodes at the profile's speed, a big batch shares a fixed throughput (memory-
  bandwidth bound, as real engines are), so per-sequence speed falls as load grows.
- **KV cache** is counted in blocks of ``block_size`` tokens: a running sequence holds blocks for
  its prompt plus generated tokens; ``kv_cache_usage`` = used / total blocks.
- **Preemption.** When decoding needs a new block and none is free, the most recently admitted
  sequence is preempted (recompute mode): its blocks are freed and it goes back to the head of
  the waiting queue, to prefill prompt + generated tokens again later.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from router_service.simulator.profile import SimulatorProfile


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Sequence:
    """One sequence in the engine. `output_tokens` = 0 means prefill only (embeddings)."""

    seq_id: int
    prompt_tokens: int
    output_tokens: int
    arrival: float
    state: SeqState = SeqState.WAITING
    generated: int = 0
    prefilled: int = 0
    kv_tokens: int = 0
    kv_blocks: int = 0
    preemptions: int = 0
    prompt_done: bool = False
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    @property
    def prefill_target(self) -> int:
        """Tokens whose KV must be computed before the next token: prompt + tokens generated so far."""
        return self.prompt_tokens + self.generated

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prefill_target


@dataclass
class StepResult:
    """What one engine step did; times are simulated seconds."""

    start: float
    end: float
    decoded: int = 0
    prefill_tokens: int = 0
    tokens: list[Sequence] = field(default_factory=list)  # sequences that got one new token at `end`
    prompts_done: list[Sequence] = field(default_factory=list)  # first complete prefill of the prompt
    finished: list[Sequence] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


class Scheduler:
    """Continuous batching over a FIFO waiting queue and a block-granular KV cache."""

    def __init__(self, profile: SimulatorProfile) -> None:
        self.profile = profile
        self.block_size = profile.block_size
        self.total_blocks = profile.kv_cache_tokens // profile.block_size
        self.used_blocks = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._next_id = 0
        longest = self._blocks(profile.max_model_len)
        if longest > self.total_blocks:
            raise ValueError(
                f"kv_cache_tokens {profile.kv_cache_tokens} holds {self.total_blocks} blocks of "
                f"{profile.block_size} tokens, fewer than the {longest} a max_model_len sequence needs"
            )

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV cache blocks in use (vllm:kv_cache_usage_perc, 1 = 100%)."""
        return self.used_blocks / self.total_blocks

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def decode_step_seconds(self, batch: int) -> float:
        """Time of one decode step for `batch` sequences (without prefill work)."""
        if batch <= 0:
            return 0.0
        return max(1.0 / self.profile.decode_tokens_per_second, batch / self.profile.decode_throughput_cap)

    # ---- changes -------------------------------------------------------------------------
    def add(self, prompt_tokens: int, output_tokens: int, now: float) -> Sequence:
        """Queue a new sequence; prompt + output must fit in max_model_len."""
        if prompt_tokens < 1 or output_tokens < 0:
            raise ValueError(f"bad sequence: prompt_tokens={prompt_tokens}, output_tokens={output_tokens}")
        if prompt_tokens + output_tokens > self.profile.max_model_len:
            raise ValueError(
                f"sequence of {prompt_tokens}+{output_tokens} tokens exceeds max_model_len "
                f"{self.profile.max_model_len}"
            )
        seq = Sequence(self._next_id, prompt_tokens, output_tokens, arrival=now)
        self._next_id += 1
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> bool:
        """Drop a sequence wherever it is (the client went away); frees its KV blocks."""
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        elif seq.state is SeqState.RUNNING:
            self.running.remove(seq)
            self._free(seq)
        else:
            return False
        seq.state = SeqState.ABORTED
        return True

    def step(self, now: float, slowdown: float = 1.0) -> StepResult | None:
        """Run one engine iteration starting at `now`; None when there is nothing to run."""
        self._admit(now)
        if not self.running:
            return None
        self._make_room_for_decode()
        decoding = [s for s in self.running if not s.in_prefill]
        budget = self.profile.max_num_batched_tokens - len(decoding)
        prefill: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_prefill:
                chunk = min(seq.prefill_target - seq.prefilled, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        result = StepResult(start=now, end=now, decoded=len(decoding))
        result.prefill_tokens = sum(chunk for _, chunk in prefill)
        seconds = result.prefill_tokens / self.profile.prefill_tokens_per_second
        seconds += self.decode_step_seconds(len(decoding))
        result.end = now + seconds * slowdown

        for seq in decoding:
            self._emit(seq, result)
        for seq, chunk in prefill:
            seq.prefilled += chunk
            if seq.in_prefill:
                continue
            if not seq.prompt_done:
                seq.prompt_done = True
                result.prompts_done.append(seq)
            if seq.generated < seq.output_tokens:
                self._emit(seq, result)
            else:
                self._finish(seq, result)
        return result

    # ---- internals -----------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _free(self, seq: Sequence) -> None:
        self.used_blocks -= seq.kv_blocks
        seq.kv_blocks = 0
        seq.kv_tokens = 0

    def _admit(self, now: float) -> None:
        while self.waiting and len(self.running) < self.profile.max_num_seqs:
            seq = self.waiting[0]
            # Blocks for the whole prefill, plus the slot of the token that prefill emits.
            reserve = seq.prefill_target + (1 if seq.generated < seq.output_tokens else 0)
            need = self._blocks(reserve)
            if need > self.total_blocks - self.used_blocks:
                break
            self.waiting.popleft()
            seq.state = SeqState.RUNNING
            seq.prefilled = 0
            seq.kv_tokens = seq.prefill_target
            seq.kv_blocks = need
            self.used_blocks += need
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.running.append(seq)

    def _make_room_for_decode(self) -> None:
        """Preempt the newest sequences until every decoding sequence can grow by one token."""
        while len(self.running) > 1:
            growing = sum(
                1 for s in self.running if not s.in_prefill and self._blocks(s.kv_tokens + 1) > s.kv_blocks
            )
            if growing <= self.total_blocks - self.used_blocks:
                return
            victim = self.running.pop()
            self._free(victim)
            victim.state = SeqState.WAITING
            victim.prefilled = 0
            victim.preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(victim)

    def _emit(self, seq: Sequence, result: StepResult) -> None:
        seq.generated += 1
        seq.kv_tokens += 1
        need = max(seq.kv_blocks, self._blocks(seq.kv_tokens))
        self.used_blocks += need - seq.kv_blocks
        seq.kv_blocks = need
        seq.prefilled = seq.prefill_target  # the token's KV is written by the next decode pass
        if seq.first_token_at is None:
            seq.first_token_at = result.end
        seq.last_token_at = result.end
        result.tokens.append(seq)
        if seq.generated >= seq.output_tokens:
            self._finish(seq, result)

    def _finish(self, seq: Sequence, result: StepResult) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.state = SeqState.FINISHED
        seq.finished_at = result.end
        result.finished.append(seq)
