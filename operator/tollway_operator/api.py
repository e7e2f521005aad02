"""The tollway API: ModelPool and RoutingPolicy, group tollway.io, version v1alpha1.

These pydantic models are the single source of truth. The CRDs in `crds/` are generated from
them (`tollway crds`), and the operator validates every object with them before acting, so a
rule lives here once: as a pydantic validator, and where the API server can check it too, as a
CEL rule (`x-kubernetes-validations`) or a schema marker (a list-type map) on the same model.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from router_service.config import (
    AnnSettings,
    CamelModel,
    DegradationSettings,
    EmbeddingSettings,
    EstimatorSettings,
    HistorySettings,
    LearningSettings,
    ModelName,
    ObjectiveSettings,
    Price,
    StateSettings,
)

GROUP = "tollway.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
# The tollway package's version, pyproject.toml's `version` and nothing else: it tags the tollway
# image (router, simulator, calibration Jobs) the operator runs unless told otherwise, so an operator
# runs routers of its own version. The chart's version and appVersion must equal it (a test says so).
PACKAGE_VERSION = version("tollway")
IMAGE_REPOSITORY = "ghcr.io/tollway/tollway"
# The image of routers, simulators and calibration Jobs whose spec names none: the operator's own
# image where the chart says which (TOLLWAY_IMAGE: a private mirror serves them all), else this
# package's version of the public one.
DEFAULT_TOLLWAY_IMAGE = os.environ.get("TOLLWAY_IMAGE") or f"{IMAGE_REPOSITORY}:{PACKAGE_VERSION}"
MAX_MODELS = 32


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def list_map(*keys: str) -> dict[str, Any]:
    """Schema markers of a list the API server treats as a map keyed by `keys` (each a required
    field of the items): it refuses two items with the same key ("Duplicate value"), and
    server-side apply merges the list item by item instead of replacing it whole."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


# An RFC 3339 timestamp (the API server checks the format), as status.now_rfc3339() writes it.
DATE_TIME: dict[str, Any] = {"format": "date-time"}


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


class SecretKeyRef(CamelModel):
    name: str = Field(min_length=1, max_length=253, description="Secret name, in the object's namespace.")
    key: str = Field("token", min_length=1, description="Key inside the Secret.")


class Condition(CamelModel):
    """A Kubernetes-style status condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    observed_generation: int | None = None


# ---------------------------------------------------------------------------------------------
# ModelPool
# ---------------------------------------------------------------------------------------------


class ReplicaRange(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [cel("self.min <= self.max", "min must be <= max")]}
    }

    min: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 lets the model scale to zero.")
    max: int = Field(1, ge=1, le=1000, description="Most replicas the autoscaler may run.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class CacheSpec(CamelModel):
    """Where model weights are cached."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.kind == 'pvc' || (!has(self.storageClassName) && !has(self.existingClaim))",
                    "storageClassName and existingClaim only apply to kind pvc",
                )
            ]
        }
    }

    kind: Literal["emptyDir", "pvc"] = Field(
        "emptyDir",
        description="emptyDir (per pod, lost with it) or PersistentVolumeClaims (kept across restarts).",
    )
    size: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description=(
            "Size limit (emptyDir) or requested size (pvc), as a Kubernetes quantity; default: the weights' "
            "size (sizeBillions x 2 bytes, or 40 GB per GPU) plus 25%, at least 20Gi. A claim can grow (if its "
            "StorageClass allows expansion) but never shrink: status condition CacheSizeApplied says which."
        ),
    )
    storage_class_name: str | None = Field(None, description="StorageClass for new claims.")
    existing_claim: str | None = Field(
        None, description="Use this existing claim (shared by every replica: it must allow that) instead."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description=(
            "ReadWriteOnce: one claim per replica (a StatefulSet's volumeClaimTemplates), so no two replicas "
            "ever share a volume and none hits Multi-Attach; each replica downloads the weights once. "
            "ReadWriteMany: one claim shared by every replica (needs a StorageClass that offers it, e.g. "
            "NFS, EFS, Filestore, Azure Files); the weights are downloaded once for all."
        ),
    )
    retention: Literal["Retain", "Delete"] = Field(
        "Retain",
        description=(
            "What happens to the claims when their model leaves the pool or the pool is deleted. Retain "
            "(default): they stay, so a pool re-created under the same name finds its weights again (delete "
            "them by hand: label tollway.io/pool); Delete: they are deleted with it. On scale-down the claims "
            "of the removed replicas always stay, and a scale-up reuses them without downloading again."
        ),
    )

    @model_validator(mode="after")
    def _pvc_fields(self) -> CacheSpec:
        if self.kind != "pvc" and (self.storage_class_name or self.existing_claim):
            raise ValueError("storageClassName and existingClaim only apply to kind pvc")
        return self

    @property
    def per_replica(self) -> bool:
        """One claim per replica (created through a StatefulSet), rather than one shared claim."""
        return self.kind == "pvc" and not self.existing_claim and self.access_mode == "ReadWriteOnce"


