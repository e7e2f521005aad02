"""The pure capacity model: timing, batching, queueing, KV cache and preemption."""

from __future__ import annotations

import pytest

from router_service.simulator.capacity import Scheduler, SeqState
from router_service.simulator.profile import SimulatorProfile


def profile(**fields: object) -> SimulatorProfile:
    base: dict[str, object] = {
        "model": "m",
        "max_num_seqs": 4,
        "prefill_tokens_per_second": 1000.0,
        "decode_tokens_per_second": 100.0,
        "max_decode_throughput": 200.0,
        "kv_cache_tokens": 4096,
        "max_model_len": 1024,
        "block_size": 16,
    }
    return SimulatorProfile(**{**base, **fields})


def run(scheduler: Scheduler, start: float = 0.0, max_steps: int = 100_000) -> float:
    """Step until idle; returns the simulated end time."""
    now = start
    for _ in range(max_steps):
        result = scheduler.step(now)
        if result is None:
            return now
        now = result.end
    raise AssertionError("scheduler did not go idle")


def test_single_sequence_timing_is_prefill_then_one_decode_step_per_token() -> None:
    s = Scheduler(profile())
    seq = s.add(prompt_tokens=100, output_tokens=10, now=0.0)
    end = run(s)
    # The prefill step (100 tokens at 1000/s) emits token 1; nine decode steps at 1/100 s emit the rest.
    assert seq.first_token_at == pytest.approx(0.1)
    assert end == pytest.approx(0.1 + 9 * 0.01)
    assert seq.state is SeqState.FINISHED and seq.generated == 10
    assert s.used_blocks == 0 and s.kv_cache_usage == 0


def test_batch_beyond_max_num_seqs_waits_fifo() -> None:
    s = Scheduler(profile(max_num_seqs=2))
    seqs = [s.add(10, 5, now=0.0) for _ in range(6)]
    s.step(0.0)
    assert (s.num_running, s.num_waiting) == (2, 4)
    run(s)
    starts = [q.first_scheduled for q in seqs]
    assert starts == sorted(starts)  # FIFO admission
    assert starts[0] == starts[1] == 0.0 and starts[2] > 0 and starts[4] > starts[2]
    finishes = [q.finished_at for q in seqs]
    assert finishes[5] > 2.5 * finishes[0]  # the third wave ends well after the first


def test_per_sequence_decode_speed_falls_when_batch_exceeds_throughput_cap() -> None:
    s = Scheduler(profile(max_num_seqs=8))
    assert s.decode_step_seconds(1) == pytest.approx(0.01)  # 100 tok/s alone
    assert s.decode_step_seconds(2) == pytest.approx(0.01)  # cap 200 tok/s not reached
    assert s.decode_step_seconds(8) == pytest.approx(0.04)  # 200 tok/s shared by 8 -> 25 tok/s each


def test_default_throughput_cap_is_quarter_speed_at_full_batch() -> None:
    p = SimulatorProfile(model="m", max_num_seqs=64, decode_tokens_per_second=50)
    assert Scheduler(p).decode_step_seconds(64) == pytest.approx(4 / 50)


def test_kv_cache_usage_counts_blocks_of_running_sequences() -> None:
    s = Scheduler(profile(kv_cache_tokens=1024, max_model_len=512))
    s.add(prompt_tokens=100, output_tokens=50, now=0.0)
    s.step(0.0)
    # 100 prompt tokens + the slot of the first generated token -> 7 blocks of 16 out of 64.
    assert s.used_blocks == 7
    assert s.kv_cache_usage == pytest.approx(7 / 64)


def test_admission_waits_for_kv_cache_room() -> None:
    s = Scheduler(profile(kv_cache_tokens=512, max_model_len=512, max_num_seqs=8))
    first = s.add(prompt_tokens=300, output_tokens=10, now=0.0)
    second = s.add(prompt_tokens=300, output_tokens=10, now=0.0)
    s.step(0.0)
    assert first.state is SeqState.RUNNING and second.state is SeqState.WAITING
    run(s)
    assert second.first_scheduled is not None and first.finished_at is not None
    assert second.first_scheduled >= first.finished_at


def test_decode_growth_preempts_newest_sequence_and_it_recomputes() -> None:
    s = Scheduler(
        profile(kv_cache_tokens=256, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=4096)
    )
    a = s.add(prompt_tokens=100, output_tokens=100, now=0.0)
    b = s.add(prompt_tokens=100, output_tokens=100, now=0.0)
    run(s)
    assert s.num_preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0
    assert a.generated == b.generated == 100
    assert a.state is b.state is SeqState.FINISHED
    assert s.used_blocks == 0


def test_chunked_prefill_splits_long_prompts_across_steps() -> None:
    s = Scheduler(profile(max_num_batched_tokens=64))
    seq = s.add(prompt_tokens=200, output_tokens=1, now=0.0)
    steps = 0
    now = 0.0
    while (result := s.step(now)) is not None:
        assert result.prefill_tokens <= 64
        now = result.end
        steps += 1
    assert steps == 4 and seq.generated == 1  # 64 + 64 + 64 + 8
    assert now == pytest.approx(200 / 1000)


def test_prefill_only_sequences_finish_without_tokens() -> None:
    s = Scheduler(profile())
    seq = s.add(prompt_tokens=50, output_tokens=0, now=0.0)
    result = s.step(0.0)
    assert result is not None and result.finished == [seq] and result.tokens == []
    assert seq.prompt_done and seq.generated == 0


def test_abort_frees_slot_and_kv() -> None:
    s = Scheduler(profile(max_num_seqs=1))
    running = s.add(100, 50, now=0.0)
    waiting = s.add(100, 50, now=0.0)
    s.step(0.0)
    assert s.used_blocks > 0
    assert s.abort(running)
    assert s.used_blocks == 0 and s.num_running == 0
    assert s.abort(waiting) and s.num_waiting == 0
    assert not s.abort(waiting)  # already gone
    assert s.step(1.0) is None


def test_slowdown_stretches_steps() -> None:
    s = Scheduler(profile())
    s.add(100, 5, now=0.0)
    result = s.step(0.0, slowdown=3.0)
    assert result is not None and result.duration == pytest.approx(0.3)


def test_rejects_sequences_longer_than_max_model_len() -> None:
    s = Scheduler(profile(max_model_len=128))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add(100, 50, now=0.0)


def test_profile_requires_kv_cache_for_one_longest_sequence() -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        SimulatorProfile(model="m", kv_cache_tokens=1000, max_model_len=2048)
