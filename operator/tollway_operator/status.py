"""Status: pure functions from observed children to the status a custom resource reports.

Conditions follow the Kubernetes conventions (type, status "True"/"False"/"Unknown", a CamelCase
reason, a human message, lastTransitionTime, observedGeneration); `lastTransitionTime` changes
only when a condition's status changes.

ModelPool conditions
- Ready: every model is available (a deployed model has >= 1 ready replica or is scaled to zero
  on purpose; external endpoints always count). Reasons: AllModelsAvailable, ModelsUnavailable
  (the message names each unavailable model and, when its pods cannot be scheduled, the
  scheduler's reason), InvalidSpec, ReconcileFailed.
- Progressing: some Deployment has not reached its desired replicas or has not observed its latest
  spec yet. Reasons: RollingOut, Stable (InvalidSpec when nothing can progress).
- Degraded: the pool serves, but not fully: a model's pods cannot start or run (the pod-level
  cause: Unschedulable, ImagePullBackOff, CreateContainerConfigError naming the missing Secret,
  CrashLoopBackOff with how the last run ended; also `status.models[].reason/message`) or its
  rollout exceeded its deadline, some models are unavailable while others are available, or the
  autoscaler reports `healthy: false` (`status.autoscaling`; its reason and message are carried
  over). Reasons: RolloutStuck, ModelsUnavailable, the autoscaler's reason (AutoscalerUnhealthy
  if it gives none), AsExpected.
- CacheSizeApplied (only with cache claims): every claim has its model's `cache.size`. Reasons:
  AsRequested, Resizing, CannotShrink, ExpansionRefused.

RoutingPolicy conditions
- Ready: the router has >= 1 ready replica with a config built from an existing, valid pool.
  Reasons: RouterReady, RouterNotReady, PoolNotFound, PoolInvalid, UnknownModels, InvalidSpec, ...
- Progressing: the router Deployment is rolling out. Reasons: RollingOut, Stable.
- Degraded: some backends have no ready replica (the router degrades their traffic), or the
  router runs below its desired replicas. Reasons: BackendsUnavailable, RouterPartiallyReady,
  AsExpected.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tollway_operator.api import ModelPoolSpec
from tollway_operator.desired import (
    LABEL_MODEL,
    CalibrationPlan,
    ClaimResize,
    ModelCalibration,
    deployed_models,
    model_child_name,
    model_endpoint,
    router_endpoint,
    router_selector_text,
)

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None, new: Sequence[Cond], now: str, generation: int | None
) -> list[dict[str, Any]]:
    """New conditions as wire dicts; `lastTransitionTime` is kept from `previous` when the
    condition's status did not change. Conditions of other types in `previous` are kept as they
    are (someone else may own them)."""
    before = {c.get("type"): c for c in previous or []}
    out: list[dict[str, Any]] = []
    for cond in new:
        old = before.get(cond.type)
        changed = old is None or old.get("status") != cond.status_text
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message[:1000],
            "lastTransitionTime": now
            if changed or not old.get("lastTransitionTime")
            else old["lastTransitionTime"],
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    mine = {c.type for c in new}
    out += [dict(c) for c in previous or [] if c.get("type") not in mine]
    return out


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


# ---------------------------------------------------------------------------------------------
# Observed Deployments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentView:
    """What the status builders need from a live Deployment."""

    name: str
    desired: int
    ready: int
    updated: int
    observed_generation: int
    generation: int
    deadline_exceeded: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> DeploymentView:
        meta = obj.get("metadata", {})
        spec = obj.get("spec", {})
        status = obj.get("status") or {}
        progressing = find_condition(status.get("conditions"), "Progressing") or {}
        return cls(
            name=meta.get("name", ""),
            desired=int(spec.get("replicas", 1)),
            ready=int(status.get("readyReplicas", 0) or 0),
            updated=int(status.get("updatedReplicas", 0) or 0),
            observed_generation=int(status.get("observedGeneration", 0) or 0),
            generation=int(meta.get("generation", 0) or 0),
            deadline_exceeded=progressing.get("reason") == "ProgressDeadlineExceeded",
        )

    @property
    def rolling(self) -> bool:
        return (
            self.observed_generation < self.generation
            or self.ready != self.desired
            or self.updated < self.desired
        )

    @property
    def available(self) -> bool:
        return self.ready > 0 or self.desired == 0


def _names(items: Sequence[str]) -> str:
    return ", ".join(items)


@dataclass(frozen=True)
class PodProblem:
    """Why a model's pod cannot start or keep running, as Kubernetes says it on the pod."""

    reason: str
    message: str = ""

    @property
    def text(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


CONTAINER_PROBLEMS = (
    "CreateContainerConfigError",  # e.g. secret "hf-token" not found
    "CreateContainerError",
    "InvalidImageName",
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "ErrImagePull",
    "CrashLoopBackOff",
    "RunContainerError",
)
"""Waiting reasons of a container that will not get better by itself, most telling first."""


def _container_problem(status: Mapping[str, Any]) -> PodProblem | None:
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    if reason not in CONTAINER_PROBLEMS:
        return None
    message = str(waiting.get("message") or "").strip()
    if reason == "CrashLoopBackOff":
        last = (status.get("lastState") or {}).get("terminated") or {}
        if last:
            ended = f"last exit: {last.get('reason') or 'Error'} (exit code {last.get('exitCode', '?')})"
            detail = str(last.get("message") or "").strip()
            message = "; ".join(x for x in (message, ended, detail[-300:]) if x)
    return PodProblem(reason, message)


def pod_problem(pod: Mapping[str, Any]) -> PodProblem | None:
    """What keeps one pod from running: the scheduler's `PodScheduled=False` (reason and message,
    e.g. "Unschedulable: 0/3 nodes are available: 2 Insufficient nvidia.com/gpu, ..."), else a
    container waiting for a reason that will not pass by itself (`CONTAINER_PROBLEMS`, with the
    kubelet's message; for CrashLoopBackOff also how the last run ended)."""
    status = pod.get("status") or {}
    scheduled = find_condition(status.get("conditions"), "PodScheduled") or {}
    if scheduled.get("status") == "False":
        return PodProblem(
            str(scheduled.get("reason") or "NotScheduled"), str(scheduled.get("message") or "").strip()
        )
    found = [
        problem
        for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        if (problem := _container_problem(c)) is not None
    ]
    found.sort(key=lambda p: CONTAINER_PROBLEMS.index(p.reason))
    return found[0] if found else None


def pod_problems(pods: Iterable[Mapping[str, Any]]) -> dict[str, PodProblem]:
    """Why models' pods cannot start or keep running, by model (the pods' `tollway.io/model`
    label): one per model, the newest pod's (a rollout's new pod tells what goes wrong now)."""
    out: dict[str, PodProblem] = {}
    ordered = sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True)
    for pod in ordered:
        model = (pod.get("metadata", {}).get("labels") or {}).get(LABEL_MODEL)
        if not model or model in out or pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        problem = pod_problem(pod)
        if problem is not None:
            out[model] = problem
    return out


