"""Defaults that follow a model's size: its cache, its CPU and memory, its startup budget and
how fast its simulator is.

A model's size is its weights in GB: `sizeBillions` x 2 bytes (bf16) when the user gives the hint,
else 40 GB per GPU (a model is usually spread over as few GPUs as hold its weights and a useful
KV cache: weights take about half of an 80 GB GPU). Pure functions; every default here can be
overridden in the ModelPool (`cache.size`, `resources`, `startupTimeoutSeconds`, `simulator`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from tollway_operator.api import ModelSpec

BYTES_PER_PARAMETER = 2
"""bf16/fp16 weights, what Hugging Face checkpoints of chat models ship."""
ESTIMATED_WEIGHTS_GB_PER_GPU = 40.0
GIB = 2**30

CACHE_HEADROOM = 1.25
"""The cache holds the weights plus the tokenizer, configs and vLLM's compile cache."""
MIN_CACHE_GIB = 20

SHM_GIB_PER_GPU = 4
"""/dev/shm for NCCL and the workers' shared buffers; memory-backed, so counted as memory."""
CPU_BASE = 4
CPU_PER_GPU = 2
"""vLLM runs an API server, an engine core and one worker per GPU, each busy on a core of its own
(2 + N physical cores, i.e. 4 + 2N hyperthreads), plus tokenisation."""
MEMORY_BASE_GIB = 8
MEMORY_PER_GPU_GIB = 8
"""Host memory besides /dev/shm: Python, torch and a CUDA context per worker, pinned buffers. The
weights are read shard by shard from memory-mapped safetensors into GPU memory, so their size
does not add to it."""

STARTUP_BASE_SECONDS = 600
"""Loading the weights onto the GPUs, compiling, capturing CUDA graphs."""
DOWNLOAD_MB_PER_SECOND = 50.0
"""A pessimistic first download from Hugging Face (often 100-500 MB/s, sometimes far less)."""
MAX_STARTUP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class ModelSize:
    weights_gb: float
    gpus: int
    estimated: bool
    """True when the weights were estimated from the GPU count (no `sizeBillions`)."""

    @classmethod
    def of(cls, model: ModelSpec) -> ModelSize:
        if model.size_billions is not None:
            return cls(model.size_billions * BYTES_PER_PARAMETER, model.gpus, False)
        return cls(ESTIMATED_WEIGHTS_GB_PER_GPU * model.gpus, model.gpus, True)

    @property
    def parameters_billions(self) -> float:
        return self.weights_gb / BYTES_PER_PARAMETER


def gib(quantity: float) -> str:
    return f"{math.ceil(quantity)}Gi"


def default_cache_size(size: ModelSize) -> str:
    """The weights plus 25%, in whole 10 GiB, at least 20Gi: a 7B model 20Gi, a 72B model 170Gi."""
    needed = size.weights_gb * 1e9 * CACHE_HEADROOM / GIB
    return gib(max(MIN_CACHE_GIB, math.ceil(needed / 10) * 10))


def cache_size(model: ModelSpec) -> str:
    return model.cache.size or default_cache_size(ModelSize.of(model))


def startup_budget_seconds(model: ModelSpec) -> int:
    """How long a replica may take to become healthy: `startupTimeoutSeconds`, else 10 minutes
    plus the first download of the weights at 50 MB/s, in whole minutes (a 7B model 15 min, a
    72B model 58 min), at most 6 hours."""
    if model.startup_timeout_seconds is not None:
        return model.startup_timeout_seconds
    size = ModelSize.of(model)
    seconds = STARTUP_BASE_SECONDS + size.weights_gb * 1000 / DOWNLOAD_MB_PER_SECOND
    return min(MAX_STARTUP_SECONDS, math.ceil(seconds / 60) * 60)


def shm_gib(gpus: int) -> int:
    return SHM_GIB_PER_GPU * gpus


def default_resources(gpus: int) -> dict[str, Any]:
    """Requests that keep a vLLM pod out of BestEffort: CPU without a limit (a limit only
    throttles the tokeniser), memory requested and limited alike (the pod never uses memory its
    node did not reserve for it)."""
    memory = gib(MEMORY_BASE_GIB + MEMORY_PER_GPU_GIB * gpus)
    return {
        "requests": {"cpu": str(CPU_BASE + CPU_PER_GPU * gpus), "memory": memory},
        "limits": {"memory": memory},
    }


