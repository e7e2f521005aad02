"""End-to-end: a pool calibrated on a set from a ConfigMap waits for that ConfigMap, then calibrates.

The ConfigMap is the user's; the operator reads it (its content is part of the calibration revision)
and mounts it into the calibration Job. Missing, the model's calibration says so in the pool's status
(`CalibrationSetMissing`, naming the ConfigMap) and no Job starts; once it exists, the Job does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_lib import Cluster, OperatorProcess, model_pool, small_model

pytestmark = pytest.mark.timeout(300)
SET = "calset-lines"
KEY = "lines.jsonl"


def calset_pool(namespace: str) -> dict[str, Any]:
    return model_pool(
        "calset", namespace, small_model(), calibration={"dataset": {"configMap": {"name": SET, "key": KEY}}}
    )


def calibration_of(cl: Cluster, model: str) -> dict[str, Any]:
    pool = cl.get("modelpool", "calset") or {}
    for entry in ((pool.get("status") or {}).get("calibration") or {}).get("models") or []:
        if entry.get("name") == model:
            return dict(entry)
    return {}


def test_a_configmap_calibration_set_is_waited_for_then_mounted(
    cluster: Cluster, namespace: str, operator: OperatorProcess | None
) -> None:
    cl = cluster
    cl.apply([calset_pool(namespace)])
    try:
        missing = cl.wait_for(
            lambda: (c := calibration_of(cl, "small")).get("reason") == "CalibrationSetMissing" and c,
            "the calibration waiting for its ConfigMap",
        )
        assert SET in missing["message"] and "not found" in missing["message"], missing
        assert not [j for j in cl.names("jobs") if j.startswith("calset-small-cal-")]

        line = {"prompt": "2+2?", "reference": "4", "grader": "number", "task": "arith"}
        cl.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": SET, "namespace": namespace},
                    "data": {KEY: json.dumps(line) + "\n"},
                }
            ]
        )
        (job,) = cl.wait_for(
            lambda: [j for j in cl.names("jobs") if j.startswith("calset-small-cal-")],
            "the calibration Job, once the model is ready and the set exists",
        )
        volumes = cl.get("job", job)["spec"]["template"]["spec"]["volumes"]
        assert any((v.get("configMap") or {}).get("name") == SET for v in volumes), volumes
        assert calibration_of(cl, "small").get("job") == job
    finally:
        cl.kubectl("delete", "modelpool", "calset", "-n", namespace, "--wait=false", check=False)
        cl.kubectl("delete", "configmap", SET, "-n", namespace, "--wait=false", check=False)
        cl.wait_for(lambda: "calset-small" not in cl.names("deployments"), "the pool's children collected")
