"""What one simulated vLLM server looks like: its model name and capacity.

A `SimulatorProfile` is the whole description of a simulator instance. The capacity fields
mirror the knobs that bound a real vLLM engine (``--max-num-seqs``, ``--max-model-len``,
``--max-num-batched-tokens``, the KV cache size) plus the speeds that a GPU would give
(prefill and decode tokens per second). All durations the simulator reports (metrics,
latencies) are in *simulated* seconds; ``speedup`` only makes wall-clock time pass faster.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router_service.simulator.faults import FaultSettings


class SimulatorProfile(BaseModel):
    """One simulated model server. Defaults resemble an 8B model on one H100."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    model: str = Field(min_length=1, description="Served model name (what clients put in `model`).")
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate: completions + chat; embed: /v1/embeddings only."
    )
    max_num_seqs: int = Field(
        64, ge=1, le=4096, description="Most sequences decoded together (vLLM --max-num-seqs)."
    )
    max_num_batched_tokens: int = Field(
        2048,
        ge=16,
        description="Token budget of one engine step: decodes first, the rest goes to prefill chunks.",
    )
    prefill_tokens_per_second: float = Field(10000.0, gt=0, description="Prompt tokens processed per second.")
    decode_tokens_per_second: float = Field(
        60.0, gt=0, description="Tokens per second of ONE sequence decoding alone (the small-batch speed)."
    )
    max_decode_throughput: float | None = Field(
        None,
        gt=0,
        description=(
            "Cap on tokens per second summed over the decoding batch; per-sequence speed is "
            "min(decode_tokens_per_second, max_decode_throughput / batch). "
            "Default: decode_tokens_per_second * max_num_seqs / 4 (a full batch decodes 4x slower per sequence)."
        ),
    )
    ttft_ms: float = Field(
        15.0,
        ge=0,
        description="Fixed front-end overhead before a request reaches the engine (tokenisation etc.).",
    )
    kv_cache_tokens: int = Field(200_000, ge=16, description="KV cache capacity in tokens.")
    block_size: int = Field(
        16, ge=1, le=1024, description="KV cache block size in tokens (usage is per block)."
    )
    max_model_len: int = Field(
        8192, ge=16, description="Longest prompt + completion accepted (else HTTP 400)."
    )
    speedup: float = Field(1.0, gt=0, le=100_000, description="Simulated seconds per wall-clock second.")
    seed: int = Field(0, description="Mixed into every generated text, so two simulators can differ.")
    embedding_dimensions: int = Field(384, ge=8, le=8192, description="Vector length for task=embed.")
    metrics_format: Literal["text", "negotiate"] = Field(
        "text",
        description=(
            "text: always answer /metrics in the classic text format 0.0.4, which keeps the `vllm:` names "
            "even when Prometheus asks for OpenMetrics; negotiate: honour Accept like vLLM does "
            "(OpenMetrics then writes `vllm_` in sample names)."
        ),
    )
    skill: str | None = Field(
        None,
        description=(
            "A JSONL file of {prompt, answer} lines: a chat request whose last user message equals a "
            "prompt is answered with that answer (see skill.py); other prompts get generated text."
        ),
    )
    faults: FaultSettings = Field(default_factory=FaultSettings, description="Faults active from the start.")
    api_key: str | None = Field(
        None,
        min_length=1,
        description=(
            "Bearer key required on /v1 paths, as vLLM's --api-key (401 without it); /health and /metrics "
            "stay open. The CLI reads $VLLM_API_KEY when --api-key is not given, as vLLM does."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> SimulatorProfile:
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must be >= max_model_len ({self.max_model_len}): "
                "one sequence of the longest accepted length has to fit in the KV cache"
            )
        return self

    @property
    def decode_throughput_cap(self) -> float:
        """Tokens per second the whole decoding batch can produce at most."""
        if self.max_decode_throughput is not None:
            return self.max_decode_throughput
        return self.decode_tokens_per_second * max(1.0, self.max_num_seqs / 4)
