"""Status builders: conditions tell the truth about observed children."""

from __future__ import annotations

from typing import Any

from tollway_operator import status as s
from tollway_operator.api import parse_model_pool

SPEC = parse_model_pool(
    {
        "models": [
            {"name": "small", "model": "a/s"},
            {"name": "large", "model": "a/l"},
            {"name": "ext", "endpoint": {"url": "https://x.example"}},
        ]
    }
)
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def dep(
    name: str,
    replicas: int,
    ready: int,
    generation: int = 1,
    observed: int = 1,
    reason: str = "NewReplicaSetAvailable",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "replicas": replicas,
        "updatedReplicas": replicas,
    }
    if ready:
        status["readyReplicas"] = ready
    status["conditions"] = [{"type": "Progressing", "status": "True", "reason": reason}]
    return {
        "metadata": {"name": name, "generation": generation},
        "spec": {"replicas": replicas},
        "status": status,
    }


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    found = s.find_condition(st["conditions"], type_)
    assert found is not None
    return dict(found)


def pool_status(
    deps: dict[str, Any],
    autoscaling: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    now: str = T0,
) -> dict[str, Any]:
    return s.pool_status("chat", "ml", SPEC, deps, autoscaling, previous, 3, now)


def test_all_available() -> None:
    st = pool_status({"chat-small": dep("chat-small", 2, 2), "chat-large": dep("chat-large", 1, 1)})
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True",
        "AllModelsAvailable",
        3,
    )
    assert cond(st, "Progressing")["status"] == "False"
    assert cond(st, "Degraded")["status"] == "False"
    assert st["observedGeneration"] == 3
    assert st["summary"] == "3/3 ready"
    models = {m["name"]: m for m in st["models"]}
    assert models["small"] == {
        "name": "small",
        "endpoint": "http://chat-small.ml.svc.cluster.local:8000",
        "desiredReplicas": 2,
        "readyReplicas": 2,
    }
    assert models["ext"]["endpoint"] == "https://x.example"
    assert "autoscaling" not in st  # the autoscaler's subtree is never written here


def test_initial_rollout_is_progressing_not_degraded() -> None:
    spec = parse_model_pool(
        {"models": [{"name": "small", "model": "a/s"}, {"name": "large", "model": "a/l"}]}
    )
    st = s.pool_status(
        "chat",
        "ml",
        spec,
        {"chat-small": dep("chat-small", 1, 0), "chat-large": dep("chat-large", 1, 0)},
        None,
        None,
        3,
        T0,
    )
    assert cond(st, "Ready")["status"] == "False" and cond(st, "Ready")["reason"] == "ModelsUnavailable"
    assert "small" in cond(st, "Ready")["message"] and "large" in cond(st, "Ready")["message"]
    assert cond(st, "Progressing")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "False"
    # With an external model serving meanwhile, the pool is up but degraded.
    st = pool_status({"chat-small": dep("chat-small", 1, 0), "chat-large": dep("chat-large", 1, 0)})
    assert cond(st, "Degraded")["status"] == "True"


