"""Desired state of a ModelPool's calibration: which models get a calibration Job, and the Jobs.

A model is calibrated (`tollway calibrate` in a Kubernetes Job, the tollway image) against its own
Service, so that the router routes it by measured quality and true token counts instead of the
borrowed `profile` columns. What is measured is identified by a revision: a hash of the model (its
name and `model` id, or its external endpoint), the calibration set (the built-in name, the
ConfigMap's content, or the URL), the judge, `maxTokens` and `calibration.revision`. One Job per
model per revision, named `<pool>-<model>-cal-<revision>` (the `<pool>-<model>` part shortened
when the name would pass 63 characters).

ModelPool `P`, for each calibrated model `M` at revision `R` (deployed models; `endpoint` models
only with `includeExternal`):
- the Job `P-M-cal-R` is desired while it exists (Jobs are created, never patched: a Job's pod
  template is immutable; a finished one stays until its TTL) or when `M` needs calibrating: no
  calibration of `R` is done yet (the pool's status remembers done revisions, so a Job removed by
  its TTL is not run again) and `M` has a ready replica (its Service answers);
- Jobs of other revisions, of removed models or of a pool with calibration disabled are pruned
  (a running one is stopped).

The Job's container runs `tollway calibrate` with the pool model as its only backend, its journal
on an emptyDir (`restartPolicy: OnFailure` restarts the container in the same pod, so a retry
resumes from the journal and sends nothing twice), `--push` to the router of every RoutingPolicy
over the pool (with that policy's bearer token from its `router.authSecret`, mounted), and
`--summary-file /dev/termination-log` for the pool's status.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tollway_operator.api import DEFAULT_TOLLWAY_IMAGE, ModelPoolSpec, ModelSpec, SecretKeyRef
from tollway_operator.desired.names import (
    COMPONENT_CALIBRATION,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_POOL,
    MANAGED_BY,
    Owner,
    child_metadata,
    common_labels,
    env_name,
    model_child_name,
    router_endpoint,
)
from tollway_operator.desired.pool import model_endpoint

LABEL_REVISION = "tollway.io/calibration-revision"
WORK_DIR = "/var/lib/tollway-calibration"
SET_DIR = "/etc/tollway/calibration-set"
PUSH_TOKEN_DIR = "/etc/tollway/push"
TERMINATION_LOG = "/dev/termination-log"
CALIBRATION_UID = 65532
MAX_JOB_NAME = 63
"""The Job controller copies the Job's name into a label value of its pods (<= 63 characters)."""
BACKOFF_LIMIT = 6
ACTIVE_DEADLINE_SECONDS = 24 * 3600
TTL_SECONDS_AFTER_FINISHED = 24 * 3600
"""A finished Job goes after a day: a done revision is remembered in the pool's status, a failed
one is then tried again (or at once, when someone deletes the Job)."""
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def calibration_labels(pool: str, model: str, revision: str) -> dict[str, str]:
    return {
        **common_labels(),
        LABEL_COMPONENT: COMPONENT_CALIBRATION,
        LABEL_POOL: pool,
        LABEL_MODEL: model,
        LABEL_REVISION: revision,
    }