CACHE_SIZE = "CacheSizeApplied"


def cache_size_condition(
    plan: Sequence[ClaimResize], refused: Mapping[str, str], resizing: Sequence[str] = ()
) -> Cond:
    """Whether every cache claim has the size `cache.size` asks for. `plan`: the claims whose
    request differs (`desired.cache_resize_plan`); `refused`: claim -> the API server's answer to
    an expansion; `resizing`: claims whose expansion the storage has not finished."""
    shrink = [r for r in plan if r.action == "cannot-shrink"]
    if shrink:
        detail = "; ".join(
            f"{r.model}: claim {r.claim} has {r.current}, cache.size asks {r.wanted}" for r in shrink
        )
        return Cond(
            CACHE_SIZE,
            False,
            "CannotShrink",
            f"{detail}. A claim cannot shrink: set cache.size back, or delete the claim (and its pod) to get a new one.",
        )
    if refused:
        detail = "; ".join(f"claim {claim}: {answer}" for claim, answer in sorted(refused.items()))
        return Cond(
            CACHE_SIZE,
            False,
            "ExpansionRefused",
            f"{detail}. Expanding a claim needs a StorageClass with allowVolumeExpansion: true.",
        )
    if resizing:
        return Cond(CACHE_SIZE, False, "Resizing", f"the storage is expanding {_names(list(resizing))}")
    return Cond(CACHE_SIZE, True, "AsRequested", "every cache claim has the size of its model's cache.size")


