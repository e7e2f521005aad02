"""Desired state of a ModelPool: every spec field that reaches a manifest."""

from __future__ import annotations

from typing import Any

import pytest

from tollway_operator import desired as d
from tollway_operator.api import SpecError, parse_model_pool

OWNER = d.Owner(kind="ModelPool", name="chat", namespace="ml", uid="uid-1")


def pool(**overrides: Any) -> Any:
    model = {"name": "small", "model": "org/small-7b"} | overrides.pop("model", {})
    spec = {"models": [model]} | overrides
    return parse_model_pool(spec)


def deployment(spec: Any, live: int | None = None, model: int = 0) -> dict[str, Any]:
    return d.model_workload(OWNER, spec, spec.models[model], live, simulate=spec.simulated())


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_names_labels_and_owner_reference() -> None:
    dep = deployment(pool())
    meta = dep["metadata"]
    assert meta["name"] == "chat-small" and meta["namespace"] == "ml"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "chat-small",
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/part-of": "tollway",
        "app.kubernetes.io/managed-by": "tollway-operator",
        "tollway.io/pool": "chat",
        "tollway.io/model": "small",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "tollway.io/v1alpha1",
            "kind": "ModelPool",
            "name": "chat",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "chat-small",
    }
    assert dep["spec"]["template"]["metadata"]["labels"]["tollway.io/model"] == "small"


def test_vllm_command_line_from_model_fields() -> None:
    spec = pool(
        model={
            "gpus": 4,
            "maxModelLen": 8192,
            "gpuMemoryUtilization": 0.92,
            "extraArgs": ["--enable-prefix-caching", "--seed", "7"],
        }
    )
    args = container(deployment(spec))["args"]
    assert arg(args, "--model") == "org/small-7b"
    assert arg(args, "--served-model-name") == "small"
    assert arg(args, "--tensor-parallel-size") == "4"
    assert arg(args, "--max-model-len") == "8192"
    assert arg(args, "--gpu-memory-utilization") == "0.92"
    assert arg(args, "--port") == "8000"
    assert args[-3:] == ["--enable-prefix-caching", "--seed", "7"]


def test_optional_vllm_flags_absent_when_unset() -> None:
    args = container(deployment(pool()))["args"]
    assert "--max-model-len" not in args and "--gpu-memory-utilization" not in args
    assert arg(args, "--tensor-parallel-size") == "1"


def test_image_defaults_to_pool_and_model_overrides() -> None:
    assert container(deployment(pool(image="reg/vllm:1")))["image"] == "reg/vllm:1"
    assert (
        container(deployment(pool(image="reg/vllm:1", model={"image": "reg/other:2"})))["image"]
        == "reg/other:2"
    )


def test_gpu_limits_are_strings_and_user_resources_replace_the_defaults() -> None:
    spec = pool(
        model={
            "gpus": 2,
            "resources": {
                "requests": {"cpu": "4", "memory": "32Gi"},
                "limits": {"memory": "64Gi", "nvidia.com/gpu": 8},
            },
        }
    )
    res = container(deployment(spec))["resources"]
    # /dev/shm (4Gi per GPU) is memory the pod uses: added to the user's request and limit.
    assert res["limits"] == {"memory": "72Gi", "nvidia.com/gpu": "2"}
    assert res["requests"] == {"cpu": "4", "memory": "40Gi"}