class EnvVar(CamelModel):
    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, description="As in a Pod's env[].valueFrom.")


class ExternalEndpoint(CamelModel):
    """A model served outside the cluster (or by another system): route to it, deploy nothing."""

    url: str = Field(
        pattern=r"^https?://", description="Base URL of an OpenAI-compatible server, without /v1."
    )
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret holding the bearer key.")
    upstream_model: str | None = Field(None, description="The model name to send upstream, if not `name`.")


class SchedulingSpec(CamelModel):
    """Where model pods may run (as in a Pod). Set on the pool, every deployed model inherits each
    field; a model's own field, when set, replaces the pool's (no merging). Simulated models
    (`simulate`) ignore all of it: they run on any node."""

    node_selector: dict[str, str] | None = Field(None, description="As in a Pod's nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(
        None,
        description=(
            "As in a Pod. GPU nodes usually carry the taint nvidia.com/gpu:NoSchedule (GKE, AKS, NVIDIA's GPU "
            "operator): tolerate it here once for the whole pool."
        ),
    )
    affinity: dict[str, Any] | None = Field(None, description="As in a Pod's affinity.")
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the model pods (e.g. above batch work)."
    )


class SimulatorSpec(CamelModel):
    """The simulated server's speed and capacity (`simulate`); unset fields follow the model's size."""

    max_num_seqs: int | None = Field(None, ge=1, le=4096, description="Sequences decoded together.")
    prefill_tokens_per_second: float | None = Field(None, gt=0, description="Prompt tokens per second.")
    decode_tokens_per_second: float | None = Field(
        None, gt=0, description="Tokens per second of one sequence decoding alone."
    )
    ttft_ms: float | None = Field(None, ge=0, description="Fixed overhead before the engine, in ms.")
    kv_cache_tokens: int | None = Field(None, ge=16, description="KV cache capacity in tokens.")


class SimulateSpec(CamelModel):
    """Try tollway without GPUs: `tollway simulate` (the tollway image, vLLM's API and metric names,
    a capacity model) stands in for vLLM, with each model's speed and capacity, no GPU, no cache."""

    enabled: bool | None = Field(
        None,
        description=(
            "true: every deployed model runs as a simulator; false: vLLM; unset: the operator's default "
            "(chart value simulate.default, off unless set)."
        ),
    )
    image: str | None = Field(None, description="The tollway image; default: the operator's default.")


class PeerSelector(CamelModel):
    namespace_selector: dict[str, Any] | None = Field(
        None, description="As in a NetworkPolicy peer (a LabelSelector); unset: the pool's namespace."
    )
    pod_selector: dict[str, Any] | None = Field(
        None,
        description="As in a NetworkPolicy peer (a LabelSelector); unset: every pod of those namespaces.",
    )


