"""The fault suite's core assertions under a live load (CI-sized version of benchmarks/faults.py).

Three simulators and the router run as real subprocesses; a backend is killed, made to answer
500s, made to hang, and the router itself is restarted, while an open-loop load keeps arriving.
Every request must end (answer or visible error) before the client deadline, and traffic must
leave the failing model and return to it once it recovers.
"""

from __future__ import annotations

from types import ModuleType

DEADLINE = 10.0
RATE = 10.0


def ended_well(bench: ModuleType, outcomes: list) -> None:
    kinds = [bench.classify(o) for o in outcomes]
    assert outcomes, "the load generator sent nothing"
    assert kinds.count("lost") == 0, "requests never ended"
    assert kinds.count("hung") == 0, "requests hung past the client deadline"
    slow = [o.latency for o in outcomes if o.latency is not None and o.latency > DEADLINE]
    assert not slow, f"answers slower than the {DEADLINE} s deadline: {slow}"


def ok_share(outcomes: list, phase: str) -> float:
    mine = [o for o in outcomes if o.tag == phase]
    return sum(o.ok for o in mine) / len(mine)


async def test_traffic_leaves_a_dead_or_failing_backend_and_comes_back(
    bench: ModuleType, stack: object, prompts: list[str]
) -> None:
    Phase = bench.Phase
    phases = [
        Phase("baseline", 2.0),
        Phase("killed", 3.0, lambda st: st.kill_sim("strong"), failing="strong"),
        Phase("restarted", 4.0, lambda st: st.restart_sim("strong")),
        Phase("500s", 3.0, lambda st: st.set_faults("strong", error_rate=1.0), failing="strong"),
        Phase("cleared", 3.0, lambda st: st.clear_faults("strong")),
    ]
    outcomes = await bench.run_phases(stack, phases, rate=RATE, deadline=DEADLINE, prompts=prompts)
    ended_well(bench, outcomes)
    by_name = {p.name: p for p in phases}

    def strong_share(name: str) -> float:
        return bench.second_half_share(outcomes, by_name[name], "strong")

    # Premise: with no budgets the strong model ranks first for most prompts.
    assert strong_share("baseline") >= 0.5
    # Dead backend: requests fail over (connect refused is retryable), none reach it.
    assert ok_share(outcomes, "killed") >= 0.9
    assert strong_share("killed") == 0.0
    # Back on the same port: traffic returns.
    assert strong_share("restarted") >= 0.5
    # 500s before the first byte are retried on the next model.
    assert ok_share(outcomes, "500s") >= 0.9
    assert strong_share("500s") == 0.0
    assert strong_share("cleared") >= 0.5


async def test_a_hanging_backend_and_a_router_restart_lose_nothing(
    bench: ModuleType, stack: object, prompts: list[str]
) -> None:
    Phase = bench.Phase
    phases = [
        Phase("baseline", 1.0),
        Phase("hang", 3.0, lambda st: st.set_faults("strong", hang=True), failing="strong"),
        Phase("cleared", 2.0, lambda st: st.clear_faults("strong")),
        Phase("router restart", 4.0, lambda st: st.restart_router()),
        Phase("recovered", 3.0),
    ]
    outcomes = await bench.run_phases(stack, phases, rate=RATE, deadline=DEADLINE, prompts=prompts)
    ended_well(bench, outcomes)
    # The router gives up on the hung backend after firstByteTimeoutSeconds (1 s, not the 10 s
    # total) and falls back; after 3 such failures its breaker keeps traffic away.
    assert ok_share(outcomes, "hang") >= 0.9
    hang_latency = max(o.latency for o in outcomes if o.tag == "hang")
    assert hang_latency < stack.first_byte_timeout + 3.0
    # While the router restarts, clients see refused connections (a clear error), never a hang
    # or a cut answer: in-flight requests are drained before the old process exits.
    restart = [bench.classify(o) for o in outcomes if o.tag == "router restart"]
    assert set(restart) <= {"ok", "clear-error"}, restart
    recovered = sorted((o for o in outcomes if o.tag == "recovered"), key=lambda o: o.start)
    tail = recovered[len(recovered) // 2 :]
    assert tail and all(o.ok for o in tail), [(o.status, o.error) for o in tail]