# ---------------------------------------------------------------------------------------------
# ModelPool
# ---------------------------------------------------------------------------------------------


def pool_status(
    name: str,
    namespace: str,
    spec: ModelPoolSpec,
    deployments: Mapping[str, Mapping[str, Any]],
    autoscaling: Mapping[str, Any] | None,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
    problems: Mapping[str, PodProblem] | None = None,
    cache: Cond | None = None,
) -> dict[str, Any]:
    """The ModelPool status patch (without `autoscaling`, which only the autoscaler writes).

    `deployments`: live workloads (Deployments or StatefulSets) by name (`<pool>-<model>`);
    `problems`: why a model's pods cannot start or run, by model name (`pod_problems`): in the
    model's status entry, the Ready condition and, for a model not fully rolled out, Degraded
    (RolloutStuck at once, not after the rollout's deadline); `cache`: the CacheSizeApplied
    condition (None: the pool has no cache claims, and the condition goes).
    """
    problems = problems or {}
    previous = previous or {}
    models: list[dict[str, Any]] = []
    unavailable: list[str] = []
    missing: list[str] = []
    rolling: list[str] = []
    stuck: list[str] = []
    deployed = {m.name for m in deployed_models(spec)}
    for model in spec.models:
        entry: dict[str, Any] = {"name": model.name, "endpoint": model_endpoint(name, namespace, model)}
        if model.name not in deployed:
            entry.update(desiredReplicas=0, readyReplicas=0)
            models.append(entry)
            continue
        obj = deployments.get(model_child_name(name, model.name))
        if obj is None:
            entry.update(desiredReplicas=0, readyReplicas=0)
            missing.append(model.name)
            unavailable.append(model.name)
            models.append(entry)
            continue
        view = DeploymentView.from_object(obj)
        entry.update(desiredReplicas=view.desired, readyReplicas=view.ready)
        problem = problems.get(model.name)
        if problem is not None:
            entry.update(reason=problem.reason, message=problem.message[:1000])
        models.append(entry)
        if not view.available:
            unavailable.append(model.name)
        if view.rolling:
            rolling.append(f"{model.name} {view.ready}/{view.desired} ready")
        if problem is not None and (view.rolling or not view.available):
            stuck.append(f"{model.name} ({problem.text})")
        elif view.deadline_exceeded:
            stuck.append(f"{model.name} (exceeded its progress deadline)")
    total = len(spec.models)
    available = total - len(unavailable)
    conds: list[Cond] = []
    if unavailable:
        named = [f"{m} ({problems[m].text})" if m in problems else m for m in unavailable]
        detail = f"not available: {_names(named)}" + (
            f" (no Deployment yet: {_names(missing)})" if missing else ""
        )
        conds.append(
            Cond(READY, False, "ModelsUnavailable", f"{available}/{total} models available; {detail}")
        )
    else:
        conds.append(Cond(READY, True, "AllModelsAvailable", f"{total}/{total} models available"))
    if rolling or missing:
        conds.append(
            Cond(PROGRESSING, True, "RollingOut", _names(rolling + [f"{m} being created" for m in missing]))
        )
    else:
        conds.append(Cond(PROGRESSING, False, "Stable", "every model has its desired replicas"))
    auto = autoscaling or {}
    if stuck:
        conds.append(Cond(DEGRADED, True, "RolloutStuck", f"pods cannot start or run: {_names(stuck)}"))
    elif unavailable and available > 0:
        conds.append(
            Cond(
                DEGRADED,
                True,
                "ModelsUnavailable",
                f"serving without {_names(unavailable)}; the router sends their traffic elsewhere",
            )
        )
    elif auto and auto.get("healthy") is False:
        conds.append(
            Cond(
                DEGRADED,
                True,
                auto.get("reason") or "AutoscalerUnhealthy",
                auto.get("message") or "the autoscaler reports unhealthy",
            )
        )
    else:
        conds.append(Cond(DEGRADED, False, "AsExpected", ""))
    before = previous.get("conditions") or []
    if cache is not None:
        conds.append(cache)
    else:
        before = [c for c in before if c.get("type") != CACHE_SIZE]
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(before, conds, now, generation),
        "models": models,
        "summary": f"{available}/{total} ready",
    }


