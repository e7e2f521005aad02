"""`tollway simulate`: flags <-> profile, errors, and a real child process."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from router_service.simulator import FaultSettings, SimulatorProcess, SimulatorProfile, SimulatorServer
from router_service.simulator.cli import build_parser, main, profile_from_args, profile_to_argv


def test_flags_build_the_profile() -> None:
    args = build_parser().parse_args(
        [
            "--model", "m1", "--max-num-seqs", "8", "--prefill-tokens-per-second", "5000",
            "--decode-tokens-per-second", "40", "--ttft-ms", "30", "--kv-cache-tokens", "65536",
            "--max-model-len", "4096", "--speedup", "10", "--seed", "3", "--error-rate", "0.5", "--hang",
        ]
    )  # fmt: skip
    profile = profile_from_args(args)
    assert profile.model == "m1" and profile.max_num_seqs == 8 and profile.prefill_tokens_per_second == 5000
    assert (
        profile.decode_tokens_per_second == 40 and profile.ttft_ms == 30 and profile.kv_cache_tokens == 65536
    )
    assert profile.max_model_len == 4096 and profile.speedup == 10 and profile.seed == 3
    assert profile.faults == FaultSettings(error_rate=0.5, hang=True)
    assert args.host == "127.0.0.1"


def test_served_model_name_wins_like_vllm() -> None:
    args = build_parser().parse_args(["--model", "/models/llama", "--served-model-name", "llama"])
    assert profile_from_args(args).model == "llama"


def test_profile_round_trips_through_argv() -> None:
    profile = SimulatorProfile(
        model="rt",
        task="embed",
        max_num_seqs=3,
        max_decode_throughput=500.0,
        metrics_format="negotiate",
        faults=FaultSettings(die_after_tokens=7, unhealthy=True, slowdown=2.0),
    )
    args = build_parser().parse_args(profile_to_argv(profile))
    assert profile_from_args(args) == profile


def test_bad_values_exit_2_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--model", "m", "--kv-cache-tokens", "100", "--max-model-len", "4096"])
    assert info.value.code == 2
    assert "kv_cache_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--max-num-seqs", "0"])
    assert "max_num_seqs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--max-num-seqs", "4"])
    assert "--model" in capsys.readouterr().err


def test_child_process_serves_and_dies_on_kill() -> None:
    profile = SimulatorProfile(model="proc", speedup=50, max_num_seqs=2)
    with SimulatorProcess(profile) as sim:
        assert sim.url.startswith("http://127.0.0.1:")
        r = httpx.post(
            f"{sim.base_url}/completions", json={"model": "proc", "prompt": "hi", "max_tokens": 4}, timeout=10
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert (
            'vllm:num_requests_running{engine="0",model_name="proc"}' in httpx.get(f"{sim.url}/metrics").text
        )
        sim.kill()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{sim.url}/health", timeout=2)
    assert sim.process is not None and sim.process.returncode is not None


def test_api_key_from_the_flag_or_vllm_s_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert profile_from_args(build_parser().parse_args(["--model", "m"])).api_key is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert profile_from_args(build_parser().parse_args(["--model", "m"])).api_key == "from-env"
    args = build_parser().parse_args(["--model", "m", "--api-key", "from-flag"])
    assert profile_from_args(args).api_key == "from-flag"


def test_api_key_guards_v1_like_vllm(start_simulator: Callable[..., SimulatorServer]) -> None:
    server = start_simulator(api_key="s3cret")
    chat = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 401
        wrong = client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "Unauthorized"}
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        # Kubelet probes and Prometheus do not carry the key: /health and /metrics stay open.
        assert client.get("/health").status_code == 200
        assert "vllm:num_requests_running" in client.get("/metrics").text
