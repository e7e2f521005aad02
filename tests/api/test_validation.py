"""Every validation rule of the API (operator/api.py) and the router config (router_service/config.py),
each with a good and a bad value; bad values must produce a message that names the field and says
what is wrong. Rules the API server can check too are CEL rules in the CRDs: they are evaluated here
against the same good and bad objects, so the two stay mirrors of each other.

Field constraints (bounds, lengths, patterns, enums) are found by introspecting the models, so a new
constraint is tested without touching this file; a new pattern, model or cross-field rule fails
`test_every_rule_has_cases` until it gets its cases here.
"""

from __future__ import annotations

import copy
import inspect
import re
import types
import typing
from typing import Any

import annotated_types as at
import pytest
from crd_validation import crd_errors, crds_by_kind, iter_cel_rules, openapi_schema
from pydantic import BaseModel, ValidationError

import router_service.config as config
import tollway_operator.api as api
from router_service.config import CamelModel
from tollway_operator.api import SpecError, describe_validation_error, parse_model_pool, parse_routing_policy

# ---------------------------------------------------------------------------------------------
# The models and a minimal valid wire object for each
# ---------------------------------------------------------------------------------------------

BACKEND = {"name": "small", "url": "http://small:8000", "profile": "mistral-7b"}
MODEL = {"name": "small", "model": "mistralai/Mistral-7B-Instruct-v0.3"}

MINIMAL: dict[type[BaseModel], dict[str, Any]] = {
    api.SecretKeyRef: {"name": "hf-token"},
    api.Condition: {"type": "Ready", "status": "True", "reason": "AllReady"},
    api.ReplicaRange: {},
    api.CacheSpec: {},
    api.EnvVar: {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"},
    api.ExternalEndpoint: {"url": "https://api.example.com"},
    api.ModelSpec: MODEL,
    api.SchedulingSpec: {},
    api.SimulatorSpec: {},
    api.SimulateSpec: {},
    api.PeerSelector: {},
    api.NetworkPolicySpec: {},
    api.AutoscalingSpec: {"prometheusUrl": "http://prometheus:9090"},
    api.ModelPoolSpec: {"models": [MODEL]},
    api.ConfigMapKeyRef: {"name": "my-set", "key": "set.jsonl"},
    api.CalibrationSetSource: {"builtin": "builtin"},
    api.CalibrationJudge: {"model": "small"},
    api.CalibrationSpec: {},
    api.CalibrationTaskStatus: {"queries": 10},
    api.ModelCalibrationStatus: {"name": "small", "state": "Done", "revision": "abc12345"},
    api.CalibrationStatus: {},
    api.ScaleDecisionStatus: {
        "time": "2026-01-01T00:00:00Z",
        "fromReplicas": 1,
        "toReplicas": 2,
        "reason": "load",
    },
    api.ModelStatus: {"name": "small"},
    api.AutoscalingStatus: {},
    api.ModelPoolStatus: {},
    api.PoolRef: {"name": "chat"},
    api.BudgetsSpec: {},
    api.RouterDeploymentSpec: {},
    api.SharedStateSpec: {},
    api.RoutingPolicySpec: {"poolRef": {"name": "chat"}},
    api.RoutingPolicyStatus: {},
    config.Price: {},
    config.EmbeddingSettings: {},
    config.AnnSettings: {},
    config.EstimatorSettings: {},
    config.LearningSettings: {},
    config.ObjectiveSettings: {},
    config.DegradationSettings: {},
    config.CircuitBreakerSettings: {},
    config.BackendConfig: BACKEND,
    config.EndpointSliceSource: {"service": "chat-small", "namespace": "team-a"},
    config.ScorerWeights: {},
    config.EndpointPickerSettings: {},
    config.BudgetConfig: {},
    config.StateSettings: {},
    config.StateConfig: {},
    config.HistorySettings: {"builtin": True},
    config.AuthConfig: {},
    config.ServerConfig: {},
    config.RouterConfig: {"backends": [BACKEND]},
}

# Other fields a good value needs to be valid (a field's bound interacts with a cross-field rule).
CONTEXT: dict[tuple[type[BaseModel], str], dict[str, Any]] = {
    (api.ReplicaRange, "min"): {"max": 1000},
    (api.AutoscalingSpec, "metric"): {"query": "sum(rate(x[1m]))"},
    (config.EmbeddingSettings, "kind"): {"url": "http://embedder:8000", "model": "e5"},
    (config.BackendConfig, "urls"): {"url": None},
    (api.CalibrationSetSource, "url"): {"builtin": None},
    (api.CalibrationJudge, "url"): {"model": None, "upstreamModel": "judge-model"},
}

# Pattern -> (values that match, values that don't).
PATTERN_EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    config.DNS1123_LABEL: (["small", "llama-3-8b", "a"], ["Small", "-small", "small-", "small_model", "a.b"]),
    r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$": (
        ["Ready", "Scaled_Up", "A"],
        ["1Bad", "has space", "Ends:"],
    ),
    r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$": (
        ["40Gi", "1.5Ti", "100"],
        ["40GB", "Gi", "-1Gi"],
    ),
    r"^[-._a-zA-Z][-._a-zA-Z0-9]*$": (["HF_TOKEN", "a.b-c"], ["1ABC", "HAS SPACE", "A=B"]),
    r"^https?://": (["http://x", "https://api.example.com/v1"], ["ftp://x", "prometheus:9090", "x"]),
    config.REDIS_URL: (
        ["redis://redis:6379/0", "rediss://user:pw@redis.example.com:6380/2"],
        ["http://redis:6379", "redis:6379", "unix:///tmp/redis.sock"],
    ),
    r"^[A-Za-z0-9._/:-]+$": (["ml/chat-auto", "tollway"], ["has space", "brace{tag}", "a*b"]),
}