def test_partially_available_is_degraded() -> None:
    st = pool_status({"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 0)})
    degraded = cond(st, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelsUnavailable")
    assert "large" in degraded["message"] and "small" not in degraded["message"]
    assert st["summary"] == "2/3 ready"


def test_missing_deployment_counts_as_unavailable() -> None:
    st = pool_status({"chat-small": dep("chat-small", 1, 1)})
    assert cond(st, "Ready")["status"] == "False"
    assert "no Deployment yet: large" in cond(st, "Ready")["message"]
    assert cond(st, "Progressing")["status"] == "True"


def test_scaled_to_zero_is_available() -> None:
    st = pool_status({"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 0, 0)})
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "False"


def test_stuck_rollout() -> None:
    st = pool_status(
        {
            "chat-small": dep("chat-small", 1, 1),
            "chat-large": dep("chat-large", 1, 1, 2, 2, reason="ProgressDeadlineExceeded"),
        }
    )
    assert cond(st, "Degraded")["reason"] == "RolloutStuck"


def test_new_generation_not_yet_observed_is_progressing() -> None:
    st = pool_status(
        {
            "chat-small": dep("chat-small", 1, 1, generation=2, observed=1),
            "chat-large": dep("chat-large", 1, 1),
        }
    )
    assert cond(st, "Progressing")["status"] == "True"
    assert cond(st, "Ready")["status"] == "True"


def test_autoscaler_health_drives_degraded() -> None:
    deps = {"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 1)}
    st = pool_status(
        deps, {"healthy": False, "reason": "PrometheusUnavailable", "message": "connection refused"}
    )
    degraded = cond(st, "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "PrometheusUnavailable",
        "connection refused",
    )
    st = pool_status(deps, {"healthy": False})
    assert cond(st, "Degraded")["reason"] == "AutoscalerUnhealthy"
    assert cond(pool_status(deps, {"healthy": True}), "Degraded")["status"] == "False"


def test_last_transition_time_is_kept_while_status_holds() -> None:
    deps = {"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 0)}
    first = pool_status(deps, now=T0)
    second = pool_status({**deps, "chat-small": dep("chat-small", 2, 1)}, previous=first, now=T1)
    assert cond(second, "Ready")["lastTransitionTime"] == T0  # still False
    deps["chat-large"] = dep("chat-large", 1, 1)
    third = pool_status(deps, previous=second, now=T1)
    assert cond(third, "Ready")["status"] == "True" and cond(third, "Ready")["lastTransitionTime"] == T1


def test_foreign_conditions_are_preserved() -> None:
    previous = {
        "conditions": [{"type": "Scaling", "status": "True", "reason": "X", "lastTransitionTime": T0}]
    }
    st = pool_status(
        {"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 1)}, previous=previous
    )
    assert cond(st, "Scaling")["reason"] == "X"


def test_invalid_status() -> None:
    st = s.invalid_status(None, "spec.models[0].replicas: min (3) must be <= max (2)", 4, T0)
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.models[0].replicas" in ready["message"]
    assert cond(st, "Degraded")["status"] == "True" and st["observedGeneration"] == 4


def test_policy_status_ready_and_degraded_backends() -> None:
    router = dep("chat-auto-router", 2, 2)
    st = s.policy_status("chat-auto", "ml", router, {"small": 1, "large": 0}, {"small": 10}, None, 1, T0)
    assert cond(st, "Ready")["status"] == "True"
    assert (cond(st, "Degraded")["status"], cond(st, "Degraded")["reason"]) == ("True", "BackendsUnavailable")
    assert "large" in cond(st, "Degraded")["message"]
    assert (
        st["endpoint"] == "http://chat-auto.ml.svc/v1"
        and st["routerReplicas"] == 2
        and st["budgets"] == {"small": 10}
    )
    # What the scale subresource's labelSelectorPath points at: an HPA finds the router pods by it.
    assert (
        st["routerSelector"] == "app.kubernetes.io/instance=chat-auto,app.kubernetes.io/name=tollway-router"
    )


def test_policy_status_scaled_to_zero_backend_is_not_degraded() -> None:
    st = s.policy_status(
        "p", "ml", dep("p-router", 1, 1), {"small": 1, "large": 0}, {}, None, 1, T0, scaled_to_zero={"large"}
    )
    assert cond(st, "Degraded")["status"] == "False"
    assert "scaled to zero: large" in cond(st, "Degraded")["message"]


def test_policy_status_router_not_ready_and_partial() -> None:
    st = s.policy_status("p", "ml", dep("p-router", 2, 0), {"a": 1}, {}, None, 1, T0)
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("False", "RouterNotReady")
    assert cond(st, "Progressing")["status"] == "True"
    st = s.policy_status("p", "ml", dep("p-router", 3, 1), {"a": 1}, {}, None, 1, T0)
    assert cond(st, "Degraded")["reason"] == "RouterPartiallyReady"
    st = s.policy_status("p", "ml", None, {"a": 1}, {}, None, 1, T0)
    assert cond(st, "Ready")["status"] == "False" and st["routerReplicas"] == 0


def test_waiting_policy_status() -> None:
    st = s.waiting_policy_status(None, "PoolNotFound", "ModelPool 'chat' does not exist", 2, T0)
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("False", "PoolNotFound")
    assert cond(st, "Progressing")["status"] == "False"


def test_failed_status_keeps_ready_as_observed() -> None:
    previous = pool_status({"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 1)})
    st = s.failed_status(previous, "ReconcileFailed", "503 ServiceUnavailable", 3, T1)
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Ready")["lastTransitionTime"] == T0
    assert (cond(st, "Degraded")["status"], cond(st, "Degraded")["reason"]) == ("True", "ReconcileFailed")
    assert cond(s.failed_status(None, "ReconcileFailed", "x", 1, T0), "Ready")["status"] == "Unknown"


def pod(model: str, scheduled: dict[str, Any] | None) -> dict[str, Any]:
    conditions = [{"type": "PodScheduled", **scheduled}] if scheduled else []
    return {
        "metadata": {"name": f"chat-{model}-x", "labels": {"tollway.io/model": model}},
        "status": {"conditions": conditions},
    }


def test_pods_the_scheduler_cannot_place_are_named_in_ready() -> None:
    unschedulable = {
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint.",
    }
    problems = s.pod_problems(
        [
            pod("large", unschedulable),
            pod("large", unschedulable),
            pod("small", {"status": "True"}),
            pod("x", None),
        ]
    )
    assert problems == {"large": s.PodProblem("Unschedulable", unschedulable["message"])}
    st = s.pool_status(
        "chat",
        "ml",
        SPEC,
        {"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 0)},
        None,
        None,
        3,
        T0,
        problems,
    )
    ready = cond(st, "Ready")
    assert ready["reason"] == "ModelsUnavailable"
    assert f"not available: large (Unschedulable: {unschedulable['message']})" in ready["message"]
    assert cond(st, "Degraded")["reason"] == "RolloutStuck"  # at once, not after the rollout's deadline
    large = next(m for m in st["models"] if m["name"] == "large")
    assert (large["reason"], large["message"]) == ("Unschedulable", unschedulable["message"])


def container_pod(model: str, created: str = "2026-01-01T00:00:00Z", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"chat-{model}-{created}",
            "labels": {"tollway.io/model": model},
            "creationTimestamp": created,
        },
        "status": {"conditions": [{"type": "PodScheduled", "status": "True"}], **status},
    }


def waiting(reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": "vllm", "state": {"waiting": {"reason": reason, "message": message}}, **extra}


def test_image_pull_errors_are_the_pool_s_cause() -> None:
    pod = container_pod(
        "large",
        containerStatuses=[waiting("ImagePullBackOff", 'Back-off pulling image "vllm/vllm-openai:v9"')],
    )
    assert s.pod_problems([pod]) == {
        "large": s.PodProblem("ImagePullBackOff", 'Back-off pulling image "vllm/vllm-openai:v9"')
    }
    pulling = container_pod("large", containerStatuses=[waiting("ErrImagePull", "manifest unknown")])
    assert s.pod_problems([pulling])["large"].reason == "ErrImagePull"


def test_a_missing_secret_is_named() -> None:
    pod = container_pod(
        "small", containerStatuses=[waiting("CreateContainerConfigError", 'secret "hf-token" not found')]
    )
    problems = s.pod_problems([pod])
    st = s.pool_status(
        "chat", "ml", SPEC, {"chat-small": dep("chat-small", 1, 0), "chat-large": dep("chat-large", 1, 1)},
        None, None, 3, T0, problems,
    )  # fmt: skip
    assert 'secret "hf-token" not found' in cond(st, "Ready")["message"]
    degraded = cond(st, "Degraded")
    assert (
        degraded["reason"] == "RolloutStuck"
        and 'small (CreateContainerConfigError: secret "hf-token" not found)' in degraded["message"]
    )


def test_crash_loops_carry_how_the_last_run_ended() -> None:
    pod = container_pod(
        "large",
        containerStatuses=[
            waiting(
                "CrashLoopBackOff",
                "back-off 5m0s restarting failed container=vllm",
                lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}},
            )
        ],
    )
    problem = s.pod_problems([pod])["large"]
    assert problem.reason == "CrashLoopBackOff"
    assert "last exit: OOMKilled (exit code 137)" in problem.message


def test_the_newest_pod_speaks_for_its_model_and_healthy_pods_say_nothing() -> None:
    old = container_pod(
        "large", "2026-01-01T00:00:00Z", containerStatuses=[waiting("ImagePullBackOff", "old tag")]
    )
    new = container_pod(
        "large", "2026-01-01T00:10:00Z", containerStatuses=[waiting("CrashLoopBackOff", "new")]
    )
    assert s.pod_problems([old, new])["large"].reason == "CrashLoopBackOff"
    starting = container_pod("small", containerStatuses=[waiting("ContainerCreating")])
    running = container_pod("small", containerStatuses=[{"name": "vllm", "state": {"running": {}}}])
    assert s.pod_problems([starting, running]) == {}


def test_a_stuck_rollout_behind_ready_replicas_is_degraded_at_once() -> None:
    """A new image that cannot be pulled while the old replica still serves: Ready stays True,
    Degraded says why the rollout cannot finish."""
    problems = {"large": s.PodProblem("ImagePullBackOff", 'Back-off pulling image "x"')}
    rolling = dep("chat-large", 1, 1, generation=2, observed=2)
    rolling["status"]["updatedReplicas"] = 0
    st = s.pool_status(
        "chat",
        "ml",
        SPEC,
        {"chat-small": dep("chat-small", 1, 1), "chat-large": rolling},
        None,
        None,
        3,
        T0,
        problems,
    )
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["reason"] == "RolloutStuck"
    assert "ImagePullBackOff" in cond(st, "Degraded")["message"]


def test_cache_size_condition() -> None:
    from tollway_operator import desired as d

    ok = s.cache_size_condition([], {})
    assert (ok.status, ok.reason) == (True, "AsRequested")
    shrink = s.cache_size_condition(
        [d.ClaimResize("a", "model-cache-chat-a-0", "200Gi", "100Gi", "cannot-shrink")], {}
    )
    assert (shrink.status, shrink.reason) == (False, "CannotShrink")
    assert "model-cache-chat-a-0 has 200Gi, cache.size asks 100Gi" in shrink.message
    refused = s.cache_size_condition(
        [], {"chat-b-cache": "Forbidden: only dynamically provisioned pvc can be resized"}
    )
    assert (refused.status, refused.reason) == (
        False,
        "ExpansionRefused",
    ) and "allowVolumeExpansion" in refused.message
    assert s.cache_size_condition([], {}, ["model-cache-chat-a-0"]).reason == "Resizing"


def test_cache_condition_is_dropped_when_the_pool_has_no_claims() -> None:
    deps = {"chat-small": dep("chat-small", 1, 1), "chat-large": dep("chat-large", 1, 1)}
    with_cache = s.pool_status(
        "chat", "ml", SPEC, deps, None, None, 3, T0, None, s.cache_size_condition([], {})
    )
    assert cond(with_cache, "CacheSizeApplied")["status"] == "True"
    without = s.pool_status("chat", "ml", SPEC, deps, None, with_cache, 3, T1)
    assert s.find_condition(without["conditions"], "CacheSizeApplied") is None
