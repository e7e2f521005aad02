"""Every object in manifests/examples/ is accepted by the CRD schema (with CEL rules) and the models;
broken variants of them are rejected by both, with messages that name the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_validation import REPO_ROOT, crd_errors

from tollway_operator.api import (
    API_VERSION,
    ModelPoolSpec,
    RoutingPolicySpec,
    SpecError,
    parse_model_pool,
    parse_routing_policy,
)

EXAMPLES = REPO_ROOT / "manifests" / "examples"
PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ModelPool": parse_model_pool,
    "RoutingPolicy": parse_routing_policy,
}


def example_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i}:{doc.get('kind')}/{doc['metadata']['name']}", doc))
    return out


EXAMPLE_OBJECTS = example_objects()


def example(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(obj for _, obj in EXAMPLE_OBJECTS if obj["kind"] == kind))


def test_examples_exist() -> None:
    kinds = sorted(obj["kind"] for _, obj in EXAMPLE_OBJECTS)
    assert kinds == ["ModelPool", "RoutingPolicy"], (
        f"manifests/examples should hold one of each kind, has {kinds}"
    )


@pytest.mark.parametrize(
    "obj", [obj for _, obj in EXAMPLE_OBJECTS], ids=[name for name, _ in EXAMPLE_OBJECTS]
)
def test_example_is_accepted_by_crd_schema_and_models(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == API_VERSION
    assert crd_errors(obj) == []
    PARSERS[obj["kind"]](obj["spec"])  # raises SpecError naming the field on failure


def test_example_pool_is_realistic() -> None:
    """Three models of different size and price, each deployable, with routing profiles."""
    pool: ModelPoolSpec = parse_model_pool(example("ModelPool")["spec"])
    assert len(pool.models) == 3
    assert len({m.gpus for m in pool.models}) == 3, "models should differ in size (GPUs per replica)"
    prices = [m.cost.input_per_million_tokens + m.cost.output_per_million_tokens for m in pool.models]
    assert len(set(prices)) == 3 and all(p > 0 for p in prices), "models should differ in price"
    assert all(m.model and m.profile for m in pool.models)
    assert pool.autoscaling is not None


def test_example_policy_routes_over_example_pool() -> None:
    policy: RoutingPolicySpec = parse_routing_policy(example("RoutingPolicy")["spec"])
    pool = example("ModelPool")
    assert policy.pool_ref.name == pool["metadata"]["name"]
    assert example("RoutingPolicy")["metadata"]["namespace"] == pool["metadata"]["namespace"]
    assert policy.served_model_name not in {m["name"] for m in pool["spec"]["models"]}


# (id, kind, change to the example, field the CRD's message names, what it says, the model's message:
# `field: what is wrong`)
BAD_OBJECTS: list[tuple[str, str, Callable[[dict[str, Any]], None], str, str, str]] = [
    (
        "replicas-min-above-max",
        "ModelPool",
        lambda o: o["spec"]["models"][0].update(replicas={"min": 5, "max": 2}),
        "spec.models[0].replicas",
        "min must be <= max",
        "spec.models[0].replicas: min (5) must be <= max (2)",
    ),
    (
        "duplicate-model-names",
        "ModelPool",
        lambda o: o["spec"]["models"][1].update(name="small"),
        # A list-type map keyed by name: the API server names the repeated item.
        "spec.models[1]",
        "Duplicate value",
        # A pydantic field validator reports at the list; the message names the repeated name.
        "spec.models: model names must be unique; repeated: ['small']",
    ),
    (
        "model-without-model-or-endpoint",
        "ModelPool",
        lambda o: o["spec"]["models"][2].pop("model"),
        "spec.models[2]",
        "set model (to deploy) or endpoint (external)",
        "spec.models[2]: set model (a Hugging Face id or path to deploy) or endpoint",
    ),
    (
        "zero-gpus",
        "ModelPool",
        lambda o: o["spec"]["models"][0].update(gpus=0),
        "spec.models[0].gpus",
        "less than the minimum of 1",
        "spec.models[0].gpus: Input should be greater than or equal to 1",
    ),
    (
        "model-name-not-dns-label",
        "ModelPool",
        lambda o: o["spec"]["models"][0].update(name="Small_Model"),
        "spec.models[0].name",
        "does not match",
        "spec.models[0].name: String should match pattern",
    ),
    (
        "misspelled-field",
        "ModelPool",
        lambda o: o["spec"]["models"][0].update(maxModelLength=4096),
        "spec.models[0].maxModelLength",
        "unknown field",
        "spec.models[0].maxModelLength: Extra inputs are not permitted",
    ),
    (
        "emptydir-cache-with-storage-class",
        "ModelPool",
        lambda o: o["spec"]["models"][0]["cache"].update(storageClassName="fast"),
        "spec.models[0].cache",
        "storageClassName and existingClaim only apply to kind pvc",
        "spec.models[0].cache: storageClassName and existingClaim only apply to kind pvc",
    ),
    (
        "promql-without-query",
        "ModelPool",
        lambda o: o["spec"]["autoscaling"].update(metric="promql"),
        "spec.autoscaling",
        "metric promql needs query",
        "spec.autoscaling: metric 'promql' needs query",
    ),
    (
        "prometheus-url-not-http",
        "ModelPool",
        lambda o: o["spec"]["autoscaling"].update(prometheusUrl="prometheus:9090"),
        "spec.autoscaling.prometheusUrl",
        "does not match",
        "spec.autoscaling.prometheusUrl: String should match pattern",
    ),
    (
        "budgets-per-model-and-total",
        "RoutingPolicy",
        lambda o: o["spec"]["budgets"].update(perModel={"small": 1000}),
        "spec.budgets",
        "set perModel or totalTokens, not both",
        "spec.budgets: set perModel or totalTokens, not both",
    ),
    (
        "no-pool-ref",
        "RoutingPolicy",
        lambda o: o["spec"].pop("poolRef"),
        "spec",
        "'poolRef' is a required property",
        "spec.poolRef: Field required",
    ),
    (
        "unknown-split",
        "RoutingPolicy",
        lambda o: o["spec"]["budgets"].update(split="random"),
        "spec.budgets.split",
        "is not one of",
        "spec.budgets.split: Input should be 'weighted', 'uniform', 'cost' or 'perf'",
    ),
    (
        "router-log-level",
        "RoutingPolicy",
        lambda o: o["spec"]["router"].update(logLevel="verbose"),
        "spec.router.logLevel",
        "is not one of",
        "spec.router.logLevel: Input should be 'debug', 'info', 'warning' or 'error'",
    ),
]


@pytest.mark.parametrize(
    ("kind", "change", "field", "crd_says", "model_says"),
    [case[1:] for case in BAD_OBJECTS],
    ids=[case[0] for case in BAD_OBJECTS],
)
def test_bad_object_is_rejected_by_crd_and_models(
    kind: str, change: Callable[[dict[str, Any]], None], field: str, crd_says: str, model_says: str
) -> None:
    obj = example(kind)
    change(obj)

    crd = crd_errors(obj)
    assert any(p.startswith(f"{field}") and crd_says in p for p in crd), (
        f"the CRD should reject it at {field} with {crd_says!r}; it said {crd}"
    )

    with pytest.raises(SpecError) as info:
        PARSERS[kind](obj["spec"])
    message = str(info.value)
    assert model_says in message, f"the model's message {message!r} should say {model_says!r}"


def test_examples_folder_has_only_yaml() -> None:
    others = [p.name for p in Path(EXAMPLES).iterdir() if p.suffix not in {".yaml", ".yml"}]
    assert others == []
