"""Property-based fuzzing of the router's HTTP API: never a 5xx, and it still answers afterwards."""

from __future__ import annotations

from types import ModuleType

import httpx


def test_fuzzed_requests_never_get_a_5xx(bench: ModuleType, stack: object) -> None:
    result = bench.fuzz_router(
        stack.router_url, examples=100, max_request_bytes=stack.max_request_bytes, raise_on_failure=True
    )
    assert result["failures"] == []
    assert sum(result["statuses"].values()) == 100
    # The strategies must reach validation, not only routing errors: some 400s, some answers.
    assert any(code.startswith("4") for code in result["statuses"])


def test_raw_http_garbage_never_gets_a_5xx(bench: ModuleType, stack: object) -> None:
    answers = bench.raw_http_garbage("127.0.0.1", stack.router_port)
    for case, status_line in answers.items():
        parts = status_line.split()
        if status_line.startswith("HTTP/") and len(parts) > 1:
            assert not parts[1].startswith("5"), f"{case}: {status_line}"


def test_router_still_serves_after_fuzzing(bench: ModuleType, stack: object) -> None:
    bench.fuzz_router(stack.router_url, examples=40, max_request_bytes=stack.max_request_bytes, seed=1)
    assert stack.router.alive()
    assert httpx.get(f"{stack.router_url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{stack.router_url}/readyz", timeout=5).status_code == 200
    resp = httpx.post(
        f"{stack.router_url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
