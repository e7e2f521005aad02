"""The in-process store keeps what it learned across restarts (state file), and ignores a file the
shared store wrote."""

from __future__ import annotations

import json
import time

from router_service.store.base import LearnedEntry
from router_service.store.local import STATE_VERSION, LocalStateStore, learned_path


def entry(uid: str) -> LearnedEntry:
    return LearnedEntry("what is 2+2", {"small": 1.0, "big": 1.0}, {"small": 3.0, "big": 5.0}, uid)


def test_learned_entries_and_prices_survive_a_restart(tmp_path):
    state = tmp_path / "ledger.json"
    store = LocalStateStore(window_seconds=60, state_file=str(state))
    store.append_learned(entry("a"))
    store.append_learned(entry("b"))
    store.publish_gamma({"big": 0.25})
    store.close()
    with learned_path(state).open("a") as fh:
        fh.write('{"prompt": "torn')  # a crash in the middle of a write
    again = LocalStateStore(window_seconds=60, state_file=str(state))
    assert [e.uid for e in again.learned(0)] == ["a", "b"]
    assert [e.uid for e in again.learned(1)] == ["b"]
    gamma = again.shared_gamma()
    assert gamma is not None and gamma.gamma == {"big": 0.25} and gamma.origin != again.replica_id


def test_a_shared_stores_state_file_is_not_read_as_local_usage(tmp_path):
    state = tmp_path / "ledger.json"
    # Fields the in-process store would read as this window's usage, in a file of kind "redis".
    shared = {"version": STATE_VERSION, "kind": "redis", "anchor": 1.0, "journal": []}
    shared |= {"window_seconds": 60, "window_start_wall": time.time(), "used": {"m": 60.0}}
    state.write_text(json.dumps(shared))
    store = LocalStateStore(window_seconds=60, state_file=str(state))
    assert store.remaining("m", 100.0) == 100.0
    # The same fields in its own file are usage it keeps.
    state.write_text(json.dumps({k: v for k, v in shared.items() if k != "kind"}))
    assert LocalStateStore(window_seconds=60, state_file=str(state)).remaining("m", 100.0) == 40.0