# List fields with length bounds: a factory for n distinct valid items.
LIST_ITEMS: dict[tuple[type[BaseModel], str], Any] = {
    (api.ModelPoolSpec, "models"): lambda n: [{"name": f"m{i}", "model": f"org/m{i}"} for i in range(n)],
    (config.RouterConfig, "backends"): lambda n: [{**BACKEND, "name": f"b{i}"} for i in range(n)],
    (config.BackendConfig, "urls"): lambda n: [f"http://10.0.0.{i}:8000" for i in range(n)],
}

# Enums nested inside a container: (good value, bad value, message).
NESTED_ENUMS: dict[tuple[type[BaseModel], str], tuple[Any, Any, str]] = {
    (config.DegradationSettings, "priority_headroom"): (
        {"critical": 2.0, "sheddable": 0.5},
        {"urgent": 2.0},
        "Input should be 'critical', 'standard' or 'sheddable'",
    ),
    (config.BackendConfig, "capabilities"): (
        ["chat", "embeddings"],
        ["chat", "images"],
        "Input should be 'chat', 'completions' or 'embeddings'",
    ),
}


def all_models() -> list[type[BaseModel]]:
    out = []
    for module in (api, config):
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, CamelModel)
                and obj is not CamelModel
                and obj.__module__ == module.__name__
            ):
                out.append(obj)
    return out


def alias(model: type[BaseModel], field: str) -> str:
    return model.model_fields[field].alias or field