def calibration_selector(pool: str) -> str:
    """Label selector of a pool's calibration Jobs (and of their pods)."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT_CALIBRATION},{LABEL_POOL}={pool}"


def calibrated_models(spec: ModelPoolSpec) -> list[ModelSpec]:
    """The models the operator calibrates (none when calibration is disabled)."""
    settings = spec.calibration
    if not settings.enabled:
        return []
    return [m for m in spec.models if m.endpoint is None or settings.include_external]


def _served_identity(model: ModelSpec) -> list[Any]:
    if model.endpoint is not None:
        return ["endpoint", model.endpoint.url, model.endpoint.upstream_model or model.name]
    return ["model", model.model]


def calibration_revision(spec: ModelPoolSpec, model: ModelSpec, dataset_digest: str | None = None) -> str:
    """What is calibrated, as 8 hex digits: the model, the set (`dataset_digest`: the content of a
    ConfigMap set), the judge, maxTokens and `calibration.revision`."""
    settings = spec.calibration
    judge = settings.judge
    judge_identity: list[Any] | None = None
    if judge is not None and judge.model is not None:
        judged_by = spec.model(judge.model)
        judge_identity = ["pool", judge.model, *(_served_identity(judged_by) if judged_by else [])]
    elif judge is not None:
        judge_identity = ["url", judge.url, judge.upstream_model]
    ident = {
        "name": model.name,
        "serves": _served_identity(model),
        "set": settings.dataset.identity(),
        "setDigest": dataset_digest,
        "judge": judge_identity,
        "maxTokens": settings.max_tokens,
        "revision": settings.revision,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def calibration_job_name(pool: str, model: str, revision: str) -> str:
    suffix = f"-cal-{revision}"
    base = model_child_name(pool, model)[: MAX_JOB_NAME - len(suffix)].rstrip("-")
    return base + suffix


@dataclass(frozen=True)
class RouterTarget:
    """A RoutingPolicy over the pool: where its router takes calibrations, and its bearer token."""

    policy: str
    url: str
    auth_secret: SecretKeyRef | None = None

    @classmethod
    def for_policy(cls, policy: str, namespace: str, auth_secret: SecretKeyRef | None) -> RouterTarget:
        return cls(policy, router_endpoint(policy, namespace), auth_secret)


@dataclass(frozen=True)
class ModelCalibration:
    """One calibrated model's revision and Job, and why it has no Job (when it has none)."""

    model: str
    revision: str
    job: str
    waiting: str | None = None
    """Why no Job is created now (the model has no ready replica, the set is missing), None otherwise."""
    waiting_reason: str = ""
    done: bool = False
    """The pool's status says this revision is calibrated."""


@dataclass
class CalibrationPlan:
    models: list[ModelCalibration] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def model(self, name: str) -> ModelCalibration | None:
        return next((m for m in self.models if m.model == name), None)

    @property
    def revisions(self) -> dict[str, str]:
        return {m.model: m.revision for m in self.models}


def _judge_args(
    spec: ModelPoolSpec, model: ModelSpec, pool: str, namespace: str
) -> tuple[list[str], list[dict]]:
    judge = spec.calibration.judge
    if judge is None:
        return [], []
    env: list[dict[str, Any]] = []
    if judge.model is not None:
        judged_by = spec.model(judge.model)
        assert judged_by is not None  # the spec's validator checks it
        name = judged_by.name
        args = ["--judge", f"{name}={model_endpoint(pool, namespace, judged_by)}"]
        args += _upstream_args(judged_by, name)
        key_ref = spec.backend_key_secret_for(judged_by)
    else:
        name = "judge" if model.name != "judge" else "judge-2"
        args = ["--judge", f"{name}={judge.url}", "--upstream-model", f"{name}={judge.upstream_model}"]
        key_ref = judge.api_key_secret
    if key_ref is not None and judge.model != model.name:
        var = f"TOLLWAY_JUDGE_{env_name(name)}_API_KEY"
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": key_ref.name, "key": key_ref.key}}})
        args += ["--api-key-env", f"{name}={var}"]
    return args, env


def _upstream_args(model: ModelSpec, name: str) -> list[str]:
    if model.endpoint is not None and model.endpoint.upstream_model:
        return ["--upstream-model", f"{name}={model.endpoint.upstream_model}"]
    return []