@pytest.mark.parametrize(
    ("gpus", "cpu", "memory"),
    [(1, "6", "20Gi"), (2, "8", "32Gi"), (4, "12", "56Gi"), (8, "20", "104Gi")],
)
def test_default_requests_by_gpu_count_keep_vllm_out_of_best_effort(gpus: int, cpu: str, memory: str) -> None:
    res = container(deployment(pool(model={"gpus": gpus})))["resources"]
    # CPU: 4 + 2 per GPU, requested, no limit (throttling slows the tokeniser); memory: 8Gi + 8Gi
    # per GPU plus /dev/shm (4Gi per GPU), requested and limited alike.
    assert res["requests"] == {"cpu": cpu, "memory": memory}
    assert res["limits"] == {"memory": memory, "nvidia.com/gpu": str(gpus)}
    volumes = {v["name"]: v for v in pod_spec(deployment(pool(model={"gpus": gpus})))["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{4 * gpus}Gi"}


def test_shm_added_to_a_memory_limit_given_alone() -> None:
    res = container(deployment(pool(model={"resources": {"limits": {"memory": "1500Mi"}}})))["resources"]
    assert res["limits"] == {"memory": "5596Mi", "nvidia.com/gpu": "1"}
    assert "requests" not in res


def test_port_probes_and_shm() -> None:
    dep = deployment(pool(model={"gpus": 2}))
    c = container(dep)
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert c[probe]["timeoutSeconds"] == 5  # the kubelet's default 1 s flaps under load
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod_spec(dep)["automountServiceAccountToken"] is False


def startup_seconds(workload: dict[str, Any]) -> int:
    probe = container(workload)["startupProbe"]
    return int(probe["periodSeconds"] * probe["failureThreshold"])


def test_startup_budget_by_size_fits_a_first_download_of_a_72b_model() -> None:
    # 72B parameters = 144 GB of bf16 weights; at a pessimistic 50 MB/s that is 48 minutes.
    large = deployment(pool(model={"sizeBillions": 72, "gpus": 4}))
    assert startup_seconds(large) >= 144e9 / 50e6 + 600
    assert startup_seconds(large) == 3480  # 58 min
    assert startup_seconds(deployment(pool(model={"sizeBillions": 7}))) == 900  # 15 min
    # Without a size hint: 40 GB of weights per GPU.
    assert startup_seconds(deployment(pool(model={"gpus": 4}))) == 3840  # 600 + 160 GB at 50 MB/s, in minutes
    # The Deployment's progress deadline follows (10 minutes after the startup budget).
    assert large["spec"]["progressDeadlineSeconds"] == 3480 + 600


def test_startup_budget_set_per_model() -> None:
    assert (
        startup_seconds(deployment(pool(model={"sizeBillions": 72, "startupTimeoutSeconds": 7200}))) == 7200
    )


def test_prestop_drains_and_grace_covers_the_router_upstream_timeout() -> None:
    from router_service.config import ServerConfig

    dep = deployment(pool())
    command = container(dep)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    settle, limit, port = float(command[3]), float(command[4]), int(command[5])
    upstream = ServerConfig().upstream_timeout_seconds
    assert (port, limit) == (8000, upstream)  # waits for in-flight requests, at most what a router waits
    grace = pod_spec(dep)["terminationGracePeriodSeconds"]
    assert grace >= settle + upstream + 5  # room to exit after the drain
    assert grace == 140


def test_cache_empty_dir() -> None:
    dep = deployment(pool(model={"cache": {"kind": "emptyDir", "size": "40Gi"}}))
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "40Gi"}}
    assert {"name": "model-cache", "mountPath": "/models"} in container(dep)["volumeMounts"]
    env = env_of(container(dep))
    assert env["HF_HOME"].startswith("/models/") and env["VLLM_CACHE_ROOT"].startswith("/models/")


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ({"sizeBillions": 7}, "20Gi"),  # 14 GB + 25%, at least 20Gi
        ({"sizeBillions": 72, "gpus": 4}, "170Gi"),  # 144 GB + 25% = 167.6 GiB, in 10 GiB steps
        ({"gpus": 2}, "100Gi"),  # no hint: 40 GB per GPU
        ({"sizeBillions": 72, "cache": {"kind": "emptyDir", "size": "300Gi"}}, "300Gi"),
    ],
)
def test_cache_size_by_model_size(model: dict[str, Any], size: str) -> None:
    volumes = {v["name"]: v for v in pod_spec(deployment(pool(model=model)))["volumes"]}
    assert volumes["model-cache"]["emptyDir"]["sizeLimit"] == size