def base_type(annotation: Any) -> Any:
    """`int | None` -> int."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (only,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return only
    return annotation


def pattern_of(field_info: Any) -> str | None:
    return next((m.pattern for m in field_info.metadata if getattr(m, "pattern", None)), None)


# ---------------------------------------------------------------------------------------------
# Cases generated from the field constraints
# ---------------------------------------------------------------------------------------------


def field_cases() -> list[tuple[str, type[BaseModel], str, list[Any], list[Any], str]]:
    """(id, model, field, good values, bad values, what the message must say)."""
    cases = []
    for model in all_models():
        for field, info in model.model_fields.items():
            kind = base_type(info.annotation)
            is_float = kind is float
            step = 0.01 if is_float else 1
            ident = f"{model.__name__}.{field}"
            for meta in info.metadata:
                if isinstance(meta, at.Ge):
                    cases.append(
                        (
                            f"{ident}>={meta.ge}",
                            model,
                            field,
                            [meta.ge],
                            [meta.ge - step],
                            f"greater than or equal to {meta.ge}",
                        )
                    )
                elif isinstance(meta, at.Gt):
                    cases.append(
                        (
                            f"{ident}>{meta.gt}",
                            model,
                            field,
                            [meta.gt + step],
                            [meta.gt],
                            f"greater than {meta.gt}",
                        )
                    )
                elif isinstance(meta, at.Le):
                    cases.append(
                        (
                            f"{ident}<={meta.le}",
                            model,
                            field,
                            [meta.le],
                            [meta.le + step],
                            f"less than or equal to {meta.le}",
                        )
                    )
                elif isinstance(meta, at.Lt):
                    cases.append(
                        (
                            f"{ident}<{meta.lt}",
                            model,
                            field,
                            [meta.lt - step],
                            [meta.lt],
                            f"less than {meta.lt}",
                        )
                    )
                elif isinstance(meta, at.MinLen | at.MaxLen):
                    n = meta.min_length if isinstance(meta, at.MinLen) else meta.max_length
                    delta = -1 if isinstance(meta, at.MinLen) else 1
                    if typing.get_origin(kind) is list:
                        make = LIST_ITEMS[(model, field)]
                        unit = "item"
                    else:

                        def make(k: int) -> str:
                            return "a" * k

                        unit = "character"
                    word = "at least" if delta < 0 else "at most"
                    cases.append(
                        (
                            f"{ident}:len{'>=' if delta < 0 else '<='}{n}",
                            model,
                            field,
                            [make(n)],
                            [make(n + delta)],
                            f"should have {word} {n} {unit}",
                        )
                    )
                elif getattr(meta, "pattern", None):
                    good, bad = PATTERN_EXAMPLES[meta.pattern]
                    cases.append((f"{ident}:pattern", model, field, good, bad, "String should match pattern"))
            if typing.get_origin(kind) is typing.Literal:
                allowed = list(typing.get_args(kind))
                cases.append((f"{ident}:enum", model, field, allowed, ["bogus"], "Input should be"))
            if (model, field) in NESTED_ENUMS:
                good, bad, says = NESTED_ENUMS[(model, field)]
                cases.append((f"{ident}:enum", model, field, [good], [bad], says))
    return cases


FIELD_CASES = field_cases()


def with_field(model: type[BaseModel], field: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL[model])
    data.update(copy.deepcopy(CONTEXT.get((model, field), {})))
    data[alias(model, field)] = value
    return data


@pytest.mark.parametrize(
    ("model", "field", "good", "bad", "says"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_field_rule(model: type[BaseModel], field: str, good: list[Any], bad: list[Any], says: str) -> None:
    for value in good:
        model.model_validate(with_field(model, field, value))
    for value in bad:
        with pytest.raises(ValidationError) as info:
            model.model_validate(with_field(model, field, value))
        message = describe_validation_error(info.value, prefix=model.__name__)
        assert message.startswith(f"{model.__name__}.{alias(model, field)}"), message
        assert says in message, f"{message!r} should say {says!r}"


@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.__name__)
def test_minimal_object_is_valid_and_unknown_fields_are_named(model: type[BaseModel]) -> None:
    model.model_validate(MINIMAL[model])
    with pytest.raises(ValidationError) as info:
        model.model_validate({**MINIMAL[model], "replicaCount": 3})
    message = describe_validation_error(info.value, prefix=model.__name__)
    assert message == f"{model.__name__}.replicaCount: Extra inputs are not permitted"


@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.__name__)
def test_wire_names_are_camel_case_and_round_trip(model: type[BaseModel]) -> None:
    obj = model.model_validate(MINIMAL[model])
    wire = obj.to_wire()
    assert all(not re.search(r"_[a-z]", key) for key in wire), wire
    assert model.model_validate(wire) == obj


# ---------------------------------------------------------------------------------------------
# Cross-field rules (model validators)
# ---------------------------------------------------------------------------------------------

# (id, model, validator, good object, bad object, the message: `field: what is wrong`)
MODEL_RULES: list[tuple[str, type[BaseModel], str, dict[str, Any], dict[str, Any], str]] = [
    (
        "replicas-min-le-max",
        api.ReplicaRange,
        "_ordered",
        {"min": 2, "max": 2},
        {"min": 3, "max": 2},
        "ReplicaRange: min (3) must be <= max (2)",
    ),
    (
        "cache-pvc-fields",
        api.CacheSpec,
        "_pvc_fields",
        {"kind": "pvc", "storageClassName": "fast"},
        {"kind": "emptyDir", "existingClaim": "weights"},
        "CacheSpec: storageClassName and existingClaim only apply to kind pvc",
    ),
    (
        "model-or-endpoint",
        api.ModelSpec,
        "_deployable",
        {"name": "ext", "endpoint": {"url": "https://x"}},
        {"name": "ext"},
        "ModelSpec: set model (a Hugging Face id or path to deploy) or endpoint (an external URL)",
    ),
    (
        "promql-needs-query",
        api.AutoscalingSpec,
        "_query",
        {"prometheusUrl": "http://p", "metric": "promql", "query": "sum(x)"},
        {"prometheusUrl": "http://p", "metric": "promql"},
        "AutoscalingSpec: metric 'promql' needs query (a PromQL expression)",
    ),
    (
        "unique-model-names",
        api.ModelPoolSpec,
        "_unique",
        {"models": [MODEL, {**MODEL, "name": "large"}]},
        {"models": [MODEL, MODEL]},
        "ModelPoolSpec.models: model names must be unique; repeated: ['small']",
    ),
    (
        "per-model-xor-total",
        api.BudgetsSpec,
        "_one_kind",
        {"perModel": {"small": 100}},
        {"perModel": {"small": 100}, "totalTokens": 100},
        "BudgetsSpec: set perModel or totalTokens, not both",
    ),
    (
        "kv-cache-target-at-most-one",
        api.AutoscalingSpec,
        "_kv_target",
        {"metric": "kv_cache_usage", "target": 0.7},
        {"metric": "kv_cache_usage", "target": 1.5},
        "AutoscalingSpec: target (1.5) must be <= 1 for metric kv_cache_usage",
    ),
    (
        "openai-embedding-needs-url",
        config.EmbeddingSettings,
        "_needs_url",
        {"kind": "openai", "url": "http://e:8000"},
        {"kind": "openai"},
        "EmbeddingSettings: embedding.url is required when embedding.kind is 'openai'",
    ),
    (
        "state-url-or-secret",
        api.SharedStateSpec,
        "_one_source",
        {"urlSecret": {"name": "redis", "key": "url"}},
        {"url": "redis://redis:6379/0", "urlSecret": {"name": "redis", "key": "url"}},
        "SharedStateSpec: set url or urlSecret, not both",
    ),
    (
        "history-one-source",
        config.HistorySettings,
        "_one_source",
        {"path": "/data/history.csv"},
        {"path": "/data/history.csv", "builtin": True},
        "HistorySettings: history needs exactly one source: set one of path, configMap, url or builtin: true (got 2)",
    ),
    (
        "history-some-source",
        config.HistorySettings,
        "_one_source",
        {"configMap": "history"},
        {},
        "HistorySettings: history needs exactly one source",
    ),
    (
        "backend-url-or-urls",
        config.BackendConfig,
        "_addresses",
        {**BACKEND, "url": None, "urls": ["http://a:8000", "http://b:8000"]},
        {**BACKEND, "urls": ["http://a:8000"]},
        "BackendConfig: backend 'small': set exactly one of url or urls",
    ),
    (
        "backend-urls-distinct",
        config.BackendConfig,
        "_addresses",
        {**BACKEND, "url": None, "urls": ["http://a:8000"]},
        {**BACKEND, "url": None, "urls": ["http://a:8000", "http://a:8000"]},
        "BackendConfig: backend 'small': urls lists an address twice",
    ),
    (
        "backend-urls-replicas",
        config.BackendConfig,
        "_addresses",
        {**BACKEND, "url": None, "urls": ["http://a:8000", "http://b:8000"], "replicas": 2},
        {**BACKEND, "url": None, "urls": ["http://a:8000", "http://b:8000"], "replicas": 3},
        "BackendConfig: backend 'small': replicas (3) must match urls (2) or be left out",
    ),
    (
        "backend-urls-own-metrics",
        config.BackendConfig,
        "_addresses",
        {**BACKEND, "metricsUrl": "http://small:9000/metrics"},
        {**BACKEND, "url": None, "urls": ["http://a:8000"], "metricsUrl": "http://a:9000/metrics"},
        "BackendConfig: backend 'small': metricsUrl goes with url; with urls each has its own",
    ),
    (
        "backend-slices-need-url",
        config.BackendConfig,
        "_addresses",
        {**BACKEND, "endpointSlices": {"service": "chat-small", "namespace": "ns"}},
        {
            **BACKEND,
            "url": None,
            "urls": ["http://a:8000"],
            "endpointSlices": {"service": "s", "namespace": "ns"},
        },
        "BackendConfig: backend 'small': endpointSlices goes with url (the Service)",
    ),
    (
        "backend-names-unique",
        config.RouterConfig,
        "_consistent",
        {"backends": [BACKEND, {**BACKEND, "name": "b"}]},
        {"backends": [BACKEND, BACKEND]},
        "RouterConfig: backends: duplicate name(s) ['small']",
    ),
    (
        "served-name-not-a-backend",
        config.RouterConfig,
        "_consistent",
        {"servedModelName": "auto", "backends": [BACKEND]},
        {"servedModelName": "small", "backends": [BACKEND]},
        "RouterConfig: servedModelName 'small' collides with a backend name",
    ),
    (
        "budgets-name-backends",
        config.RouterConfig,
        "_consistent",
        {"backends": [BACKEND], "budgets": {"tokens": {"small": 10}}},
        {"backends": [BACKEND], "budgets": {"tokens": {"large": 10}}},
        "RouterConfig: budgets.tokens names unknown backend(s) ['large']; backends are ['small']",
    ),
    (
        "calibration-set-one-source",
        api.CalibrationSetSource,
        "_one_source",
        {"url": "https://example.com/set.jsonl"},
        {"builtin": "builtin", "url": "https://example.com/set.jsonl"},
        "CalibrationSetSource: set exactly one of builtin, configMap or url (got 2)",
    ),
    (
        "calibration-judge-one",
        api.CalibrationJudge,
        "_one_judge",
        {"url": "https://judge.example.com", "upstreamModel": "gpt-4o"},
        {"model": "small", "url": "https://judge.example.com", "upstreamModel": "gpt-4o"},
        "CalibrationJudge: set model (a model of this pool) or url (an external endpoint), not both",
    ),
    (
        "calibration-judge-url-names-model",
        api.CalibrationJudge,
        "_one_judge",
        {"model": "small"},
        {"url": "https://judge.example.com"},
        "CalibrationJudge: url needs upstreamModel",
    ),
    (
        "calibration-judge-in-pool",
        api.ModelPoolSpec,
        "_judge_in_pool",
        {"models": [MODEL], "calibration": {"judge": {"model": MODEL["name"]}}},
        {"models": [MODEL], "calibration": {"judge": {"model": "nobody"}}},
        "ModelPoolSpec: calibration.judge.model 'nobody' is not a model of this pool",
    ),
]


@pytest.mark.parametrize(
    ("model", "validator", "good", "bad", "says"),
    [c[1:] for c in MODEL_RULES],
    ids=[c[0] for c in MODEL_RULES],
)
def test_cross_field_rule(
    model: type[BaseModel], validator: str, good: dict[str, Any], bad: dict[str, Any], says: str
) -> None:
    decorators = model.__pydantic_decorators__
    assert validator in decorators.model_validators or validator in decorators.field_validators
    model.model_validate(good)
    with pytest.raises(ValidationError) as info:
        model.model_validate(bad)
    message = describe_validation_error(info.value, prefix=model.__name__)
    assert says in message, f"{message!r} should say {says!r}"


def test_every_rule_has_cases() -> None:
    """A new model, pattern or cross-field rule must come with cases in this file."""
    models = all_models()
    assert set(models) == set(MINIMAL), f"models without a MINIMAL object: {set(models) - set(MINIMAL)}"
    validators = {
        (model, name)
        for model in models
        for kind in ("model_validators", "field_validators")
        for name in getattr(model.__pydantic_decorators__, kind)
    }
    assert validators == {(case[1], case[2]) for case in MODEL_RULES}
    for model in models:
        for field, info in model.model_fields.items():
            pattern = pattern_of(info)
            assert pattern is None or pattern in PATTERN_EXAMPLES, f"{model.__name__}.{field}: add examples"
            nested = typing.get_args(base_type(info.annotation))
            if any(typing.get_origin(a) is typing.Literal for a in nested):
                assert (model, field) in NESTED_ENUMS, f"{model.__name__}.{field}: add a NESTED_ENUMS case"
    assert len(FIELD_CASES) > 80


# ---------------------------------------------------------------------------------------------
# Messages through the operator's parse functions: the full path from `spec`
# ---------------------------------------------------------------------------------------------


def test_parse_model_pool_names_nested_fields_and_every_problem() -> None:
    spec = {
        "models": [
            {"name": "small", "model": "m", "replicas": {"min": 1, "max": 2}},
            {"name": "large", "model": "m", "replicas": {"min": 3, "max": 2}, "gpus": 32},
        ]
    }
    with pytest.raises(SpecError) as info:
        parse_model_pool(spec)
    problems = str(info.value).split("; ")
    assert "spec.models[1].gpus: Input should be less than or equal to 16" in problems
    assert "spec.models[1].replicas: min (3) must be <= max (2)" in problems


def test_parse_model_pool_requires_models() -> None:
    with pytest.raises(SpecError, match=r"^spec\.models: Field required$"):
        parse_model_pool({})
    with pytest.raises(SpecError, match=r"^spec\.models: List should have at least 1 item"):
        parse_model_pool({"models": []})


def test_parse_routing_policy_names_nested_fields() -> None:
    with pytest.raises(SpecError) as info:
        parse_routing_policy({"poolRef": {"name": "chat"}, "ann": {"k": 0}, "embedding": {"kind": "openai"}})
    message = str(info.value)
    assert "spec.ann.k: Input should be greater than or equal to 1" in message
    assert "spec.embedding: embedding.url is required when embedding.kind is 'openai'" in message


def test_parse_functions_return_models_with_defaults() -> None:
    pool = parse_model_pool({"models": [MODEL]})
    assert pool.models[0].replicas.min == 1 and pool.models[0].cache.kind == "emptyDir"
    policy = parse_routing_policy({"poolRef": {"name": "chat"}})
    assert policy.history.builtin and policy.budgets is None


# ---------------------------------------------------------------------------------------------
# CEL rules in the CRDs: present, evaluated, and in step with the models
# ---------------------------------------------------------------------------------------------


def pool(**changes: Any) -> dict[str, Any]:
    spec = {"models": [copy.deepcopy(MODEL)], "autoscaling": {"prometheusUrl": "http://p:9090"}}
    for path, value in changes.items():
        target = spec
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return {"apiVersion": api.API_VERSION, "kind": "ModelPool", "metadata": {"name": "p"}, "spec": spec}


def policy_spec(**fields: Any) -> dict[str, Any]:
    spec = {"poolRef": {"name": "chat"}, **fields}
    return {"apiVersion": api.API_VERSION, "kind": "RoutingPolicy", "metadata": {"name": "r"}, "spec": spec}


def policy(**budgets: Any) -> dict[str, Any]:
    spec = {"poolRef": {"name": "chat"}, "budgets": budgets}
    return {"apiVersion": api.API_VERSION, "kind": "RoutingPolicy", "metadata": {"name": "r"}, "spec": spec}


# (CEL message, schema path of the rule, good object, bad object, field the CRD error names)
CEL_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    (
        "min must be <= max",
        "spec.properties.models[*].replicas",
        pool(models__0__replicas={"min": 0, "max": 1}),
        pool(models__0__replicas={"min": 2}),
        "spec.models[0].replicas",
    ),
    (
        "model names must be unique",
        "spec",
        pool(models=[MODEL, {**MODEL, "name": "large"}]),
        pool(models=[MODEL, MODEL]),
        "spec.models",
    ),
    (
        "set model (to deploy) or endpoint (external)",
        "spec.models[*]",
        pool(models=[{"name": "ext", "endpoint": {"url": "https://x"}}]),
        pool(models=[{"name": "ext"}]),
        "spec.models[0]",
    ),
    (
        "storageClassName and existingClaim only apply to kind pvc",
        "spec.models[*].cache",
        pool(models__0__cache={"kind": "pvc", "existingClaim": "w"}),
        pool(models__0__cache={"existingClaim": "w"}),
        "spec.models[0].cache",
    ),
    (
        "metric promql needs query",
        "spec.autoscaling",
        pool(autoscaling={"prometheusUrl": "http://p", "metric": "promql", "query": "up"}),
        pool(autoscaling={"prometheusUrl": "http://p", "metric": "promql"}),
        "spec.autoscaling",
    ),
    (
        "target must be <= 1 for metric kv_cache_usage (1 = 100% of one replica's KV cache)",
        "spec.autoscaling",
        pool(autoscaling={"metric": "kv_cache_usage", "target": 0.8}),
        pool(autoscaling={"metric": "kv_cache_usage", "target": 2}),
        "spec.autoscaling",
    ),
    (
        "url is required when kind is openai",
        "spec.embedding",
        policy_spec(embedding={"kind": "openai", "url": "http://e:8000"}),
        policy_spec(embedding={"kind": "openai"}),
        "spec.embedding",
    ),
    (
        "set exactly one of path, configMap, url or builtin: true",
        "spec.history",
        policy_spec(history={"configMap": "history"}),
        policy_spec(history={"configMap": "history", "url": "https://h/x.csv"}),
        "spec.history",
    ),
    (
        "set url or urlSecret, not both",
        "spec.state",
        policy_spec(state={"urlSecret": {"name": "redis", "key": "url"}}),
        policy_spec(state={"url": "redis://r:6379/0", "urlSecret": {"name": "redis"}}),
        "spec.state",
    ),
    (
        "set perModel or totalTokens, not both",
        "spec.budgets",
        policy(totalTokens=1000),
        policy(totalTokens=1000, perModel={"small": 10}),
        "spec.budgets",
    ),
    (
        "calibration.judge.model must name a model of this pool",
        "spec",
        pool(calibration={"judge": {"model": MODEL["name"]}}),
        pool(calibration={"judge": {"model": "nobody"}}),
        "spec",
    ),
    (
        "set exactly one of builtin, configMap or url",
        "spec.calibration.dataset",
        pool(calibration={"dataset": {"configMap": {"name": "set", "key": "set.jsonl"}}}),
        pool(calibration={"dataset": {"builtin": "builtin", "url": "https://x/set.jsonl"}}),
        "spec.calibration.dataset",
    ),
    (
        "set model (a pool model) or url, not both",
        "spec.calibration.judge",
        pool(calibration={"judge": {"url": "https://j", "upstreamModel": "gpt-4o"}}),
        pool(calibration={"judge": {"model": MODEL["name"], "url": "https://j", "upstreamModel": "g"}}),
        "spec.calibration.judge",
    ),
    (
        "url needs upstreamModel",
        "spec.calibration.judge",
        pool(calibration={"judge": {"url": "https://j", "upstreamModel": "gpt-4o"}}),
        pool(calibration={"judge": {"url": "https://j"}}),
        "spec.calibration.judge",
    ),
]
PARSE = {"ModelPool": parse_model_pool, "RoutingPolicy": parse_routing_policy}


@pytest.mark.parametrize(
    ("message", "where", "good", "bad", "field"), CEL_CASES, ids=[c[0] for c in CEL_CASES]
)
def test_cel_rule_mirrors_the_model(
    message: str, where: str, good: dict[str, Any], bad: dict[str, Any], field: str
) -> None:
    assert crd_errors(good) == []
    PARSE[good["kind"]](good["spec"])
    assert f"{field}: {message}" in crd_errors(bad)
    with pytest.raises(SpecError):
        PARSE[bad["kind"]](bad["spec"])


def test_every_cel_rule_has_a_case() -> None:
    messages = {
        rule["message"] for kind in crds_by_kind() for _, rule in iter_cel_rules(openapi_schema(kind))
    }
    assert messages == {case[0] for case in CEL_CASES}
