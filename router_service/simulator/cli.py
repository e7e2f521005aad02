"""`tollway simulate`: serve one simulated vLLM model.

    tollway simulate --model small --port 8001 --max-num-seqs 8 --decode-tokens-per-second 80

The flags map one to one onto `SimulatorProfile` fields (``--max-num-seqs`` -> ``max_num_seqs``).
``--port 0`` picks a free port. Once listening, one JSON line goes to stdout:
``{"event": "ready", "model": ..., "url": "http://127.0.0.1:PORT", "port": PORT}``.
``--skill FILE.jsonl`` scripts the answers to known prompts (see `skill.py`). ``--api-key KEY``
(or ``$VLLM_API_KEY``) requires ``Authorization: Bearer KEY`` on /v1 paths, as vLLM does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import uvicorn
from pydantic import ValidationError

from router_service.simulator.app import create_app
from router_service.simulator.faults import FaultSettings
from router_service.simulator.profile import SimulatorProfile
from router_service.simulator.server import bind_socket, url_for
from router_service.simulator.skill import SkillFileError

# (flag, profile field, type, help); defaults come from SimulatorProfile.
_PROFILE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--task", "task", str, "generate (completions + chat) or embed (/v1/embeddings)"),
    ("--max-num-seqs", "max_num_seqs", int, "most sequences decoded together"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one engine step"),
    ("--prefill-tokens-per-second", "prefill_tokens_per_second", float, "prompt tokens processed per second"),
    (
        "--decode-tokens-per-second",
        "decode_tokens_per_second",
        float,
        "tokens/s of one sequence decoding alone",
    ),
    (
        "--max-decode-throughput",
        "max_decode_throughput",
        float,
        "tokens/s cap summed over the decoding batch",
    ),
    ("--ttft-ms", "ttft_ms", float, "fixed front-end overhead before the engine, in ms"),
    ("--kv-cache-tokens", "kv_cache_tokens", int, "KV cache capacity in tokens"),
    ("--block-size", "block_size", int, "KV cache block size in tokens"),
    ("--max-model-len", "max_model_len", int, "longest prompt + completion accepted"),
    ("--speedup", "speedup", float, "simulated seconds per wall-clock second (tests: 10-100)"),
    ("--seed", "seed", int, "mixed into generated text"),
    ("--embedding-dimensions", "embedding_dimensions", int, "vector length for --task embed"),
    ("--metrics-format", "metrics_format", str, "text (always text 0.0.4) or negotiate (honour Accept)"),
    ("--skill", "skill", str, "JSONL file of {prompt, answer}: scripted answers to those chat prompts"),
    ("--api-key", "api_key", str, "bearer key required on /v1 (default: $VLLM_API_KEY, as vLLM)"),
]
_FAULT_FLAGS: list[tuple[str, str, type, str]] = [
    ("--error-rate", "error_rate", float, "fault: fraction of requests answered with an error"),
    ("--error-status", "error_status", int, "fault: HTTP status of injected errors"),
    ("--die-after-tokens", "die_after_tokens", int, "fault: drop connections after this many tokens"),
    ("--slowdown", "slowdown", float, "fault: multiply every simulated duration"),
]
_FAULT_SWITCHES = [
    ("--hang", "hang", "fault: requests get no answer"),
    ("--unhealthy", "unhealthy", "fault: /health 503"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollway simulate",
        description="Serve a vLLM-compatible simulator of one model (OpenAI API, vLLM /metrics).",
    )
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--served-model-name", help="alias of --model, as vLLM spells it (wins if both)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)"
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    fields = SimulatorProfile.model_fields
    choices = {"task": ["generate", "embed"], "metrics_format": ["text", "negotiate"]}
    for flag, name, kind, help_ in _PROFILE_FLAGS:
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            choices=choices.get(name),
            help=f"{help_} (default {fields[name].default})",
        )
    fault_fields = FaultSettings.model_fields
    for flag, name, kind, help_ in _FAULT_FLAGS:
        parser.add_argument(
            flag, dest=name, type=kind, default=None, help=f"{help_} (default {fault_fields[name].default})"
        )
    for flag, name, help_ in _FAULT_SWITCHES:
        parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_)
    return parser


def profile_from_args(args: argparse.Namespace) -> SimulatorProfile:
    """The profile the parsed flags describe; raises pydantic.ValidationError on bad values."""
    values = {
        name: getattr(args, name) for _, name, _, _ in _PROFILE_FLAGS if getattr(args, name) is not None
    }
    if "api_key" not in values and os.environ.get("VLLM_API_KEY"):
        values["api_key"] = os.environ["VLLM_API_KEY"]
    fault_names = [name for _, name, _, _ in _FAULT_FLAGS] + [name for _, name, _ in _FAULT_SWITCHES]
    faults = {name: getattr(args, name) for name in fault_names if getattr(args, name) is not None}
    return SimulatorProfile(
        model=args.served_model_name or args.model, faults=FaultSettings(**faults), **values
    )


def profile_to_argv(profile: SimulatorProfile) -> list[str]:
    """Flags that rebuild `profile` (non-default fields only), for running it as a subprocess."""
    argv = ["--model", profile.model]
    for flag, name, _, _ in _PROFILE_FLAGS:
        value = getattr(profile, name)
        if value is not None and value != SimulatorProfile.model_fields[name].default:
            argv += [flag, str(value)]
    for flag, name, _, _ in _FAULT_FLAGS:
        value = getattr(profile.faults, name)
        if value != FaultSettings.model_fields[name].default:
            argv += [flag, str(value)]
    for flag, name, _ in _FAULT_SWITCHES:
        if getattr(profile.faults, name):
            argv.append(flag)
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile = profile_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(f"invalid simulator profile: {problems}")
    try:
        app = create_app(profile)
    except SkillFileError as exc:
        print(f"tollway simulate: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"tollway simulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=args.log_level, lifespan="on", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets: list | None = None) -> None:
        await original_startup(sockets=sockets)
        ready = {"event": "ready", "model": profile.model, "url": url_for(args.host, port), "port": port}
        print(json.dumps(ready), flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