class NetworkPolicySpec(CamelModel):
    """A NetworkPolicy that lets only the pool's routers (and calibration Jobs, and Prometheus)
    reach its model pods, so nothing in the cluster bypasses the router's auth and budgets. Needs a
    network plugin that enforces NetworkPolicies (Calico, Cilium, ...)."""

    enabled: bool = Field(True, description="false: no NetworkPolicy.")
    prometheus: PeerSelector | None = Field(
        None,
        description=(
            "Where Prometheus runs, to scrape the models' /metrics (the autoscaler's signal), e.g. "
            "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}; unset: nothing else."
        ),
    )


class ModelSpec(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("has(self.model) || has(self.endpoint)", "set model (to deploy) or endpoint (external)")
            ]
        }
    }

    name: ModelName
    model: str | None = Field(None, min_length=1, description="Hugging Face id or path that vLLM loads.")
    image: str | None = Field(None, description="Container image; default: the pool's image.")
    gpus: int = Field(1, ge=1, le=16, description="GPUs per replica (tensor parallel size).")
    replicas: ReplicaRange = Field(default_factory=ReplicaRange)
    max_model_len: int | None = Field(None, ge=16, description="vLLM --max-model-len.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM --gpu-memory-utilization."
    )
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM command-line arguments.")
    env: list[EnvVar] = Field(default_factory=list)
    size_billions: float | None = Field(
        None,
        gt=0,
        le=100000,
        description=(
            "Parameters in billions (a size hint): sizes the default cache, startup budget and the simulator's "
            "speed. Default: estimated from gpus (weights of about 40 GB per GPU, i.e. 20B parameters)."
        ),
    )
    resources: dict[str, Any] | None = Field(
        None,
        description=(
            "Container resources (requests/limits); nvidia.com/gpu is set from gpus. Default: CPU 4 + 2 per GPU "
            "requested (no limit), memory 8Gi + 8Gi per GPU requested and limited; /dev/shm (4Gi per GPU) is "
            "added to the memory request and limit, given or not."
        ),
    )
    node_selector: dict[str, str] | None = Field(
        None, description="Replaces the pool's scheduling.nodeSelector."
    )
    tolerations: list[dict[str, Any]] | None = Field(
        None, description="Replaces the pool's scheduling.tolerations."
    )
    affinity: dict[str, Any] | None = Field(None, description="Replaces the pool's scheduling.affinity.")
    priority_class_name: str | None = Field(
        None, max_length=253, description="Replaces the pool's scheduling.priorityClassName."
    )
    startup_timeout_seconds: int | None = Field(
        None,
        ge=60,
        le=86400,
        description=(
            "How long vLLM may take to download and load the weights before the kubelet restarts it. Default "
            "by size: 10 minutes plus the weights at 50 MB/s (a 72B model: about 58 minutes)."
        ),
    )
    cache: CacheSpec = Field(default_factory=CacheSpec)
    hf_token_secret: SecretKeyRef | None = Field(
        None, description="Secret with a Hugging Face token (HF_TOKEN), for gated models."
    )
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Replaces the pool's apiKeySecret for this model."
    )
    run_as_user: int | None = Field(None, ge=1, description="Replaces the pool's runAsUser for this model.")
    simulator: SimulatorSpec | None = Field(
        None, description="Speed and capacity when simulated (`simulate`); default: by the model's size."
    )
    cost: Price = Field(default_factory=Price, description="Price used for routing and budget splits.")
    endpoint: ExternalEndpoint | None = None
    profile: str | None = Field(
        None, description="History column that describes this model's quality and cost; default: name."
    )

    @model_validator(mode="after")
    def _deployable(self) -> ModelSpec:
        if not self.model and not self.endpoint:
            raise ValueError("set model (a Hugging Face id or path to deploy) or endpoint (an external URL)")
        return self

    @property
    def history_profile(self) -> str:
        return self.profile or self.name