def test_per_replica_claims_through_a_statefulset() -> None:
    spec = pool(
        model={"sizeBillions": 72, "gpus": 4, "cache": {"kind": "pvc", "storageClassName": "fast"}},
        autoscaling=AUTOSCALING,
    )
    children = d.pool_children(OWNER, spec)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("StatefulSet", "chat-small"),
        ("Service", "chat-small"),
    ]  # no shared claim: each replica gets its own from the template
    sts = children[0]
    assert sts["spec"]["serviceName"] == "chat-small"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "model-cache"
    assert template["metadata"]["labels"]["tollway.io/model"] == "small"  # found by the pool's selector
    assert template["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "170Gi"}},
        "storageClassName": "fast",
    }
    # Scale-down keeps the removed replicas' claims (a scale-up reuses them, weights included);
    # retention decides what happens when the model or pool goes (Retain by default).
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert "model-cache" not in {v["name"] for v in pod_spec(sts)["volumes"]}
    assert {"name": "model-cache", "mountPath": "/models"} in container(sts)["volumeMounts"]
    assert d.replica_claim_name("chat", "small", 1) == "model-cache-chat-small-1"


def test_retention_delete_goes_with_the_model() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "retention": "Delete"}})
    sts = deployment(spec)
    assert sts["kind"] == "StatefulSet"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Delete",
        "whenScaled": "Retain",
    }


def test_live_claim_template_is_kept_since_the_api_refuses_to_change_it() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "size": "500Gi", "storageClassName": "new"}})
    live = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "200Gi"}},
        "volumeMode": "Filesystem",
    }
    sts = d.model_workload(OWNER, spec, spec.models[0], 1, live_claim_template=live)
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "200Gi"}},
    }


def test_shared_read_write_many_claim_with_a_deployment() -> None:
    spec = pool(
        model={
            "sizeBillions": 7,
            "cache": {"kind": "pvc", "accessMode": "ReadWriteMany", "retention": "Delete"},
        }
    )
    children = d.pool_children(OWNER, spec)
    claim = next(c for c in children if c["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "chat-small-cache"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # Delete: collected with the pool
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}
    dep = next(c for c in children if c["kind"] == "Deployment")
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "chat-small-cache"}


def test_retained_shared_claim_has_no_owner() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "accessMode": "ReadWriteMany"}})
    claim = d.model_cache_claim(OWNER, spec.models[0])
    assert claim is not None and "ownerReferences" not in claim["metadata"]
    assert claim["metadata"]["labels"]["tollway.io/pool"] == "chat"


def test_cache_existing_claim_is_used_not_created() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "existingClaim": "weights"}})
    children = d.pool_children(OWNER, spec)
    assert not [c for c in children if c["kind"] == "PersistentVolumeClaim"]
    dep = next(c for c in children if c["kind"] == "Deployment")
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "weights"}


def test_hf_token_and_user_env() -> None:
    spec = pool(
        model={
            "hfTokenSecret": {"name": "hf", "key": "tok"},
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "HF_HOME", "value": "/x"}],
        }
    )
    env = env_of(container(deployment(spec)))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env["HF_HOME"] == "/x"  # the user's value wins, once
    assert [e["name"] for e in container(deployment(spec))["env"]].count("HF_HOME") == 1


def test_no_token_env_without_secret() -> None:
    assert "HF_TOKEN" not in env_of(container(deployment(pool())))


TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PREFER_H100 = {
    "nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 1,
                "preference": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
            }
        ]
    }
}


def test_pool_scheduling_defaults_are_inherited() -> None:
    spec = pool(
        scheduling={
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [TAINT],
            "affinity": PREFER_H100,
            "priorityClassName": "inference",
        }
    )
    pod = pod_spec(deployment(spec))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [TAINT]
    assert pod["affinity"] == PREFER_H100
    assert pod["priorityClassName"] == "inference"


def test_a_model_field_replaces_the_pool_s() -> None:
    spec = pool(
        scheduling={"nodeSelector": {"pool": "a"}, "tolerations": [TAINT], "priorityClassName": "inference"},
        model={
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [],
            "affinity": PREFER_H100,
            "priorityClassName": "x",
        },
    )
    pod = pod_spec(deployment(spec))
    assert pod["nodeSelector"] == {"gpu": "h100"}  # replaced, not merged
    assert "tolerations" not in pod  # an explicit empty list replaces too
    assert pod["affinity"] == PREFER_H100 and pod["priorityClassName"] == "x"
    bare = pod_spec(deployment(pool()))
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(bare)