def add_gib(quantity: Any, extra_gib: int) -> str:
    """`quantity` + `extra_gib` GiB, written in the largest binary unit that is exact."""
    total = parse_quantity(str(quantity)) + Decimal(extra_gib * GIB)
    for unit, factor in (("Gi", GIB), ("Mi", 2**20), ("Ki", 2**10)):
        if total % factor == 0:
            return f"{int(total // factor)}{unit}"
    return str(int(total.to_integral_value(rounding="ROUND_CEILING")))


def vllm_resources(model: ModelSpec) -> dict[str, Any]:
    """The vLLM container's resources: the model's `resources` (else the defaults by GPU count),
    `nvidia.com/gpu` limited to `gpus`, and /dev/shm added to the memory request and limit (a
    memory-backed emptyDir is charged to the pod's memory)."""
    resources = json.loads(json.dumps(model.resources or default_resources(model.gpus)))
    shm = shm_gib(model.gpus)
    for part in ("requests", "limits"):
        section = resources.get(part)
        if section and "memory" in section:
            section["memory"] = add_gib(section["memory"], shm)
    limits = resources.setdefault("limits", {})
    limits["nvidia.com/gpu"] = str(model.gpus)
    requests = resources.get("requests")
    if requests and "nvidia.com/gpu" in requests:
        requests["nvidia.com/gpu"] = str(model.gpus)
    return resources


# ---------------------------------------------------------------------------------------------
# The simulator's profile (`simulate`)
# ---------------------------------------------------------------------------------------------

SIMULATOR_TIERS = (
    # (up to billions of parameters, max_num_seqs, decode tokens/s per sequence, prefill tokens/s)
    (10.0, 64, 100.0, 20000.0),
    (40.0, 32, 60.0, 10000.0),
    (100.0, 16, 30.0, 5000.0),
    (math.inf, 8, 15.0, 2500.0),
)
"""Roughly what vLLM on H100s gives per replica: bigger models serve fewer sequences, slower."""
SIMULATOR_MAX_MODEL_LEN = 8192
SIMULATOR_KV_CACHE_TOKENS = 200_000


def vllm_flag(args: list[str], flag: str) -> int | None:
    """The integer value of a vLLM flag in `extraArgs` (`--flag N` or `--flag=N`), if given."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith(flag + "=") else None
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class SimulatedProfile:
    """The `tollway simulate` flags that describe one model (router_service.simulator.profile)."""

    max_num_seqs: int
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    max_model_len: int
    kv_cache_tokens: int
    ttft_ms: float | None = None

    def args(self) -> list[str]:
        out = [
            "--max-num-seqs", str(self.max_num_seqs),
            "--decode-tokens-per-second", f"{self.decode_tokens_per_second:g}",
            "--prefill-tokens-per-second", f"{self.prefill_tokens_per_second:g}",
            "--max-model-len", str(self.max_model_len),
            "--kv-cache-tokens", str(self.kv_cache_tokens),
        ]  # fmt: skip
        if self.ttft_ms is not None:
            out += ["--ttft-ms", f"{self.ttft_ms:g}"]
        return out


def simulated_profile(model: ModelSpec) -> SimulatedProfile:
    """A model's simulated speed and capacity: `simulator` fields where given, else by size
    (`SIMULATOR_TIERS`); `--max-num-seqs` in `extraArgs` and `maxModelLen` are honoured, as vLLM
    would (the router reads them too)."""
    params = ModelSize.of(model).parameters_billions
    _, seqs, decode, prefill = next(t for t in SIMULATOR_TIERS if params <= t[0])
    given = model.simulator
    seqs = vllm_flag(model.extra_args, "--max-num-seqs") or seqs
    max_model_len = model.max_model_len or SIMULATOR_MAX_MODEL_LEN
    kv = max(SIMULATOR_KV_CACHE_TOKENS, max_model_len)
    if given is not None:
        seqs = given.max_num_seqs or seqs
        decode = given.decode_tokens_per_second or decode
        prefill = given.prefill_tokens_per_second or prefill
        kv = given.kv_cache_tokens or kv
    return SimulatedProfile(
        max_num_seqs=seqs,
        decode_tokens_per_second=decode,
        prefill_tokens_per_second=prefill,
        max_model_len=max_model_len,
        kv_cache_tokens=max(kv, max_model_len),
        ttft_ms=given.ttft_ms if given is not None else None,
    )
