"""End-to-end: the API server itself enforces the CRDs' rules.

`crds` applied them server-side, so the API server compiled every CEL rule. Each bad object of the
API tests (tests/api/test_validation.py: one per CEL rule, plus schema bounds, patterns and unknown
fields, and repeated keys of list-type maps) is refused with a message naming the field; each good one
is accepted. Server-side dry runs: nothing is stored.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import pytest
from e2e_lib import REPO_ROOT, Cluster, real_cluster_only

sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "api")]
from test_validation import CEL_CASES, LIST_MAP_CASES, policy_spec, pool  # noqa: E402  (the API tests' own cases)

pytestmark = pytest.mark.timeout(300)

# (bad object, field the message names, what it says): the OpenAPI schema's own checks.
SCHEMA_CASES: list[tuple[dict[str, Any], str, str]] = [
    (pool(models__0__gpus=32), "spec.models[0].gpus", "should be less than or equal to 16"),
    (pool(models__0__name="Small_Model"), "spec.models[0].name", "should match"),
    (
        pool(models__0__replicas={"min": -1, "max": 1}),
        "spec.models[0].replicas.min",
        "should be greater than or equal to 0",
    ),
    (pool(models__0__gpu=2), "spec.models[0].gpu", "unknown field"),
    (policy_spec(ann={"k": 0}), "spec.ann.k", "should be greater than or equal to 1"),
    *[(bad, field, says) for _, bad, field, says in LIST_MAP_CASES],
]


def dry_run_create(cl: Cluster, obj: dict[str, Any], namespace: str) -> tuple[bool, str]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    done = cl.kubectl(
        "create", "--dry-run=server", "--validate=strict", "-f", "-", stdin=json.dumps(obj), check=False
    )
    return done.returncode == 0, done.stderr.strip()


@pytest.mark.parametrize(
    ("message", "where", "good", "bad", "field"), CEL_CASES, ids=[c[0] for c in CEL_CASES]
)
def test_cel_rule_enforced_by_the_api_server(
    cluster: Cluster,
    namespace: str,
    message: str,
    where: str,
    good: dict[str, Any],
    bad: dict[str, Any],
    field: str,
) -> None:
    real_cluster_only(cluster, "CEL rules are evaluated by the API server")
    accepted, error = dry_run_create(cluster, good, namespace)
    assert accepted, f"the good object was refused: {error}"
    accepted, error = dry_run_create(cluster, bad, namespace)
    assert not accepted, f"the API server accepted an object breaking {message!r}"
    assert field in error and message in error, error


@pytest.mark.parametrize(("bad", "field", "says"), SCHEMA_CASES, ids=[c[1] for c in SCHEMA_CASES])
def test_schema_enforced_by_the_api_server(
    cluster: Cluster, namespace: str, bad: dict[str, Any], field: str, says: str
) -> None:
    real_cluster_only(cluster, "the OpenAPI schema is enforced by the API server")
    accepted, error = dry_run_create(cluster, bad, namespace)
    assert not accepted, f"the API server accepted {bad['spec']}"
    assert field in error and says in error, error