DEFAULT_TARGETS = {"num_requests_waiting": 2.0, "kv_cache_usage": 0.8, "router_demand": 8.0, "promql": 1.0}


class AutoscalingSpec(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.metric != 'promql' || has(self.query)", "metric promql needs query"),
                cel(
                    "self.metric != 'kv_cache_usage' || !has(self.target) || double(self.target) <= 1.0",
                    "target must be <= 1 for metric kv_cache_usage (1 = 100% of one replica's KV cache)",
                ),
            ]
        }
    }

    enabled: bool = True
    mode: Literal["operator", "keda"] = Field(
        "operator",
        description="operator: the operator patches replicas; keda: emit a KEDA ScaledObject instead.",
    )
    prometheus_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Prometheus HTTP API base URL; default: the operator's TOLLWAY_PROMETHEUS_URL (chart value prometheusUrl).",
    )
    metric: Literal["num_requests_waiting", "kv_cache_usage", "router_demand", "promql"] = Field(
        "num_requests_waiting", description="Load signal whose per-replica value is held at target."
    )
    query: str | None = Field(
        None, description="Custom PromQL (metric promql); `$model` and `$namespace` are substituted."
    )
    target: float | None = Field(
        None,
        gt=0,
        description=(
            "Target value of the metric per replica; default by metric: num_requests_waiting 2, "
            "kv_cache_usage 0.8, router_demand 8 (in-flight requests), promql 1."
        ),
    )
    tolerance: float = Field(0.1, ge=0, lt=1, description="No change while |value/target - 1| <= tolerance.")
    interval_seconds: int = Field(15, ge=1, le=3600, description="How often to evaluate.")
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=86400)
    scale_to_zero: bool = Field(
        False, description="Allow 0 replicas when replicas.min is 0 and the model is idle."
    )
    idle_seconds_before_zero: int = Field(600, ge=0, description="Idle time before scaling to zero.")

    @model_validator(mode="after")
    def _query(self) -> AutoscalingSpec:
        if self.metric == "promql" and not self.query:
            raise ValueError("metric 'promql' needs query (a PromQL expression)")
        return self

    @property
    def effective_target(self) -> float:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.metric]

    @model_validator(mode="after")
    def _kv_target(self) -> AutoscalingSpec:
        if self.metric == "kv_cache_usage" and self.effective_target > 1:
            raise ValueError(
                f"target ({self.effective_target:g}) must be <= 1 for metric kv_cache_usage: one replica's KV cache "
                "use is at most 1 (100%); use e.g. 0.8"
            )
        return self


class ConfigMapKeyRef(CamelModel):
    name: str = Field(min_length=1, max_length=253, description="ConfigMap name, in the pool's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key holding the JSONL calibration set.")


class CalibrationSetSource(CamelModel):
    """Where the calibration lines come from: exactly one of builtin, configMap, url."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "(has(self.builtin) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1",
                    "set exactly one of builtin, configMap or url",
                )
            ]
        }
    }

    builtin: Literal["builtin", "builtin:code"] | None = Field(
        None,
        description=(
            "A set shipped with tollway: builtin (1,892 RouterBench multiple-choice lines, graded by `choice`; "
            "its prompts are the built-in history's) or builtin:code (MBPP, graded by `judge`: needs judge)."
        ),
    )
    config_map: ConfigMapKeyRef | None = Field(
        None,
        description="A JSONL set in a ConfigMap key (its content is part of the revision: editing it recalibrates).",
    )
    url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="A JSONL (or .jsonl.gz) set downloaded by the Job (identified by the URL text: version the URL).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSetSource:
        count = sum(x is not None for x in (self.builtin, self.config_map, self.url))
        if count != 1:
            raise ValueError(f"set exactly one of builtin, configMap or url (got {count})")
        return self

    def identity(self) -> str:
        if self.builtin is not None:
            return self.builtin
        if self.config_map is not None:
            return f"configMap:{self.config_map.name}/{self.config_map.key}"
        return f"url:{self.url}"


class CalibrationJudge(CamelModel):
    """The LLM that grades lines whose grader is `judge`: a model of this pool, or an external endpoint."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("has(self.model) != has(self.url)", "set model (a pool model) or url, not both"),
                cel("!has(self.url) || has(self.upstreamModel)", "url needs upstreamModel"),
            ]
        }
    }

    model: str | None = Field(None, min_length=1, description="A model of this pool (by name).")
    url: str | None = Field(
        None, pattern=r"^https?://", description="An external OpenAI-compatible base URL, without /v1."
    )
    upstream_model: str | None = Field(None, description="The model name to ask for at url.")
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret holding url's bearer key.")

    @model_validator(mode="after")
    def _one_judge(self) -> CalibrationJudge:
        if (self.model is None) == (self.url is None):
            raise ValueError("set model (a model of this pool) or url (an external endpoint), not both")
        if self.url is not None and not self.upstream_model:
            raise ValueError("url needs upstreamModel (the model name to ask for there)")
        return self