def test_api_key_from_the_pool_or_the_model() -> None:
    spec = parse_model_pool(
        {
            "apiKeySecret": {"name": "vllm-key", "key": "key"},
            "models": [
                {"name": "a", "model": "x/a"},
                {"name": "b", "model": "x/b", "apiKeySecret": {"name": "b-key"}},
                {"name": "ext", "endpoint": {"url": "https://api.example.com"}},
            ],
        }
    )
    env_a = env_of(container(d.model_workload(OWNER, spec, spec.models[0])))
    env_b = env_of(container(d.model_workload(OWNER, spec, spec.models[1])))
    # vLLM reads --api-key from $VLLM_API_KEY: the key never shows in the pod's command line.
    assert env_a["VLLM_API_KEY"] == {"secretKeyRef": {"name": "vllm-key", "key": "key"}}
    assert env_b["VLLM_API_KEY"] == {"secretKeyRef": {"name": "b-key", "key": "token"}}
    assert all("key" not in arg for arg in container(d.model_workload(OWNER, spec, spec.models[0]))["args"])
    assert spec.api_key_secret_for(spec.models[2]) is None  # an external endpoint has its own
    assert "VLLM_API_KEY" not in env_of(container(deployment(pool())))


def test_vllm_runs_as_root_unless_run_as_user_is_set() -> None:
    root = deployment(pool())
    assert "runAsNonRoot" not in container(root)["securityContext"]  # vllm/vllm-openai's USER is root
    spec = pool(runAsUser=2000)
    dep = deployment(spec)
    c = container(dep)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "runAsGroup": 0,
    }
    env = env_of(c)
    assert env["HOME"] == "/home/vllm" and env["USER"] == "vllm" and c["workingDir"] == "/home/vllm"
    assert {"name": "home", "mountPath": "/home/vllm"} in c["volumeMounts"]
    assert pod_spec(dep)["securityContext"] == {
        "seccompProfile": {"type": "RuntimeDefault"},
        "fsGroup": 0,
        "fsGroupChangePolicy": "OnRootMismatch",
    }
    assert (
        container(deployment(pool(runAsUser=2000, model={"runAsUser": 3000})))["securityContext"]["runAsUser"]
        == 3000
    )


def test_service() -> None:
    svc = d.model_service(OWNER, pool().models[0])
    assert svc["metadata"]["name"] == "chat-small"
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "chat-small",
    }
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_external_endpoint_gets_no_children() -> None:
    spec = parse_model_pool(
        {
            "models": [
                {"name": "small", "model": "a/b"},
                {"name": "gpt", "endpoint": {"url": "https://api.example.com"}},
            ]
        }
    )
    names = {(c["kind"], c["metadata"]["name"]) for c in d.pool_children(OWNER, spec)}
    assert names == {("Deployment", "chat-small"), ("Service", "chat-small")}
    assert d.model_endpoint("chat", "ml", spec.models[1]) == "https://api.example.com"
    assert d.model_endpoint("chat", "ml", spec.models[0]) == "http://chat-small.ml.svc.cluster.local:8000"


AUTOSCALING = {"prometheusUrl": "http://prom:9090"}


