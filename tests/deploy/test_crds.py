"""The committed CRDs: generated from the models, identical in crds/ and the chart, structural (as the
API server demands), CEL rules that compile and refer to real fields, and accepted by kubectl."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_validation import CRD_DIR, REPO_ROOT, crds_by_kind, openapi_schema
from kubectl_api import KubeAPI

from tollway_operator import crdgen

KUBERNETES_VERSION = "1.32.0"
CHART_CRD_DIR = REPO_ROOT / "charts" / "tollway" / "crds"
KINDS = ["ModelPool", "RoutingPolicy"]


def test_committed_crds_match_the_generator() -> None:
    stale = [str(p.relative_to(REPO_ROOT)) for p in crdgen.stale_files()]
    assert stale == [], f"out of date: {stale}; run `tollway crds` and commit the result"


def test_chart_ships_the_same_crd_files() -> None:
    names = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    assert names == sorted(p.name for p in CHART_CRD_DIR.glob("*.yaml"))
    _, mismatch, errors = filecmp.cmpfiles(CRD_DIR, CHART_CRD_DIR, names, shallow=False)
    assert (mismatch, errors) == ([], [])
    assert sorted(crds_by_kind()) == KINDS


@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_is_valid_for_kubernetes(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)  # raises on misspelled/mistyped fields
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"


def structural_problems(node: dict[str, Any], path: str) -> list[str]:
    """The rules of a structural schema (apiextensions.k8s.io/v1 rejects CRDs that break them)."""
    problems = []
    for key in ("$ref", "allOf", "anyOf", "oneOf", "not", "definitions", "nullable"):
        if key in node:
            problems.append(f"{path}: {key} is not allowed here")
    exempt = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if not node.get("type") and not exempt:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if "default" in node:
        try:
            jsonschema.Draft4Validator(node).validate(node["default"])
        except jsonschema.ValidationError as e:
            problems.append(f"{path}: default {node['default']!r} is invalid: {e.message}")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{path}: required field {name!r} is not a property")
    for name, sub in (node.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}[*]")
    return problems


@pytest.mark.parametrize("kind", KINDS)
def test_crd_schema_is_structural(kind: str) -> None:
    schema = openapi_schema(kind)
    assert structural_problems(schema, kind) == []
    assert schema["properties"]["metadata"] == {"type": "object"}, "only name/generateName may be constrained"
    assert schema["required"] == ["spec"]


def cel_nodes(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    out = [(path, node, rule) for rule in node.get("x-kubernetes-validations", [])]
    for name, sub in (node.get("properties") or {}).items():
        out += cel_nodes(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += cel_nodes(node[key], f"{path}[*]")
    return out


ALL_CEL = [(kind, *entry) for kind in KINDS for entry in cel_nodes(openapi_schema(kind), kind)]


@pytest.mark.parametrize(
    ("kind", "path", "node", "rule"), ALL_CEL, ids=[f"{path}:{rule['rule']}" for _, path, _, rule in ALL_CEL]
)
def test_cel_rule_compiles_and_refers_to_real_fields(
    kind: str, path: str, node: dict[str, Any], rule: dict[str, str]
) -> None:
    env = celpy.Environment()
    env.compile(rule["rule"])  # raises on a syntax error
    fields = set(node.get("properties", {}))
    referenced = set(re.findall(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)", rule["rule"]))
    assert referenced <= fields, (
        f"{path}: rule {rule['rule']!r} refers to unknown fields {referenced - fields}"
    )
    if "fieldPath" in rule:
        assert rule["fieldPath"].lstrip(".").split(".")[0] in fields
    assert rule["message"], f"{path}: every rule needs a message a user can act on"


def schema_at(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """The schema node for a simple JSONPath like `.status.conditions[?(@.type=="Ready")].status`."""
    node: dict[str, Any] | None = schema
    for part in re.sub(r"\[[^\]]*\]", ".[]", json_path).strip(".").split("."):
        if node is None:
            return None
        node = node.get("items") if part == "[]" else (node.get("properties") or {}).get(part)
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_and_scale_paths_exist(kind: str) -> None:
    (version,) = crds_by_kind()[kind]["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert schema_at(schema, column["jsonPath"]) is not None, (
                f"column {column['name']}: no such field"
            )
    scale = version["subresources"].get("scale")
    if scale:
        for key in ("specReplicasPath", "statusReplicasPath"):
            assert schema_at(schema, scale[key]) == schema_at(schema, scale[key]) | {"type": "integer"}


async def test_kubectl_accepts_the_crds(kube_api: KubeAPI) -> None:
    result = await kube_api.kubectl("apply", "--dry-run=client", "--validate=false", "-f", str(CRD_DIR))
    assert result.returncode == 0, result.stderr
    for kind in KINDS:
        plural = crds_by_kind()[kind]["spec"]["names"]["plural"]
        assert (
            f"customresourcedefinition.apiextensions.k8s.io/{plural}.tollway.io created (dry run)"
            in result.stdout
        )


async def test_kubectl_accepts_install_manifests_and_examples_once_crds_exist(kube_api: KubeAPI) -> None:
    """The README's install order: CRDs, then manifests/install/, then objects of the new kinds."""
    install = REPO_ROOT / "manifests" / "install"
    files = [install / "namespace.yaml", install / "rbac.yaml", install / "operator.yaml"]
    examples = sorted((REPO_ROOT / "manifests" / "examples").glob("*.yaml"))

    before = await kube_api.kubectl("apply", "--dry-run=client", "--validate=false", "-f", str(examples[0]))
    assert before.returncode != 0 and "ensure CRDs are installed first" in before.stderr

    kube_api.emulator.register_crds()
    args = [arg for path in files + examples for arg in ("-f", str(path))]
    result = await kube_api.kubectl("apply", "--dry-run=client", "--validate=false", *args)
    assert result.returncode == 0, result.stderr
    for expected in (
        "namespace/tollway-system",
        "serviceaccount/tollway",
        "clusterrole.rbac.authorization.k8s.io/tollway",
        "clusterrolebinding.rbac.authorization.k8s.io/tollway",
        "deployment.apps/tollway",
        "modelpool.tollway.io/chat",
        "routingpolicy.tollway.io/chat-auto",
    ):
        assert f"{expected} created (dry run)" in result.stdout, result.stdout