class CalibrationSpec(CamelModel):
    """Scoring the pool's own models on a labelled set (a Kubernetes Job per model and revision) so
    that the router routes each model by its measured quality and true token counts instead of the
    borrowed `profile` columns (which remain the prior until the model is calibrated)."""

    enabled: bool = Field(
        True,
        description=(
            "On by default: a model is calibrated once it has a ready replica, again when its `model` (or "
            "the set, judge, maxTokens, revision) changes. false: no Jobs (results pushed before stay in use)."
        ),
    )
    dataset: CalibrationSetSource = Field(
        default_factory=lambda: CalibrationSetSource(builtin="builtin"),
        description="The calibration set (JSONL lines {prompt, reference, grader, task}); default: builtin.",
    )
    judge: CalibrationJudge | None = Field(
        None,
        description="Grades the set's `judge` lines (each line names its grader); required by such sets.",
    )
    concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description=(
            "Calibration requests in flight per model. Production traffic wins: calibration never holds more "
            "than this many of a vLLM server's batch slots, and waits in its queue like any request."
        ),
    )
    max_tokens: int = Field(512, ge=1, le=32768, description="Answer length cap for calibration requests.")
    include_external: bool = Field(
        False,
        description="Also calibrate `endpoint` models (off by default: an external endpoint bills per token).",
    )
    priority_class_name: str | None = Field(
        None,
        max_length=253,
        description="PriorityClass of the calibration pods (a low one lets the scheduler evict them first).",
    )
    image: str | None = Field(
        None, description="The tollway image the Job runs; default: the operator's default."
    )
    resources: dict[str, Any] | None = Field(
        None, description="Container resources of the calibration pod (default: 100m CPU, 256Mi-1Gi memory)."
    )
    revision: str = Field(
        "",
        max_length=63,
        description="Free text folded into every model's calibration revision: change it to calibrate again.",
    )