@pytest.mark.parametrize(
    ("replicas", "autoscaling", "live", "expected"),
    [
        ({"min": 2, "max": 2}, None, None, 2),  # fixed pool
        ({"min": 2, "max": 4}, None, 3, 2),  # no autoscaler: the operator owns replicas
        ({"min": 0, "max": 2}, None, None, 1),  # nothing scales a min-0 model up: run one
        ({"min": 1, "max": 4}, AUTOSCALING, None, 1),  # new: start at min
        ({"min": 1, "max": 4}, AUTOSCALING, 3, 3),  # the autoscaler's value is kept
        ({"min": 1, "max": 4}, AUTOSCALING, 9, 4),  # ... clamped to max
        ({"min": 2, "max": 4}, AUTOSCALING, 1, 2),  # ... and to min
        ({"min": 0, "max": 2}, AUTOSCALING, None, 1),  # min 0 without scaleToZero: floor 1
        ({"min": 0, "max": 2}, AUTOSCALING | {"scaleToZero": True}, None, 0),
        ({"min": 0, "max": 2}, AUTOSCALING | {"scaleToZero": True}, 0, 0),
        ({"min": 1, "max": 4}, AUTOSCALING | {"enabled": False}, 3, 1),  # disabled: like none
        ({"min": 1, "max": 4}, AUTOSCALING | {"mode": "keda"}, None, 1),  # keda: created at the floor
        ({"min": 1, "max": 4}, AUTOSCALING | {"mode": "keda"}, 3, None),  # ... then left to KEDA
    ],
)
def test_replicas_and_the_autoscaling_contract(
    replicas: dict[str, int], autoscaling: dict[str, Any] | None, live: int | None, expected: int | None
) -> None:
    extra = {"autoscaling": autoscaling} if autoscaling else {}
    spec = pool(model={"replicas": replicas}, **extra)
    dep = deployment(spec, live)
    assert dep["spec"].get("replicas") == expected


def test_rollout_never_surges_gpu_pods() -> None:
    strategy = deployment(pool())["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_keda_scaled_objects_are_adopted() -> None:
    spec = pool(autoscaling=AUTOSCALING | {"mode": "keda"})
    so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "chat-small"},
        "spec": {"scaleTargetRef": {"name": "chat-small"}},
    }
    children = d.pool_children(OWNER, spec, {}, [so])
    adopted = next(c for c in children if c["kind"] == "ScaledObject")
    assert adopted["metadata"]["namespace"] == "ml"
    assert adopted["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert adopted["metadata"]["labels"]["tollway.io/pool"] == "chat"
    assert so["metadata"] == {"name": "chat-small"}  # the input is not mutated


def test_child_names_must_fit_service_names() -> None:
    long_owner = d.Owner(kind="ModelPool", name="p" * 60, namespace="ml", uid="u")
    with pytest.raises(SpecError, match=r"spec\.models\[0\]\.name.*63"):
        d.pool_children(long_owner, pool())
    digit_owner = d.Owner(kind="ModelPool", name="1pool", namespace="ml", uid="u")
    with pytest.raises(SpecError, match=r"metadata\.name"):
        d.pool_children(digit_owner, pool())


def test_statefulset_names_leave_room_for_the_revision_label() -> None:
    owner = d.Owner(kind="ModelPool", name="p" * 46, namespace="ml", uid="u")  # + "-small" = 52
    per_replica = pool(model={"cache": {"kind": "pvc"}})
    assert d.pool_children(owner, per_replica)[0]["kind"] == "StatefulSet"
    longer = d.Owner(kind="ModelPool", name="p" * 47, namespace="ml", uid="u")
    with pytest.raises(SpecError, match=r"spec\.models\[0\]\.name.*StatefulSet.*52"):
        d.pool_children(longer, per_replica)
    assert d.pool_children(longer, pool())[0]["kind"] == "Deployment"  # no such limit


SIMULATED = {"simulate": {"enabled": True, "image": "reg/tollway:1"}}


def test_simulate_runs_tollway_simulate_without_gpus_or_cache() -> None:
    spec = pool(
        model={
            "gpus": 4,
            "sizeBillions": 72,
            "maxModelLen": 32768,
            "cache": {"kind": "pvc"},
            "hfTokenSecret": {"name": "hf"},
        },
        scheduling={"nodeSelector": {"gpu": "yes"}, "tolerations": [TAINT], "priorityClassName": "inference"},
        apiKeySecret={"name": "vllm-key"},
        **SIMULATED,
    )
    children = d.pool_children(OWNER, spec)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "chat-small"),
        ("Service", "chat-small"),
    ]  # no claim, no StatefulSet: a simulator has no cache
    dep = children[0]
    pod = pod_spec(dep)
    c = container(dep)
    assert c["image"] == "reg/tollway:1"
    assert c["command"][:2] == ["tollway", "simulate"]
    assert arg(c["command"], "--model") == "small" and arg(c["command"], "--port") == "8000"
    assert arg(c["command"], "--host") == "0.0.0.0"
    assert arg(c["command"], "--max-model-len") == "32768"
    assert arg(c["command"], "--max-num-seqs") == "16"  # a 72B model's tier
    assert "nvidia.com/gpu" not in str(c["resources"]) and c["resources"]["requests"]["cpu"] == "50m"
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(pod)  # any node
    env = env_of(c)
    assert env["VLLM_API_KEY"] == {"secretKeyRef": {"name": "vllm-key", "key": "token"}}
    assert "HF_TOKEN" not in env  # nothing is downloaded: the hf-token Secret need not exist
    assert (
        c["securityContext"]["runAsNonRoot"] is True
        and c["securityContext"]["readOnlyRootFilesystem"] is True
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"]["exec"]["command"][:2] == [
        "python3",
        "-c",
    ]  # simulators report vLLM's metrics