def invalid_status(
    previous: Mapping[str, Any] | None,
    message: str,
    generation: int | None,
    now: str,
    reason: str = "InvalidSpec",
) -> dict[str, Any]:
    """Status of an object whose spec cannot be acted on."""
    previous = previous or {}
    conds = [
        Cond(READY, False, reason, message),
        Cond(PROGRESSING, False, reason, "nothing is reconciled until the spec is fixed"),
        Cond(DEGRADED, True, reason, message),
    ]
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions"), conds, now, generation),
    }


def failed_status(
    previous: Mapping[str, Any] | None, reason: str, message: str, generation: int | None, now: str
) -> dict[str, Any]:
    """Status after a reconcile that could not complete (API errors, ...): Ready is kept as it was
    observed before, Degraded tells why."""
    previous = previous or {}
    old_ready = find_condition(previous.get("conditions"), READY)
    ready = (
        Cond(READY, None, reason, message)
        if old_ready is None
        else Cond(
            READY,
            {"True": True, "False": False}.get(str(old_ready.get("status"))),
            str(old_ready.get("reason") or reason),
            str(old_ready.get("message") or ""),
        )
    )
    conds = [ready, Cond(DEGRADED, True, reason, message)]
    return {"conditions": merge_conditions(previous.get("conditions"), conds, now, generation)}


# ---------------------------------------------------------------------------------------------
# RoutingPolicy
# ---------------------------------------------------------------------------------------------


def policy_status(
    name: str,
    namespace: str,
    router: Mapping[str, Any] | None,
    backends_ready: Mapping[str, int],
    budgets: Mapping[str, int],
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
    notes: Sequence[str] = (),
    scaled_to_zero: Collection[str] = (),
) -> dict[str, Any]:
    """Status of a policy whose children were applied. `router`: the live router Deployment;
    `scaled_to_zero`: models whose Deployment asks for 0 replicas on purpose (not a degradation:
    the autoscaler wakes them on demand)."""
    previous = previous or {}
    view = DeploymentView.from_object(router) if router is not None else None
    conds: list[Cond] = []
    if view is None:
        conds.append(Cond(READY, False, "RouterNotReady", "the router Deployment does not exist yet"))
    elif view.ready > 0:
        conds.append(
            Cond(
                READY,
                True,
                "RouterReady",
                f"{view.ready}/{view.desired} router replicas ready; endpoint {router_endpoint(name, namespace)}",
            )
        )
    else:
        conds.append(Cond(READY, False, "RouterNotReady", f"0/{view.desired} router replicas ready"))
    if view is None or view.rolling:
        detail = (
            "being created" if view is None else f"{view.ready}/{view.desired} ready, {view.updated} updated"
        )
        conds.append(Cond(PROGRESSING, True, "RollingOut", f"router {detail}"))
    else:
        conds.append(Cond(PROGRESSING, False, "Stable", "the router runs its desired replicas"))
    down = sorted(m for m, n in backends_ready.items() if n <= 0 and m not in scaled_to_zero)
    asleep = sorted(m for m, n in backends_ready.items() if n <= 0 and m in scaled_to_zero)
    if asleep:
        notes = [*notes, f"scaled to zero: {_names(asleep)}"]
    if down:
        conds.append(
            Cond(
                DEGRADED,
                True,
                "BackendsUnavailable",
                f"no ready replica for {_names(down)}; the router degrades their traffic"
                + (f"; {'; '.join(notes)}" if notes else ""),
            )
        )
    elif view is not None and 0 < view.ready < view.desired:
        conds.append(
            Cond(DEGRADED, True, "RouterPartiallyReady", f"{view.ready}/{view.desired} router replicas ready")
        )
    else:
        conds.append(Cond(DEGRADED, False, "AsExpected", "; ".join(notes)))
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions"), conds, now, generation),
        "endpoint": router_endpoint(name, namespace),
        "routerReplicas": view.ready if view is not None else 0,
        "routerSelector": router_selector_text(name),
        "budgets": dict(budgets),
    }