class ModelPoolSpec(CamelModel):
    """ModelPool: a set of models served by vLLM (or external endpoints) that tollway routes across."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.calibration) || !has(self.calibration.judge) || !has(self.calibration.judge.model)"
                    " || self.models.exists(m, m.name == self.calibration.judge.model)",
                    "calibration.judge.model must name a model of this pool",
                ),
            ]
        }
    }

    image: str = Field(DEFAULT_VLLM_IMAGE, description="Default vLLM OpenAI server image for the pool.")
    models: list[ModelSpec] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description="The models, by name (unique: the API server refuses a repeated name).",
        json_schema_extra=list_map("name"),
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec,
        description="GPU scheduling defaults (nodeSelector, tolerations, affinity, priorityClassName) for every model.",
    )
    api_key_secret: SecretKeyRef | None = Field(
        None,
        description=(
            "A Secret key holding an API key that every deployed model requires (vLLM --api-key, through "
            "$VLLM_API_KEY); the routers and calibration Jobs send it as a bearer token. /health and "
            "/metrics stay open."
        ),
    )
    run_as_user: int | None = Field(
        None,
        ge=1,
        description=(
            "Run the vLLM containers as this non-root UID (group 0, HOME on an emptyDir), e.g. 2000, the `vllm` "
            "user of vLLM's newer images. Unset: the image's user (vllm/vllm-openai runs as root)."
        ),
    )
    network_policy: NetworkPolicySpec | None = Field(
        None, description="Only the pool's routers (and Prometheus) may reach its model pods."
    )
    simulate: SimulateSpec = Field(
        default_factory=SimulateSpec, description="Run simulators instead of vLLM: try tollway without GPUs."
    )
    autoscaling: AutoscalingSpec | None = None
    calibration: CalibrationSpec = Field(
        default_factory=CalibrationSpec,
        description="Calibrating the pool's models (on by default for the models tollway deploys).",
    )

    @model_validator(mode="after")
    def _judge_in_pool(self) -> ModelPoolSpec:
        judge = self.calibration.judge
        if judge is not None and judge.model is not None and self.model(judge.model) is None:
            names = [m.name for m in self.models]
            raise ValueError(
                f"calibration.judge.model {judge.model!r} is not a model of this pool; it has {names}"
            )
        return self

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        # The API server refuses a repeated name itself (`models` is a list-map keyed by name); this
        # names the culprit where no API server checked (the emulator, a CRD installed without it).
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        return models

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def scheduling_for(self, model: ModelSpec) -> SchedulingSpec:
        """A model's scheduling: each of its own fields that is set, else the pool's."""
        pool = self.scheduling
        return SchedulingSpec(
            node_selector=model.node_selector if model.node_selector is not None else pool.node_selector,
            tolerations=model.tolerations if model.tolerations is not None else pool.tolerations,
            affinity=model.affinity if model.affinity is not None else pool.affinity,
            priority_class_name=model.priority_class_name or pool.priority_class_name,
        )

    def api_key_secret_for(self, model: ModelSpec) -> SecretKeyRef | None:
        """The Secret holding the API key a deployed model requires (none for external endpoints,
        which have their own `endpoint.apiKeySecret`)."""
        if model.endpoint is not None or not model.model:
            return None
        return model.api_key_secret or self.api_key_secret

    def backend_key_secret_for(self, model: ModelSpec) -> SecretKeyRef | None:
        """The bearer key a client of the model sends: an external endpoint's own, or the key the
        pool's vLLM server requires."""
        return model.endpoint.api_key_secret if model.endpoint is not None else self.api_key_secret_for(model)

    def run_as_user_for(self, model: ModelSpec) -> int | None:
        return model.run_as_user if model.run_as_user is not None else self.run_as_user

    def simulated(self, default: bool = False) -> bool:
        """Whether the deployed models run as simulators: `simulate.enabled`, else the operator's
        default."""
        return self.simulate.enabled if self.simulate.enabled is not None else default


class ScaleDecisionStatus(CamelModel):
    time: str = Field(json_schema_extra=DATE_TIME)
    from_replicas: int
    to_replicas: int
    value: float | None = None
    reason: str
    message: str | None = Field(None, description="The decision's inputs and why, in words.")
    last_scale_time: str | None = Field(
        None, description="When this model's replicas last changed.", json_schema_extra=DATE_TIME
    )


class ModelStatus(CamelModel):
    name: str
    desired_replicas: int = 0
    ready_replicas: int = 0
    endpoint: str | None = None
    reason: str | None = Field(
        None, description="Why a pod of the model cannot start or run, e.g. ImagePullBackOff (from its pods)."
    )
    message: str | None = Field(
        None, description="The pod-level cause in words (the scheduler's, the kubelet's)."
    )


class CalibrationTaskStatus(CamelModel):
    queries: int = Field(description="Lines of this task graded.")
    mean_score: float | None = None


