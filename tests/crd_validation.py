"""Validate objects against the generated CRDs the way the API server would, without a cluster.

`crd_errors(obj)` applies the schema's defaults, then reports, each naming the field:
- OpenAPI v3 schema violations (types, bounds, patterns, enums, required fields) via jsonschema;
- unknown fields (the API server's strict field validation, which `kubectl apply` asks for);
- repeated keys in list-type maps (`x-kubernetes-list-type: map`), as "Duplicate value";
- `x-kubernetes-validations` CEL rules, evaluated with cel-python against the defaulted object.

Used by tests/deploy (examples, install) and tests/api (validation rules).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = REPO_ROOT / "crds"


@functools.cache
def crds_by_kind() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd
    return out


def openapi_schema(kind: str) -> dict[str, Any]:
    (version,) = crds_by_kind()[kind]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def field_path(parts: Iterator[Any] | list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting, as the API server does before validation."""
    if isinstance(obj, dict):
        props = schema.get("properties")
        if props:
            for name, sub in props.items():
                if name not in obj and "default" in sub:
                    obj[name] = copy.deepcopy(sub["default"])
            for name, value in obj.items():
                if name in props:
                    apply_defaults(props[name], value)
        elif isinstance(schema.get("additionalProperties"), dict):
            for value in obj.values():
                apply_defaults(schema["additionalProperties"], value)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(schema["items"], item)
    return obj


def unknown_fields(schema: dict[str, Any], obj: Any, path: tuple[Any, ...] = ()) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        if props is not None:
            for name, value in obj.items():
                if name not in props:
                    problems.append(f"{field_path((*path, name))}: unknown field {name!r}")
                else:
                    problems += unknown_fields(props[name], value, (*path, name))
        elif isinstance(schema.get("additionalProperties"), dict):
            for name, value in obj.items():
                problems += unknown_fields(schema["additionalProperties"], value, (*path, name))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problems += unknown_fields(schema["items"], item, (*path, i))
    return problems


def duplicate_keys(schema: dict[str, Any], obj: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """Items of a list-type map whose keys an earlier item has already, each at its index."""
    problems = []
    if isinstance(obj, dict):
        for name, value in obj.items():
            sub = (schema.get("properties") or {}).get(name) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                problems += duplicate_keys(sub, value, (*path, name))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        if schema.get("x-kubernetes-list-type") == "map":
            seen = set()
            for i, item in enumerate(obj):
                key = tuple((k, item.get(k)) for k in schema["x-kubernetes-list-map-keys"])
                if key in seen:
                    problems.append(f"{field_path((*path, i))}: Duplicate value: {dict(key)}")
                seen.add(key)
        for i, item in enumerate(obj):
            problems += duplicate_keys(schema["items"], item, (*path, i))
    return problems


def iter_cel_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, str]]]:
    """(schema path, rule) for every x-kubernetes-validations entry; lists show as `[*]`."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from iter_cel_rules(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from iter_cel_rules(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_cel_rules(schema["additionalProperties"], f"{path}[*]")


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def evaluate_cel(rule: str, value: Any) -> bool:
    """One rule with `self` bound to `value` (a JSON-like object)."""
    return bool(_program(rule).evaluate({"self": celpy.json_to_cel(value)}))


def cel_violations(schema: dict[str, Any], obj: Any, path: tuple[Any, ...] = ()) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not evaluate_cel(rule["rule"], obj):
            where = field_path(path) + rule.get("fieldPath", "")
            problems.append(f"{where}: {rule['message']}")
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                problems += cel_violations(sub, obj[name], (*path, name))
        if isinstance(schema.get("additionalProperties"), dict):
            for name, value in obj.items():
                problems += cel_violations(schema["additionalProperties"], value, (*path, name))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problems += cel_violations(schema["items"], item, (*path, i))
    return problems


def schema_violations(schema: dict[str, Any], obj: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    return [
        f"{field_path(error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Everything the API server would reject `obj` (a whole custom object) for; [] if it is accepted."""
    kind = obj.get("kind")
    if kind not in crds_by_kind():
        return [f"kind: no tollway CRD for kind {kind!r}"]
    schema = openapi_schema(kind)
    defaulted = apply_defaults(schema, copy.deepcopy(obj))
    problems = (
        schema_violations(schema, defaulted)
        + unknown_fields(schema, defaulted)
        + duplicate_keys(schema, defaulted)
    )
    if not problems:  # the API server runs CEL only on objects that pass the schema
        problems = cel_violations(schema, defaulted)
    return problems