def test_simulated_speed_follows_size_and_the_model_s_overrides() -> None:
    def flags(model: dict[str, Any]) -> list[str]:
        return container(deployment(pool(model=model, **SIMULATED)))["command"]

    small, big = flags({"sizeBillions": 7}), flags({"sizeBillions": 405, "gpus": 8})
    assert int(arg(small, "--max-num-seqs") or 0) > int(arg(big, "--max-num-seqs") or 0)
    assert float(arg(small, "--decode-tokens-per-second") or 0) > float(
        arg(big, "--decode-tokens-per-second") or 0
    )
    assert arg(flags({"extraArgs": ["--max-num-seqs=12"]}), "--max-num-seqs") == "12"  # as vLLM would
    tuned = flags(
        {"simulator": {"maxNumSeqs": 3, "decodeTokensPerSecond": 9, "ttftMs": 40, "kvCacheTokens": 20}}
    )
    assert arg(tuned, "--max-num-seqs") == "3" and arg(tuned, "--decode-tokens-per-second") == "9"
    assert arg(tuned, "--ttft-ms") == "40"
    assert arg(tuned, "--kv-cache-tokens") == "8192"  # never below the context window


def test_simulate_defaults_to_the_operator_s_setting() -> None:
    assert (
        d.pool_children(OWNER, pool(), simulate_default=True)[0]["spec"]["template"]["spec"]["containers"][0][
            "name"
        ]
        == "simulator"
    )
    off = pool(simulate={"enabled": False})
    assert container(d.pool_children(OWNER, off, simulate_default=True)[0])["name"] == "vllm"
    assert d.workload_kinds(pool(model={"cache": {"kind": "pvc"}}), simulate_default=True) == {
        "small": "Deployment"
    }


def test_simulated_command_line_is_accepted_by_tollway_simulate() -> None:
    from router_service.simulator.cli import build_parser, profile_from_args

    command = container(
        deployment(pool(model={"sizeBillions": 47, "gpus": 2, "maxModelLen": 16384}, **SIMULATED))
    )["command"]
    profile = profile_from_args(build_parser().parse_args(command[2:]))
    assert profile.model == "small" and profile.max_model_len == 16384 and profile.max_num_seqs == 16


def test_network_policy_admits_the_pool_s_routers_calibration_and_prometheus() -> None:
    assert d.model_network_policy(OWNER, pool()) is None
    assert d.model_network_policy(OWNER, pool(networkPolicy={"enabled": False})) is None
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    spec = pool(networkPolicy={"prometheus": prometheus})
    children = d.pool_children(OWNER, spec)
    policy = next(c for c in children if c["kind"] == "NetworkPolicy")
    assert policy["metadata"]["name"] == "chat-models"
    assert policy["metadata"]["labels"]["tollway.io/pool"] == "chat"
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/component": "model-server", "tollway.io/pool": "chat"}
    }
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/component": "router", "tollway.io/pool": "chat"}
            }
        },
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/component": "calibration", "tollway.io/pool": "chat"}
            }
        },
        prometheus,
    ]
    # The peers select what the operator really labels: a router of a policy over this pool, and
    # a calibration Job's pod.
    router_labels = d.router_labels("chat-auto", "chat")
    assert all(router_labels[k] == v for k, v in rule["from"][0]["podSelector"]["matchLabels"].items())
    model_pod_labels = deployment(spec)["spec"]["template"]["metadata"]["labels"]
    assert all(model_pod_labels[k] == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())