def waiting_policy_status(
    previous: Mapping[str, Any] | None, reason: str, message: str, generation: int | None, now: str
) -> dict[str, Any]:
    """A policy that cannot be reconciled until something else changes (its pool appears, the
    pool gains the models it names, ...). Its children, if any, are left as they were."""
    previous = previous or {}
    conds = [
        Cond(READY, False, reason, message),
        Cond(PROGRESSING, False, reason, "waiting; rechecked when the pool changes and periodically"),
        Cond(DEGRADED, True, reason, message),
    ]
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(previous.get("conditions"), conds, now, generation),
    }


# ---------------------------------------------------------------------------------------------
# ModelPool calibration (status.calibration)
# ---------------------------------------------------------------------------------------------

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def termination_message(pods: Sequence[Mapping[str, Any]], job: str) -> str | None:
    """The newest termination message of a Job's pods: the last finished container, or the
    previous attempt of a container that was restarted."""
    mine = [
        p
        for p in pods
        if any((p.get("metadata", {}).get("labels") or {}).get(k) == job for k in JOB_NAME_LABELS)
    ]
    mine.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True)
    for pod in mine:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            for key in ("state", "lastState"):
                message = ((container.get(key) or {}).get("terminated") or {}).get("message")
                if message:
                    return str(message)
    return None


def parse_summary(message: str | None, model: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the model's entry of a `tollway calibrate --summary-file`, the run's error or pushes) from a
    termination message; a message that is not such JSON (the log tail) comes back as the error."""
    if not message:
        return None, None
    try:
        doc = json.loads(message)
    except ValueError:
        return None, message.strip()[-500:]
    if not isinstance(doc, dict):
        return None, message.strip()[-500:]
    entry = (doc.get("models") or {}).get(model)
    if isinstance(entry, dict):
        entry = {**entry, "pushes": [p for p in doc.get("pushes") or [] if p.get("model") == model]}
    return entry, doc.get("error")


def _summary_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    tasks = {
        str(task): {"queries": int(t.get("graded") or 0), "meanScore": t.get("meanScore")}
        for task, t in (entry.get("tasks") or {}).items()
    }
    return {
        "queries": entry.get("graded"),
        "lines": entry.get("lines"),
        "failed": entry.get("failed"),
        "meanScore": entry.get("meanScore"),
        "tokens": entry.get("tokens"),
        "tasks": tasks,
        "routers": sorted({str(p["router"]) for p in entry.get("pushes") or [] if p.get("ok")}),
    }


def _failed_pushes(entry: Mapping[str, Any]) -> str:
    bad = [f"{p.get('router')}: {p.get('detail', '')}" for p in entry.get("pushes") or [] if not p.get("ok")]
    return "; ".join(bad)


def _done_message(fields: Mapping[str, Any]) -> str:
    """A Done entry's message, from its summary fields."""
    score = fields.get("meanScore")
    message = f"{fields.get('queries', '?')}/{fields.get('lines', '?')} lines graded" + (
        f", mean score {score:.3f}" if isinstance(score, int | float) else ""
    )
    routers = fields.get("routers") or []
    return message + (f"; in the router of {', '.join(routers)}" if routers else "; pushed to no router")