def calibration_job(
    owner: Owner,
    spec: ModelPoolSpec,
    model: ModelSpec,
    revision: str,
    targets: Sequence[RouterTarget],
) -> dict[str, Any]:
    """The Job that calibrates one model at one revision and pushes the result to `targets`."""
    pool, namespace = owner.name, owner.namespace
    settings = spec.calibration
    source = settings.dataset
    mounts: list[dict[str, Any]] = [
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if source.config_map is not None:
        dataset = f"{SET_DIR}/{source.config_map.key}"
        mounts.append({"name": "calibration-set", "mountPath": SET_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "calibration-set",
                "configMap": {
                    "name": source.config_map.name,
                    "items": [{"key": source.config_map.key, "path": source.config_map.key}],
                },
            }
        )
    else:
        dataset = source.builtin or str(source.url)
    price = model.cost
    args = [
        "tollway", "calibrate",
        "--dataset", dataset,
        "--backend", f"{model.name}={model_endpoint(pool, namespace, model)}",
        "--revision", f"{model.name}={revision}",
        "--price", f"{model.name}={price.input_per_million_tokens:g},{price.output_per_million_tokens:g}",
        "--concurrency", str(settings.concurrency),
        "--max-tokens", str(settings.max_tokens),
        "--out", f"{WORK_DIR}/history.jsonl",
        "--summary-file", TERMINATION_LOG,
        "--no-progress",
    ]  # fmt: skip
    args += _upstream_args(model, model.name)
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TOLLWAY_CACHE_DIR", "value": f"{WORK_DIR}/cache"},
    ]
    ref = spec.backend_key_secret_for(model)
    if ref is not None:
        var = f"TOLLWAY_BACKEND_{env_name(model.name)}_API_KEY"
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
        args += ["--api-key-env", f"{model.name}={var}"]
    judge_args, judge_env = _judge_args(spec, model, pool, namespace)
    args += judge_args
    env += judge_env
    for i, target in enumerate(sorted(targets, key=lambda t: t.policy)):
        args += ["--push", f"{target.policy}={target.url}"]
        if target.auth_secret is not None:
            directory = f"{PUSH_TOKEN_DIR}/{target.policy}"
            mounts.append({"name": f"push-token-{i}", "mountPath": directory, "readOnly": True})
            volumes.append(
                {
                    "name": f"push-token-{i}",
                    "secret": {
                        "secretName": target.auth_secret.name,
                        "items": [{"key": target.auth_secret.key, "path": "token"}],
                    },
                }
            )
            args += ["--push-token-file", f"{target.policy}={directory}/token"]
    labels = calibration_labels(pool, model.name, revision)
    container: dict[str, Any] = {
        "name": "calibrate",
        "image": settings.image or DEFAULT_TOLLWAY_IMAGE,
        "command": args,
        "env": env,
        "volumeMounts": mounts,
        "resources": json.loads(json.dumps(settings.resources or DEFAULT_RESOURCES)),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": CALIBRATION_UID,
            "runAsGroup": CALIBRATION_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": CALIBRATION_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(calibration_job_name(pool, model.name, revision), owner, labels),
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def calibration_plan(
    owner: Owner,
    spec: ModelPoolSpec,
    *,
    ready_replicas: Mapping[str, int],
    done: Mapping[str, str],
    live_jobs: Collection[str],
    targets: Sequence[RouterTarget],
    dataset_digest: str | None = None,
    set_missing: str | None = None,
) -> CalibrationPlan:
    """The calibration Jobs a pool should own (see the module docstring).

    `ready_replicas`: model -> ready replicas of its Deployment; `done`: model -> the revision the
    pool's status says is calibrated; `live_jobs`: names of the pool's calibration Jobs that exist;
    `targets`: the routers of the RoutingPolicies over the pool; `dataset_digest`: the content hash
    of a ConfigMap calibration set; `set_missing`: why the set cannot be read (no Job starts).
    """
    plan = CalibrationPlan()
    for model in calibrated_models(spec):
        revision = calibration_revision(spec, model, dataset_digest)
        job = calibration_job_name(owner.name, model.name, revision)
        is_done = done.get(model.name) == revision
        waiting, reason = None, ""
        if job not in live_jobs and not is_done:
            if set_missing is not None:
                waiting, reason = set_missing, "CalibrationSetMissing"
            elif model.endpoint is None and ready_replicas.get(model.name, 0) < 1:
                waiting = f"waiting for a ready replica of {model.name} (its Service must answer)"
                reason = "WaitingForModel"
        plan.models.append(ModelCalibration(model.name, revision, job, waiting, reason, is_done))
        if job in live_jobs or (not is_done and waiting is None):
            plan.jobs.append(calibration_job(owner, spec, model, revision, targets))
    return plan