def claim(name: str, model: str, requested: str, capacity: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "metadata": {"name": name, "labels": {"tollway.io/model": model}},
        "spec": {"resources": {"requests": {"storage": requested}}},
    }
    if capacity:
        out["status"] = {"capacity": {"storage": capacity}}
    return out


def test_cache_resize_plan_expands_larger_and_refuses_smaller() -> None:
    spec = parse_model_pool(
        {
            "models": [
                {"name": "a", "model": "x/a", "cache": {"kind": "pvc", "size": "300Gi"}},
                {
                    "name": "b",
                    "model": "x/b",
                    "cache": {"kind": "pvc", "size": "100Gi", "accessMode": "ReadWriteMany"},
                },
                {"name": "c", "model": "x/c", "cache": {"kind": "pvc", "existingClaim": "mine"}},
                {"name": "e", "model": "x/e"},
            ]
        }
    )
    claims = [
        claim("model-cache-chat-a-0", "a", "200Gi"),
        claim("model-cache-chat-a-1", "a", "300Gi"),
        claim("chat-b-cache", "b", "200Gi"),
        claim("mine", "c", "1Gi"),  # the user's claim: never touched
    ]
    plan = d.cache_resize_plan(spec, claims)
    assert plan == [
        d.ClaimResize("a", "model-cache-chat-a-0", "200Gi", "300Gi", "expand"),
        d.ClaimResize("b", "chat-b-cache", "200Gi", "100Gi", "cannot-shrink"),
    ]
    assert d.claims_resizing([claim("x", "a", "300Gi", "200Gi"), claim("y", "a", "300Gi", "320Gi")]) == ["x"]


def test_example_pool_children() -> None:
    import yaml
    from operator_testlib import EXAMPLES

    body = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    spec = parse_model_pool(body["spec"])
    children = d.pool_children(d.Owner.from_body(body | {"metadata": body["metadata"] | {"uid": "u"}}), spec)
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert kinds == [
        ("Deployment", "chat-small"), ("Service", "chat-small"),
        ("StatefulSet", "chat-medium"), ("Service", "chat-medium"),
        ("StatefulSet", "chat-large"), ("Service", "chat-large"),
    ]  # fmt: skip
    small, medium, large = children[0], children[2], children[4]
    assert large["spec"]["replicas"] == 0  # min 0 + scaleToZero
    assert container(large)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    for workload in (small, medium, large):  # every model tolerates the GPU taint, from the pool
        assert pod_spec(workload)["tolerations"] == [TAINT]
        assert pod_spec(workload)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "affinity" in pod_spec(large) and "affinity" not in pod_spec(small)
    # The gated Mistral models get the Hugging Face token, the ungated Qwen model none.
    assert "HF_TOKEN" in env_of(container(small)) and "HF_TOKEN" in env_of(container(medium))
    assert "HF_TOKEN" not in env_of(container(large))
    assert medium["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert large["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert large["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "170Gi"


@pytest.mark.parametrize(("value", "expected"), [("", False), ("true", True), ("1", True), ("false", False)])
def test_the_operator_s_simulate_default_comes_from_its_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    from tollway_operator import state

    monkeypatch.setenv(state.SIMULATE_ENV, value)
    assert state.simulate_default() is expected


def test_owned_claims_of_a_model_that_retains_its_cache_are_not_pruned() -> None:
    spec = parse_model_pool(
        {
            "models": [
                {"name": "keep", "model": "x/a", "cache": {"kind": "pvc"}},
                {"name": "drop", "model": "x/b", "cache": {"kind": "pvc", "retention": "Delete"}},
            ]
        }
    )
    assert d.claim_retained(spec, claim("chat-keep-cache", "keep", "100Gi"))  # e.g. from an older version
    assert not d.claim_retained(spec, claim("chat-drop-cache", "drop", "100Gi"))
    assert not d.claim_retained(spec, claim("chat-gone-cache", "gone", "100Gi"))  # its model left the pool