def model_calibration_status(
    calibration: ModelCalibration,
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One model's calibration state (without lastTransitionTime). `calibration`: its
    `desired.calibration.ModelCalibration`; `job`: its Job (None: none exists); `previous`: its
    entry in the status before."""
    base: dict[str, Any] = {
        "name": calibration.model,
        "revision": calibration.revision,
        "job": calibration.job,
    }
    same = previous is not None and previous.get("revision") == calibration.revision
    if job is None:
        if calibration.done and same:
            return {**dict(previous), **base, "job": previous.get("job") if previous else None}
        if calibration.waiting:
            return {
                **base,
                "job": None,
                "state": "Pending",
                "reason": calibration.waiting_reason or "Waiting",
                "message": calibration.waiting,
            }
        return {
            **base,
            "state": "Pending",
            "reason": "JobCreating",
            "message": "the calibration Job is being created",
        }
    entry, error = parse_summary(termination_message(pods, calibration.job), calibration.model)
    fields = _summary_fields(entry) if entry is not None else {}
    complete = _job_condition(job, "Complete")
    failed = _job_condition(job, "Failed")
    active = int((job.get("status") or {}).get("active") or 0)
    if complete is not None:
        return {**base, **fields, "state": "Done", "reason": "Calibrated", "message": _done_message(fields)}
    if failed is not None:
        detail = error or (_failed_pushes(entry) if entry else "") or str(failed.get("message") or "")
        reason = str(failed.get("reason") or "JobFailed")
        message = f"the calibration Job failed ({reason})" + (f": {detail}" if detail else "")
        message += f"; delete Job {calibration.job} to try again"
        return {**base, **fields, "state": "Failed", "reason": "JobFailed", "message": message[:1000]}
    if active > 0:
        message = "calibrating"
        if entry is not None or error:  # a container attempt ended; the Job restarts it
            detail = error or _failed_pushes(entry or {}) or f"{fields.get('failed', 0)} line(s) failed"
            message = f"calibrating; the last attempt ended unfinished ({detail}), retrying from its journal"
        return {**base, **fields, "state": "Running", "reason": "JobRunning", "message": message[:1000]}
    return {
        **base,
        "state": "Pending",
        "reason": "JobPending",
        "message": "the calibration Job's pod has not started",
    }


def _with_missing_routers(entry: dict[str, Any], policies: Collection[str] | None) -> dict[str, Any]:
    """A Done entry names the policies over the pool whose router lacks its results (`policies`:
    the policies over the pool now; None: not known, the entry stays as it was)."""
    if entry.get("state") != "Done" or policies is None:
        return entry
    message = _done_message(entry)
    missing = sorted(set(policies) - set(entry.get("routers") or []))
    entry = {k: v for k, v in entry.items() if k != "missingRouters"}
    if missing:
        entry["missingRouters"] = missing
        message += (
            f"; not in the router of {', '.join(missing)} (created after it, or the push failed): it routes "
            "this model by its profile until the next revision (spec.calibration.revision)"
        )
    entry["message"] = message[:1000]
    return entry


def calibration_status(
    plan: CalibrationPlan,
    jobs: Mapping[str, Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any] | None,
    now: str,
    policies: Collection[str] | None = None,
) -> dict[str, Any]:
    """`status.calibration` of a pool: one entry per calibrated model (its state, revision, Job,
    lines graded, mean score overall and per task, tokens, routers that took it, policies whose
    router did not) and a summary. `plan`: the `desired.calibration.CalibrationPlan`; `jobs`: live
    Jobs by name; `pods`: the pool's calibration pods; `previous`: `status.calibration` before;
    `policies`: the RoutingPolicies over the pool now (None: not known)."""
    before = {m.get("name"): m for m in (previous or {}).get("models") or []}
    models = []
    for calibration in plan.models:
        old = before.get(calibration.model)
        entry = model_calibration_status(calibration, jobs.get(calibration.job), pods, old)
        entry = _with_missing_routers(entry, policies)
        unchanged = (
            old is not None
            and old.get("state") == entry["state"]
            and old.get("revision") == entry["revision"]
        )
        entry["lastTransitionTime"] = old.get("lastTransitionTime") if unchanged and old else now
        models.append(entry)
    done = sum(m["state"] == "Done" for m in models)
    return {"summary": f"{done}/{len(models)} calibrated" if models else "disabled", "models": models}


def calibration_events(
    previous: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events for models whose calibration became Done or Failed."""
    before = {m.get("name"): m for m in (previous or {}).get("models") or []}
    out = []
    for m in new.get("models") or []:
        old = before.get(m["name"]) or {}
        if old.get("state") == m["state"] and old.get("revision") == m["revision"]:
            continue
        if m["state"] == "Done":
            out.append(("Normal", "Calibrated", f"{m['name']} (revision {m['revision']}): {m['message']}"))
        elif m["state"] == "Failed":
            out.append(
                ("Warning", "CalibrationFailed", f"{m['name']} (revision {m['revision']}): {m['message']}")
            )
    return out
