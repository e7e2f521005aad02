"""Desired calibration of a ModelPool: which models get a Job, its name and revision, what it runs,
and the status built from the Jobs and their pods' termination messages."""

from __future__ import annotations

import json
from typing import Any

from tollway_operator import desired as d
from tollway_operator import status
from tollway_operator.api import CalibrationStatus, SecretKeyRef, parse_model_pool
from tollway_operator.desired.calibration import MAX_JOB_NAME, TERMINATION_LOG

OWNER = d.Owner(kind="ModelPool", name="chat", namespace="ml", uid="uid-1")
SMALL = {"name": "small", "model": "org/small-7b", "cost": {"inputPerMillionTokens": 0.2}}
LARGE = {"name": "large", "model": "org/large-70b"}
EXTERNAL = {
    "name": "ext",
    "endpoint": {"url": "https://api.example.com", "upstreamModel": "gpt-x", "apiKeySecret": {"name": "k"}},
}
ALL_READY = {"small": 1, "large": 1}
POLICY = d.RouterTarget.for_policy("chat-auto", "ml", SecretKeyRef(name="router-auth", key="tokens"))


def pool(*models: dict[str, Any], **calibration: Any) -> Any:
    return parse_model_pool({"models": list(models or (SMALL, LARGE)), "calibration": calibration})


def plan(spec: Any, **over: Any) -> d.CalibrationPlan:
    kwargs: dict[str, Any] = {
        "ready_replicas": ALL_READY,
        "done": {},
        "live_jobs": set(),
        "targets": [POLICY],
    }
    return d.calibration_plan(OWNER, spec, **(kwargs | over))


def jobs(p: d.CalibrationPlan) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["labels"]["tollway.io/model"]: j for j in p.jobs}


def command(job: dict[str, Any]) -> list[str]:
    return job["spec"]["template"]["spec"]["containers"][0]["command"]


