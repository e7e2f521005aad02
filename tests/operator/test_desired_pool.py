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
    return d.model_deployment(OWNER, spec, spec.models[model], live)


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


def test_gpu_limits_are_strings_and_user_resources_kept() -> None:
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
    assert res["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    assert res["requests"] == {"cpu": "4", "memory": "32Gi"}


def test_port_probes_and_shm() -> None:
    dep = deployment(pool(model={"gpus": 2}))
    c = container(dep)
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60  # model loading takes long
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_cache_empty_dir() -> None:
    dep = deployment(pool(model={"cache": {"kind": "emptyDir", "size": "40Gi"}}))
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "40Gi"}}
    assert {"name": "model-cache", "mountPath": "/models"} in container(dep)["volumeMounts"]
    assert env_of(container(dep))["HF_HOME"].startswith("/models/")


def test_cache_pvc_created_by_operator() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "size": "200Gi", "storageClassName": "fast"}})
    children = d.pool_children(OWNER, spec)
    claim = next(c for c in children if c["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "chat-small-cache"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "fast",
    }
    dep = next(c for c in children if c["kind"] == "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "chat-small-cache"}


def test_cache_existing_claim_is_used_not_created() -> None:
    spec = pool(model={"cache": {"kind": "pvc", "existingClaim": "weights"}})
    children = d.pool_children(OWNER, spec)
    assert not [c for c in children if c["kind"] == "PersistentVolumeClaim"]
    dep = next(c for c in children if c["kind"] == "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
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


def test_node_selector_and_tolerations() -> None:
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    spec = pool(model={"nodeSelector": {"gpu": "h100"}, "tolerations": [tol]})
    pod = deployment(spec)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [tol]
    assert "nodeSelector" not in deployment(pool())["spec"]["template"]["spec"]


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


def test_example_pool_children() -> None:
    import yaml
    from operator_testlib import EXAMPLES

    body = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    spec = parse_model_pool(body["spec"])
    children = d.pool_children(d.Owner.from_body(body | {"metadata": body["metadata"] | {"uid": "u"}}), spec)
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert kinds == [
        ("Deployment", "chat-small"), ("Service", "chat-small"),
        ("PersistentVolumeClaim", "chat-medium-cache"), ("Deployment", "chat-medium"), ("Service", "chat-medium"),
        ("PersistentVolumeClaim", "chat-large-cache"), ("Deployment", "chat-large"), ("Service", "chat-large"),
    ]  # fmt: skip
    large = children[6]
    assert large["spec"]["replicas"] == 0  # min 0 + scaleToZero
    assert container(large)["resources"]["limits"]["nvidia.com/gpu"] == "4"