class ModelCalibrationStatus(CamelModel):
    name: str
    state: Literal["Pending", "Running", "Done", "Failed"]
    revision: str = Field(description="Hash of what is calibrated: the model, the set, the judge, maxTokens.")
    job: str | None = Field(None, description="The calibration Job of this revision.")
    reason: str = ""
    message: str = ""
    queries: int | None = Field(None, description="Lines graded.")
    lines: int | None = Field(None, description="Lines in the set.")
    failed: int | None = Field(None, description="Lines that failed in the last attempt.")
    mean_score: float | None = None
    tokens: int | None = Field(None, description="Prompt + completion tokens the calibration cost.")
    tasks: dict[str, CalibrationTaskStatus] = Field(default_factory=dict, description="Per task.")
    routers: list[str] = Field(
        default_factory=list, description="RoutingPolicies whose router took the results."
    )
    missing_routers: list[str] = Field(
        default_factory=list,
        description=(
            "RoutingPolicies over the pool whose router did not take this revision's results (created after "
            "the calibration, or the push failed): they route this model by its profile until the next "
            "revision (set spec.calibration.revision to calibrate again)."
        ),
    )
    last_transition_time: str | None = Field(None, json_schema_extra=DATE_TIME)


class CalibrationStatus(CamelModel):
    summary: str = Field("", description="e.g. '2/3 calibrated'.")
    models: list[ModelCalibrationStatus] = Field(default_factory=list, json_schema_extra=list_map("name"))


class AutoscalingStatus(CamelModel):
    """Written by the autoscaler only; the pool's Degraded condition is derived from `healthy`."""

    healthy: bool = True
    reason: str = ""
    message: str = ""
    last_evaluation_time: str | None = Field(None, json_schema_extra=DATE_TIME)
    models: dict[str, ScaleDecisionStatus] = Field(
        default_factory=dict, description="Last decision per model."
    )


class ModelPoolStatus(CamelModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=list_map("type"))
    models: list[ModelStatus] = Field(default_factory=list, json_schema_extra=list_map("name"))
    autoscaling: AutoscalingStatus | None = None
    summary: str | None = Field(None, description="Ready models, e.g. '2/3 ready'.")
    calibration: CalibrationStatus | None = None


# ---------------------------------------------------------------------------------------------
# RoutingPolicy
# ---------------------------------------------------------------------------------------------


class PoolRef(CamelModel):
    name: str = Field(min_length=1, max_length=253, description="ModelPool in the same namespace.")


SplitStrategy = Literal["weighted", "uniform", "cost", "perf"]