def arg(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


# --- which models, which revision, which name -----------------------------------------------------------


def test_every_ready_deployed_model_gets_one_job_named_by_its_revision() -> None:
    spec = pool(SMALL, LARGE, EXTERNAL)
    p = plan(spec)
    assert set(jobs(p)) == {"small", "large"}  # the external endpoint bills per token: opt-in
    small = p.model("small")
    assert small is not None and len(small.revision) == 8
    assert small.job == f"chat-small-cal-{small.revision}" == jobs(p)["small"]["metadata"]["name"]
    assert jobs(p)["small"]["metadata"]["labels"]["tollway.io/calibration-revision"] == small.revision
    assert p.revisions == {"small": small.revision, "large": p.model("large").revision}  # type: ignore[union-attr]
    with_external = plan(pool(SMALL, LARGE, EXTERNAL, includeExternal=True))
    assert set(jobs(with_external)) == {"small", "large", "ext"}


def test_a_model_without_a_ready_replica_waits_and_gets_no_job() -> None:
    p = plan(pool(), ready_replicas={"small": 1, "large": 0})
    assert set(jobs(p)) == {"small"}
    large = p.model("large")
    assert (
        large is not None
        and large.waiting_reason == "WaitingForModel"
        and "ready replica" in str(large.waiting)
    )


def test_adding_a_model_creates_a_job_for_that_model_only() -> None:
    before = plan(pool(SMALL))
    done = {"small": before.model("small").revision}  # type: ignore[union-attr]
    after = plan(pool(SMALL, LARGE), done=done)
    assert set(jobs(after)) == {"large"}
    assert after.model("small").revision == before.model("small").revision  # type: ignore[union-attr]


def test_changing_a_models_weights_changes_its_revision_only() -> None:
    base = plan(pool())
    changed = plan(pool({**SMALL, "model": "org/small-7b-v2"}, LARGE))
    assert changed.model("small").revision != base.model("small").revision  # type: ignore[union-attr]
    assert changed.model("large").revision == base.model("large").revision  # type: ignore[union-attr]
    # A change that is not what is measured (replicas, price) keeps the revision.
    same = plan(
        pool({**SMALL, "replicas": {"min": 2, "max": 4}, "cost": {"inputPerMillionTokens": 9}}, LARGE)
    )
    assert same.revisions == base.revisions


def test_the_set_judge_max_tokens_and_revision_text_change_every_revision() -> None:
    base = plan(pool()).revisions
    for calibration in (
        {"dataset": {"builtin": "builtin:code"}, "judge": {"model": "large"}},
        {"dataset": {"url": "https://example.com/set.jsonl"}},
        {"maxTokens": 64},
        {"revision": "again"},
    ):
        other = plan(pool(**calibration)).revisions
        assert other["small"] != base["small"] and other["large"] != base["large"], calibration
    cm = pool(dataset={"configMap": {"name": "set", "key": "set.jsonl"}})
    assert plan(cm, dataset_digest="aaaa").revisions != plan(cm, dataset_digest="bbbb").revisions


def test_a_done_revision_needs_no_job_and_a_live_job_is_kept_whatever_its_state() -> None:
    first = plan(pool())
    revisions = first.revisions
    done = plan(pool(), done=revisions)
    assert done.jobs == [] and all(m.done for m in done.models)
    live = {first.model("small").job}  # type: ignore[union-attr]
    kept = plan(pool(), done=revisions, live_jobs=live)  # done, Job not yet gone (TTL): keep it
    assert set(jobs(kept)) == {"small"}
    stale = plan(pool(), done={"small": "0ld0ld00"}, ready_replicas={})
    assert stale.jobs == []  # a stale done revision is no reason to skip; no ready replica is


def test_disabled_calibration_wants_no_job() -> None:
    p = plan(pool(enabled=False))
    assert p.jobs == [] and p.models == []


def test_a_missing_configmap_set_holds_every_new_job() -> None:
    spec = pool(dataset={"configMap": {"name": "set", "key": "set.jsonl"}})
    p = plan(spec, set_missing="calibration set ConfigMap 'set' not found")
    assert p.jobs == []
    assert {m.waiting_reason for m in p.models} == {"CalibrationSetMissing"}


def test_long_names_are_shortened_to_a_label_value() -> None:
    owner = d.Owner(kind="ModelPool", name="p" * 40, namespace="ml", uid="u")
    spec = parse_model_pool({"models": [{"name": "m" * 22, "model": "x"}]})
    p = d.calibration_plan(owner, spec, ready_replicas={"m" * 22: 1}, done={}, live_jobs=set(), targets=[])
    name = p.jobs[0]["metadata"]["name"]
    assert len(name) <= MAX_JOB_NAME and name.endswith(f"-cal-{p.models[0].revision}")


# --- what the Job runs ------------------------------------------------------------------------------


def test_the_job_calibrates_one_model_through_its_service_and_pushes_to_the_routers() -> None:
    job = jobs(plan(pool(concurrency=2, priorityClassName="batch-low")))["small"]
    revision = job["metadata"]["labels"]["tollway.io/calibration-revision"]
    args = command(job)
    assert args[:2] == ["tollway", "calibrate"]
    assert arg(args, "--backend") == ["small=http://chat-small.ml.svc.cluster.local:8000"]
    assert arg(args, "--dataset") == ["builtin"] and arg(args, "--concurrency") == ["2"]
    assert arg(args, "--revision") == [f"small={revision}"] and arg(args, "--price") == ["small=0.2,0"]
    assert arg(args, "--summary-file") == [TERMINATION_LOG] and "--no-progress" in args
    assert arg(args, "--push") == ["chat-auto=http://chat-auto.ml.svc/v1"]
    assert arg(args, "--push-token-file") == ["chat-auto=/etc/tollway/push/chat-auto/token"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"  # a retry restarts the container: the journal stays
    assert pod["priorityClassName"] == "batch-low" and pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"] == {"name": "work", "emptyDir": {}}
    assert volumes["push-token-0"]["secret"] == {
        "secretName": "router-auth",
        "items": [{"key": "tokens", "path": "token"}],
    }
    container = pod["containers"][0]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_sets_judges_and_external_keys_reach_the_command() -> None:
    spec = pool(
        SMALL,
        EXTERNAL,
        includeExternal=True,
        dataset={"configMap": {"name": "my-set", "key": "lines.jsonl"}},
        judge={"url": "https://judge.example.com", "upstreamModel": "gpt-4o", "apiKeySecret": {"name": "jk"}},
    )
    ext = jobs(plan(spec, targets=[d.RouterTarget.for_policy("open", "ml", None)]))["ext"]
    args = command(ext)
    assert arg(args, "--dataset") == ["/etc/tollway/calibration-set/lines.jsonl"]
    assert arg(args, "--backend") == ["ext=https://api.example.com"]
    assert arg(args, "--upstream-model") == ["ext=gpt-x", "judge=gpt-4o"]
    assert arg(args, "--judge") == ["judge=https://judge.example.com"]
    assert arg(args, "--api-key-env") == [
        "ext=TOLLWAY_BACKEND_EXT_API_KEY",
        "judge=TOLLWAY_JUDGE_JUDGE_API_KEY",
    ]
    assert arg(args, "--push-token-file") == []  # a policy without auth needs no token
    env = {e["name"]: e.get("valueFrom") for e in ext["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOLLWAY_JUDGE_JUDGE_API_KEY"] == {"secretKeyRef": {"name": "jk", "key": "token"}}
    volumes = {v["name"]: v for v in ext["spec"]["template"]["spec"]["volumes"]}
    assert volumes["calibration-set"]["configMap"]["name"] == "my-set"
    pool_judge = pool(dataset={"builtin": "builtin:code"}, judge={"model": "large"})
    assert arg(command(jobs(plan(pool_judge))["small"]), "--judge") == [
        "large=http://chat-large.ml.svc.cluster.local:8000"
    ]


def test_the_router_expects_the_current_revision_without_a_rollout() -> None:
    from tollway_operator.api import parse_routing_policy

    spec = pool()
    policy = parse_routing_policy({"poolRef": {"name": "chat"}})
    owner = d.Owner(kind="RoutingPolicy", name="chat-auto", namespace="ml", uid="u2")
    a = d.policy_children(owner, policy, "chat", spec, ALL_READY, calibration_revisions={"small": "aaaa0000"})
    b = d.policy_children(owner, policy, "chat", spec, ALL_READY, calibration_revisions={"small": "bbbb1111"})
    assert a.config.backend("small").calibration_revision == "aaaa0000"  # type: ignore[union-attr]
    assert a.config.backend("large").calibration_revision is None  # type: ignore[union-attr]
    checksum = d.CHECKSUM_ANNOTATION
    template = lambda p: next(  # noqa: E731
        c for c in p.children if c["kind"] == "Deployment"
    )["spec"]["template"]["metadata"]["annotations"][checksum]
    assert template(a) == template(b)  # a hot reload, not a rollout


# --- status from Jobs and termination messages -------------------------------------------------------


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def summary(model: str, revision: str, *, ok: bool = True, failed: int = 0) -> str:
    return json.dumps(
        {
            "exit": 0 if ok and not failed else 1,
            "seconds": 12.5,
            "models": {
                model: {
                    "revision": revision,
                    "lines": 10,
                    "graded": 10 - failed,
                    "failed": failed,
                    "meanScore": 0.7,
                    "tokens": 4200,
                    "judgeTokens": 0,
                    "tasks": {
                        "arc": {"graded": 6, "meanScore": 0.5},
                        "wino": {"graded": 4 - failed, "meanScore": 1.0},
                    },
                }
            },
            "pushes": [
                {
                    "router": "chat-auto",
                    "model": model,
                    "ok": ok,
                    "inUse": ok,
                    "detail": "" if ok else "HTTP 401",
                }
            ],
        }
    )


def job_obj(name: str, *, complete: bool = False, failed: bool = False, active: int = 0) -> dict[str, Any]:
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True"})
    if failed:
        conditions.append({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    return {"metadata": {"name": name}, "status": {"conditions": conditions, "active": active}}


def pod_obj(job: str, message: str, *, restarted: bool = False) -> dict[str, Any]:
    terminated = {"terminated": {"exitCode": 0, "message": message}}
    container = (
        {"name": "calibrate", "lastState": terminated, "state": {"running": {}}}
        if restarted
        else {
            "name": "calibrate",
            "state": terminated,
        }
    )
    return {
        "metadata": {
            "name": f"{job}-abcde",
            "labels": {"batch.kubernetes.io/job-name": job},
            "creationTimestamp": "t",
        },
        "status": {"containerStatuses": [container]},
    }


def test_status_follows_the_job_from_pending_to_done_with_the_summary() -> None:
    p = plan(pool(SMALL))
    small = p.model("small")
    assert small is not None
    rev, name = small.revision, small.job
    pending = status.calibration_status(p, {name: job_obj(name)}, [], None, "t0")
    assert pending["models"][0]["state"] == "Pending" and pending["summary"] == "0/1 calibrated"
    running = status.calibration_status(p, {name: job_obj(name, active=1)}, [], pending, "t1")
    assert running["models"][0]["state"] == "Running" and running["models"][0]["lastTransitionTime"] == "t1"
    done_jobs = {name: job_obj(name, complete=True)}
    done = status.calibration_status(p, done_jobs, [pod_obj(name, summary("small", rev))], running, "t2")
    entry = done["models"][0]
    assert entry["state"] == "Done" and done["summary"] == "1/1 calibrated"
    assert entry["queries"] == 10 and entry["meanScore"] == 0.7 and entry["tokens"] == 4200
    assert entry["tasks"] == {
        "arc": {"queries": 6, "meanScore": 0.5},
        "wino": {"queries": 4, "meanScore": 1.0},
    }
    assert entry["routers"] == ["chat-auto"] and "10/10 lines graded, mean score 0.700" in entry["message"]
    for doc in (pending, running, done):  # every field is in the CRD's status schema (a server prunes others)
        wire = CalibrationStatus.model_validate(doc).to_wire()  # unknown fields would raise
        assert [
            {k: m[k] for k in without_none(d)} for m, d in zip(wire["models"], doc["models"], strict=True)
        ] == [without_none(d) for d in doc["models"]]
    assert status.calibration_events(running, done) == [
        ("Normal", "Calibrated", f"small (revision {rev}): {entry['message']}")
    ]
    # The Job goes (TTL): the status remembers, and no Job is wanted again.
    later_plan = plan(pool(SMALL), done={"small": rev})
    later = status.calibration_status(later_plan, {}, [], done, "t3")
    assert later["models"][0] == entry and later_plan.jobs == []
    assert status.calibration_events(done, later) == []


def test_a_policy_without_the_results_is_named_in_the_status() -> None:
    """A RoutingPolicy created after the calibration (or whose push failed) routes the model by its
    profile: the Done entry says which, and stops saying so once no such policy is over the pool."""
    p = plan(pool(SMALL))
    small = p.model("small")
    assert small is not None
    name = small.job
    done_jobs = {name: job_obj(name, complete=True)}
    pods = [pod_obj(name, summary("small", small.revision))]
    done = status.calibration_status(p, done_jobs, pods, None, "t1", policies=["chat-auto"])
    assert "missingRouters" not in done["models"][0]
    late = status.calibration_status(p, done_jobs, pods, done, "t2", policies=["chat-auto", "late"])
    entry = late["models"][0]
    assert entry["missingRouters"] == ["late"] and entry["routers"] == ["chat-auto"]
    assert (
        entry["message"].count("not in the router of late") == 1
        and "calibration.revision" in entry["message"]
    )
    assert entry["lastTransitionTime"] == "t1"  # still Done: no transition, no second Event
    assert status.calibration_events(done, late) == []
    wire = CalibrationStatus.model_validate(late).to_wire()  # the field is in the CRD's status schema
    assert wire["models"][0]["missingRouters"] == ["late"]
    # The Job gone (TTL), the late policy deleted: the entry is as it was.
    later_plan = plan(pool(SMALL), done={"small": small.revision})
    later = status.calibration_status(later_plan, {}, [], late, "t3", policies=["chat-auto"])
    assert later["models"][0] == done["models"][0]
    unknown = status.calibration_status(later_plan, {}, [], late, "t3", policies=None)
    assert unknown["models"][0] == entry  # no index yet: nothing is claimed either way


def test_a_restarted_attempt_and_a_failed_job_say_why() -> None:
    p = plan(pool(SMALL))
    small = p.model("small")
    assert small is not None
    name = small.job
    retrying = status.calibration_status(
        p,
        {name: job_obj(name, active=1)},
        [pod_obj(name, summary("small", small.revision, ok=False), restarted=True)],
        None,
        "t",
    )
    entry = retrying["models"][0]
    assert entry["state"] == "Running" and "chat-auto: HTTP 401" in entry["message"]
    logs = "Traceback ...\nValueError: boom"
    failed = status.calibration_status(
        p, {name: job_obj(name, failed=True)}, [pod_obj(name, logs)], retrying, "t"
    )
    entry = failed["models"][0]
    assert (
        entry["state"] == "Failed"
        and "BackoffLimitExceeded" in entry["message"]
        and "boom" in entry["message"]
    )
    assert f"delete Job {name} to try again" in entry["message"]
    assert status.calibration_events(retrying, failed)[0][:2] == ("Warning", "CalibrationFailed")
    waiting = plan(pool(SMALL), ready_replicas={})
    pending = status.calibration_status(waiting, {}, [], None, "t")
    assert pending["models"][0]["reason"] == "WaitingForModel" and pending["models"][0]["job"] is None
    no_set = plan(
        pool(SMALL, dataset={"configMap": {"name": "s", "key": "k"}}), set_missing="ConfigMap 's' not found"
    )
    pending = status.calibration_status(no_set, {}, [], None, "t")["models"][0]
    assert pending["reason"] == "CalibrationSetMissing" and pending["message"] == "ConfigMap 's' not found"


def test_a_pool_api_key_reaches_the_calibration_of_its_models_and_judge() -> None:
    spec = parse_model_pool(
        {
            "apiKeySecret": {"name": "vllm-key"},
            "models": [SMALL, LARGE],
            "calibration": {"dataset": {"builtin": "builtin:code"}, "judge": {"model": "large"}},
        }
    )
    small = jobs(plan(spec))["small"]
    args = command(small)
    assert arg(args, "--api-key-env") == [
        "small=TOLLWAY_BACKEND_SMALL_API_KEY",
        "large=TOLLWAY_JUDGE_LARGE_API_KEY",
    ]
    env = {e["name"]: e.get("valueFrom") for e in small["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOLLWAY_BACKEND_SMALL_API_KEY"] == {"secretKeyRef": {"name": "vllm-key", "key": "token"}}
    assert env["TOLLWAY_JUDGE_LARGE_API_KEY"] == {"secretKeyRef": {"name": "vllm-key", "key": "token"}}