class BudgetsSpec(CamelModel):
    """Token budgets per window: per model, or a total split across the pool's models."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!(has(self.perModel) && has(self.totalTokens))", "set perModel or totalTokens, not both")
            ]
        }
    }

    window_seconds: int = Field(3600, ge=1, le=31 * 86400, description="Budgets refill every window.")
    per_model: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Tokens per window for each named model."
    )
    total_tokens: int | None = Field(
        None, ge=1, description="Tokens per window split across models by `split`."
    )
    split: SplitStrategy = Field(
        "weighted",
        description="How totalTokens is split: weighted sqrt(perf/cost), uniform, cost sqrt(1/cost), perf.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> BudgetsSpec:
        if self.per_model is not None and self.total_tokens is not None:
            raise ValueError("set perModel or totalTokens, not both")
        return self


class SharedStateSpec(StateSettings):
    """Where the policy's router replicas share budgets, dual prices and learned history (Redis)."""

    model_config = StateSettings.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!(has(self.url) && has(self.urlSecret))", "set url or urlSecret, not both")
            ]
        }
    }

    url_secret: SecretKeyRef | None = Field(
        None,
        description=(
            "A Secret in the policy's namespace whose key holds the Redis URL (use it when the URL carries "
            "a password: it then reaches the router as $TOLLWAY_STATE_URL, never through its ConfigMap)."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> SharedStateSpec:
        if self.url is not None and self.url_secret is not None:
            raise ValueError("set url or urlSecret, not both")
        return self


class RouterDeploymentSpec(CamelModel):
    replicas: int = Field(
        2,
        ge=0,
        le=100,
        description=(
            "Router replicas; the RoutingPolicy's scale subresource (kubectl scale, an HPA targeting the "
            "RoutingPolicy) sets it. Scaling changes no pod template: running routers are not restarted."
        ),
    )
    replicas_owner: Literal["policy", "external"] = Field(
        "policy",
        description=(
            "Who sets the router Deployment's replicas. policy: the operator copies `replicas` (what the "
            "scale subresource of this RoutingPolicy sets). external: something else scales the Deployment "
            "<name>-router itself (an HPA or KEDA targeting it); the operator sets its replicas only when it "
            "creates it and leaves them alone afterwards."
        ),
    )
    image: str | None = Field(
        None,
        description=(
            "The tollway image; default: the operator's own image (upgrading the operator upgrades the "
            "routers)."
        ),
    )
    resources: dict[str, Any] | None = None
    auth_secret: SecretKeyRef | None = Field(
        None, description="Secret whose key holds accepted bearer tokens, one per line; unset: no auth."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class RoutingPolicySpec(CamelModel):
    """RoutingPolicy: an OpenAI-compatible endpoint that routes each request across a ModelPool's models."""

    pool_ref: PoolRef
    served_model_name: str = Field(
        "auto", min_length=1, max_length=253, description="The `model` clients send to be routed."
    )
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    budgets: BudgetsSpec | None = Field(None, description="Unset: no budgets (quality/cost trade-off only).")
    history: HistorySettings = Field(default_factory=lambda: HistorySettings(builtin=True))
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    ann: AnnSettings = Field(default_factory=AnnSettings)
    estimator: EstimatorSettings = Field(default_factory=EstimatorSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    degradation: DegradationSettings = Field(default_factory=DegradationSettings)
    state: SharedStateSpec | None = Field(
        None,
        description=(
            "Shared state of the router replicas. Unset (or neither url nor urlSecret): the operator's "
            "default Redis (chart values redis.*) if it has one, else in-process state, where each replica "
            "enforces 1/replicas of every budget and a rollout starts the window's spend from zero."
        ),
    )
    router: RouterDeploymentSpec = Field(default_factory=RouterDeploymentSpec)


class RoutingPolicyStatus(CamelModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=list_map("type"))
    endpoint: str | None = Field(None, description="Cluster-internal OpenAI base URL.")
    router_replicas: int = 0
    router_selector: str | None = Field(
        None, description="Label selector of the router pods (the scale subresource's, for an HPA)."
    )
    budgets: dict[str, int] = Field(
        default_factory=dict, description="Tokens per window per model (resolved)."
    )
    budget_used: dict[str, int] = Field(default_factory=dict, description="Tokens used this window.")
    dual_prices: dict[str, float] = Field(default_factory=dict, description="Current gamma per model.")


# ---------------------------------------------------------------------------------------------
# Validation helpers for the operator and tests
# ---------------------------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe_validation_error(error: ValidationError, prefix: str = "spec") -> str:
    """One line per problem, each naming the field: `spec.models[1].replicas: min (3) must be <= max (2)`."""
    lines = []
    for item in error.errors():
        where = _loc(tuple(p for p in item["loc"] if p not in {"function-after"}))
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}.{where}: {msg}" if where else f"{prefix}: {msg}")
    return "; ".join(lines)


class SpecError(ValueError):
    """A custom resource spec that the operator cannot act on; the message names the fields."""


def parse_model_pool(spec: dict[str, Any]) -> ModelPoolSpec:
    try:
        return ModelPoolSpec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(describe_validation_error(e)) from None


def parse_routing_policy(spec: dict[str, Any]) -> RoutingPolicySpec:
    try:
        return RoutingPolicySpec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(describe_validation_error(e)) from None
