"""The real operator (kopf, `tollway_operator.handlers`) against the Kubernetes emulator.

Driven with the `kubernetes` client and with `kubectl`. The emulator has no controllers:
tests/kube_emulator.py's FakeControllers play garbage collection (ownerReferences) and the
Deployment controller (ready replicas = spec.replicas, unless a test holds one unready).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from typing import Any

import kubernetes
import pytest
import yaml
from operator_testlib import EXAMPLES, GROUP, VERSION, condition, example, wait_for

from router_service.config import RouterConfig

pytestmark = pytest.mark.timeout(60)


class Cluster:
    """Small typed wrappers over the kubernetes client for the assertions below."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.ns = namespace
        self.apps = kubernetes.client.AppsV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.policy_api = kubernetes.client.PolicyV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.api = api

    def raw(self, path: str) -> dict[str, Any] | None:
        """GET a REST path as plain JSON (no model round trip); None on 404."""
        try:
            data = self.api.call_api(*self.api.param_serialize("GET", path, auth_settings=["BearerToken"]))
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise
        data.read()
        if data.status == 404:
            return None
        return json.loads(data.data)

    def deployment(self, name: str) -> dict[str, Any] | None:
        return self.raw(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}")

    def statefulset(self, name: str) -> dict[str, Any] | None:
        return self.raw(f"/apis/apps/v1/namespaces/{self.ns}/statefulsets/{name}")

    def workloads(self) -> set[str]:
        """Names of the Deployments and StatefulSets (models with per-replica cache claims)."""
        return self.names("deployments", "apps/v1") | self.names("statefulsets", "apps/v1")

    def service(self, name: str) -> dict[str, Any] | None:
        return self.raw(f"/api/v1/namespaces/{self.ns}/services/{name}")

    def names(self, plural: str, api_version: str = "v1") -> set[str]:
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        items = (self.raw(f"{prefix}/namespaces/{self.ns}/{plural}") or {}).get("items", [])
        return {i["metadata"]["name"] for i in items}

    def config(self, policy: str = "chat-auto") -> RouterConfig | None:
        cm = self.raw(f"/api/v1/namespaces/{self.ns}/configmaps/{policy}-router")
        return RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"])) if cm else None

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)

    def create(self, body: dict[str, Any]) -> None:
        plural = {"ModelPool": "modelpools", "RoutingPolicy": "routingpolicies"}[body["kind"]]
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name, patch)

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = (self.raw(f"/api/v1/namespaces/{self.ns}/events") or {}).get("items", [])
        return [e for e in items if e.get("involvedObject", {}).get("name") == name]

    def cond(self, plural: str, name: str, type_: str) -> dict[str, Any]:
        return condition(self.get(plural, name), type_)


@pytest.fixture()
def cl(api: Any, namespace: str) -> Cluster:
    return Cluster(api, namespace)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def arg(dep: dict[str, Any], flag: str) -> str:
    args = container(dep)["args"]
    return args[args.index(flag) + 1]


def apply_examples(cl: Cluster) -> None:
    cl.create(example("modelpool", cl.ns))
    cl.create(example("routingpolicy", cl.ns))
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("status") == "True", what="policy Ready"
    )


# ---------------------------------------------------------------------------------------------


def test_kubectl_apply_examples_yields_children_and_true_conditions(
    cluster: Any, api: Any, operator: Any
) -> None:
    """The README's claim: apply manifests/examples/ with the operator running."""
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    out = subprocess.run(
        ["kubectl", "apply", "--validate=false", "-f", str(EXAMPLES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "modelpool.tollway.io/chat created" in out.stdout
    cl = Cluster(api, "default")
    wait_for(lambda: cl.cond("modelpools", "chat", "Ready").get("status") == "True", what="pool Ready")
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("status") == "True", what="policy Ready"
    )

    assert {"chat-small", "chat-auto-router"} <= cl.names("deployments", "apps/v1")
    # Per-replica cache claims: StatefulSets (the claims come from their templates, per replica).
    assert {"chat-medium", "chat-large"} <= cl.names("statefulsets", "apps/v1")
    assert {"chat-small", "chat-medium", "chat-large", "chat-auto"} <= cl.names("services")
    assert "chat-auto-router" in cl.names("poddisruptionbudgets", "policy/v1")
    # The router's identity: allowed to read EndpointSlices here, nothing else.
    assert "chat-auto-router" in cl.names("serviceaccounts")
    assert "chat-auto-router" in cl.names("roles", "rbac.authorization.k8s.io/v1")
    assert "chat-auto-router" in cl.names("rolebindings", "rbac.authorization.k8s.io/v1")

    medium = cl.statefulset("chat-medium")
    assert medium is not None
    assert arg(medium, "--model") == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert arg(medium, "--tensor-parallel-size") == "2" and arg(medium, "--max-model-len") == "16384"
    assert "--enable-prefix-caching" in container(medium)["args"]
    assert container(medium)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert medium["metadata"]["ownerReferences"][0]["kind"] == "ModelPool"
    large = cl.statefulset("chat-large")
    assert large is not None and large["spec"]["replicas"] == 0  # min 0 with scaleToZero
    assert large["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.present": "true"
    }  # the pool's
    assert "nodeAffinity" in large["spec"]["template"]["spec"]["affinity"]  # its own

    config = cl.config()
    assert config is not None
    assert [b.name for b in config.backends] == ["small", "medium", "large"]
    assert config.backends[0].url == "http://chat-small.default.svc.cluster.local:8000"
    assert [b.replicas for b in config.backends] == [1, 1, 0]
    assert sum(config.budgets.tokens.values()) == 20_000_000 and config.budgets.replica_share == 0.5
    svc = cl.service("chat-auto")
    assert svc is not None and svc["spec"]["ports"][0]["port"] == 80

    pool = cl.get("modelpools", "chat")
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]
    assert {m["name"]: m["readyReplicas"] for m in pool["status"]["models"]} == {
        "small": 1,
        "medium": 1,
        "large": 0,
    }
    policy = cl.get("routingpolicies", "chat-auto")
    assert policy["status"]["endpoint"] == "http://chat-auto.default.svc/v1"
    assert policy["status"]["routerReplicas"] == 2
    assert condition(policy, "Degraded")["status"] == "False"  # large is scaled to zero on purpose
    assert "scaled to zero: large" in condition(policy, "Degraded")["message"]
    assert any(e["reason"] == "Created" for e in cl.events("chat"))

    got = subprocess.run(
        [
            "kubectl",
            "get",
            "modelpools,routingpolicies,deployments,services,configmaps",
            "-n",
            "default",
            "-o",
            "name",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert got.returncode == 0, got.stderr
    assert "deployment.apps/chat-small" in got.stdout and "configmap/chat-auto-router" in got.stdout
    out = subprocess.run(
        ["kubectl", "delete", "--wait=false", "-f", str(EXAMPLES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: not cl.names("deployments", "apps/v1"), what="cascade deletion in default")


def test_spec_changes_roll_through(cl: Cluster) -> None:
    apply_examples(cl)
    checksum = cl.deployment("chat-auto-router")["spec"]["template"]["metadata"]["annotations"][
        "tollway.io/config-checksum"
    ]  # type: ignore[index]
    models = example("modelpool")["spec"]["models"]
    models[0] |= {"maxModelLen": 4096, "extraArgs": ["--enforce-eager"]}
    models[1]["cost"] = {"inputPerMillionTokens": 0.5, "outputPerMillionTokens": 0.7}
    cl.patch("modelpools", "chat", {"spec": {"models": models}})
    wait_for(
        lambda: arg(cl.deployment("chat-small"), "--max-model-len") == "4096",
        what="args rolled into the Deployment",
    )  # type: ignore[arg-type]
    assert "--enforce-eager" in container(cl.deployment("chat-small"))["args"]  # type: ignore[arg-type]
    # The policy's ConfigMap follows the pool (prices), and the router pods roll (checksum).
    wait_for(
        lambda: cl.config().backend("medium").price.output_per_million_tokens == 0.7,
        what="router config refreshed",
    )  # type: ignore[union-attr]
    wait_for(
        lambda: (
            cl.deployment("chat-auto-router")["spec"]["template"]["metadata"]["annotations"][
                "tollway.io/config-checksum"
            ]
            != checksum
        ),  # type: ignore[index]
        what="router pods rolled (checksum)",
    )
    pool = wait_for(
        lambda: (p := cl.get("modelpools", "chat"))["status"].get("observedGeneration") == 2 and p,
        what="observedGeneration 2",
    )
    assert condition(pool, "Ready")["observedGeneration"] == 2

    cl.patch(
        "routingpolicies", "chat-auto", {"spec": {"router": {"replicas": 1}, "objective": {"alpha": 2.0}}}
    )
    wait_for(
        lambda: "chat-auto-router" not in cl.names("poddisruptionbudgets", "policy/v1"),
        what="PDB removed at 1 replica",
    )
    wait_for(
        lambda: cl.config().objective.alpha == 2.0 and cl.config().budgets.replica_share == 1.0,
        what="config alpha + share",
    )  # type: ignore[union-attr]
    assert cl.deployment("chat-auto-router")["spec"]["replicas"] == 1  # type: ignore[index]


def test_children_deleted_or_edited_by_hand_are_restored(cl: Cluster) -> None:
    apply_examples(cl)
    uid = cl.service("chat-small")["metadata"]["uid"]  # type: ignore[index]
    cl.core.delete_namespaced_service("chat-small", cl.ns)
    wait_for(
        lambda: (s := cl.service("chat-small")) and s["metadata"]["uid"] != uid, what="Service recreated"
    )
    cl.apps.patch_namespaced_deployment(
        "chat-small",
        cl.ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "vllm", "image": "evil:latest"}]}}}},
    )
    wait_for(
        lambda: container(cl.deployment("chat-small"))["image"] == "vllm/vllm-openai:v0.11.0",
        what="image restored",
    )  # type: ignore[arg-type]
    assert container(cl.deployment("chat-small"))["args"][0] == "--model"  # type: ignore[arg-type]
    cl.core.delete_namespaced_config_map("chat-auto-router", cl.ns)
    wait_for(lambda: cl.config() is not None, what="router ConfigMap recreated")
    cl.apps.delete_namespaced_deployment("chat-auto-router", cl.ns)
    wait_for(lambda: cl.deployment("chat-auto-router") is not None, what="router Deployment recreated")


def test_drift_repaired_by_the_resync_is_reported_in_an_event(cl: Cluster) -> None:
    """Cache claims are not watched: only the periodic resync sees one deleted by hand. Its repair
    is posted as an Event like any other (the resync loop runs where kopf's Event queue is)."""
    apply_examples(cl)
    models = example("modelpool")["spec"]["models"]
    models[1]["cache"]["accessMode"] = "ReadWriteMany"  # one claim shared by medium's replicas
    cl.patch("modelpools", "chat", {"spec": {"models": models}})
    wait_for(lambda: "chat-medium-cache" in cl.names("persistentvolumeclaims"), what="the shared claim")
    uid = cl.raw(f"/api/v1/namespaces/{cl.ns}/persistentvolumeclaims/chat-medium-cache")["metadata"]["uid"]  # type: ignore[index]
    cl.core.delete_namespaced_persistent_volume_claim("chat-medium-cache", cl.ns)
    wait_for(
        lambda: (
            (c := cl.raw(f"/api/v1/namespaces/{cl.ns}/persistentvolumeclaims/chat-medium-cache"))
            and c["metadata"]["uid"] != uid
        ),
        what="the claim recreated by the resync",
    )
    wait_for(
        lambda: [
            e for e in cl.events("chat") if e["message"] == "Created PersistentVolumeClaim chat-medium-cache"
        ][1:],
        what="a second Created event for the claim",
    )


def test_removing_a_model_removes_its_children_and_backend(cl: Cluster) -> None:
    apply_examples(cl)
    models = [m for m in example("modelpool")["spec"]["models"] if m["name"] != "medium"]
    cl.patch("modelpools", "chat", {"spec": {"models": models}})
    wait_for(
        lambda: "chat-medium" not in cl.workloads() and "chat-medium" not in cl.names("services"),
        what="StatefulSet and Service removed",
    )
    assert {"chat-small", "chat-large"} <= cl.workloads()
    wait_for(
        lambda: [b.name for b in cl.config().backends] == ["small", "large"],
        what="backend removed from config",
    )  # type: ignore[union-attr]
    assert any(e["reason"] == "Deleted" and "chat-medium" in e["message"] for e in cl.events("chat"))


def test_deleting_parents_cascades(cluster: Any, cl: Cluster) -> None:
    apply_examples(cl)
    cl.delete("modelpools", "chat")
    wait_for(
        lambda: not {"chat-small", "chat-medium", "chat-large"} & cl.workloads(),
        what="model workloads collected",
    )
    assert not {"chat-small", "chat-medium", "chat-large"} & cl.names("services")
    # the policy tells the truth about its missing pool and keeps its router
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("reason") == "PoolNotFound",
        what="PoolNotFound",
    )
    assert "chat-auto-router" in cl.names("deployments", "apps/v1")
    cl.delete("routingpolicies", "chat-auto")
    wait_for(
        lambda: (
            not cl.names("deployments", "apps/v1") and not cl.names("configmaps") and not cl.names("services")
        ),
        what="router collected",
    )
    collected = {(kind, name) for kind, ns, name in cluster.controllers.collected if ns == cl.ns}
    assert ("deployments", "chat-auto-router") in collected and ("services", "chat-auto") in collected


def test_policy_before_its_pool_recovers_when_the_pool_appears(cl: Cluster) -> None:
    cl.create(example("routingpolicy", cl.ns))
    ready = wait_for(
        lambda: (c := cl.cond("routingpolicies", "chat-auto", "Ready")).get("reason") == "PoolNotFound" and c,
        what="PoolNotFound",
    )
    assert ready["status"] == "False" and "'chat'" in ready["message"]
    wait_for(
        lambda: any(e["reason"] == "PoolNotFound" and e["type"] == "Warning" for e in cl.events("chat-auto")),
        what="Warning Event",
    )
    assert "chat-auto-router" not in cl.names("deployments", "apps/v1")
    cl.create(example("modelpool", cl.ns))
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("status") == "True",
        timeout=10,
        what="policy Ready after the pool appeared",
    )
    assert cl.config() is not None


def test_policy_naming_unknown_models_reports_it(cl: Cluster) -> None:
    cl.create(example("modelpool", cl.ns))
    policy = example("routingpolicy", cl.ns)
    policy["spec"]["budgets"] = {"perModel": {"small": 1000, "xl": 5}}
    cl.create(policy)
    ready = wait_for(
        lambda: (
            (c := cl.cond("routingpolicies", "chat-auto", "Ready")).get("reason") == "UnknownModels" and c
        ),
        what="UnknownModels",
    )
    assert "xl" in ready["message"]
    models = example("modelpool")["spec"]["models"] + [
        {"name": "xl", "endpoint": {"url": "https://xl.example"}}
    ]
    cl.patch("modelpools", "chat", {"spec": {"models": models}})
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("status") == "True",
        what="recovered when the pool gained xl",
    )
    assert cl.config().budgets.tokens == {"small": 1000, "xl": 5}  # type: ignore[union-attr]


def test_bad_spec_is_reported_once_without_a_retry_storm(cl: Cluster, operator: Any) -> None:
    bad = example("modelpool", cl.ns)
    bad["spec"]["models"][0]["replicas"] = {"min": 3, "max": 2}
    cl.create(bad)
    ready = wait_for(
        lambda: (c := cl.cond("modelpools", "chat", "Ready")).get("reason") == "InvalidSpec" and c,
        what="InvalidSpec",
    )
    assert "spec.models[0].replicas" in ready["message"] and "min (3) must be <= max (2)" in ready["message"]
    wait_for(lambda: [e for e in cl.events("chat") if e["reason"] == "InvalidSpec"], what="Warning Event")
    assert not cl.names("deployments", "apps/v1")
    before = cl.get("modelpools", "chat")["metadata"]["resourceVersion"]
    import time

    time.sleep(2.5)  # more than a resync interval and several retry delays
    warnings = [e for e in cl.events("chat") if e["reason"] == "InvalidSpec"]
    assert len(warnings) == 1 and warnings[0].get("count", 1) == 1
    assert cl.get("modelpools", "chat")["metadata"]["resourceVersion"] == before  # nothing rewritten
    # fixing the spec recovers
    good = example("modelpool")["spec"]
    cl.patch("modelpools", "chat", {"spec": {"models": good["models"]}})
    wait_for(
        lambda: cl.cond("modelpools", "chat", "Ready").get("status") == "True", what="recovered after the fix"
    )
    assert "chat-small" in cl.names("deployments", "apps/v1")


def test_unready_model_degrades_pool_and_policy_then_recovers(cluster: Any, cl: Cluster) -> None:
    # Held before it exists: held after, `medium` could be ready for a moment (a loaded machine),
    # and a status written from that moment would say Ready after the Degraded the test waits for.
    cluster.hold_unready(cl.ns, "chat-medium")
    apply_examples(cl)
    degraded = wait_for(
        lambda: (c := cl.cond("modelpools", "chat", "Degraded")).get("status") == "True" and c,
        what="pool Degraded",
    )
    assert degraded["reason"] == "ModelsUnavailable" and "medium" in degraded["message"]
    assert cl.cond("modelpools", "chat", "Ready")["status"] == "False"
    wait_for(
        lambda: cl.cond("routingpolicies", "chat-auto", "Degraded").get("reason") == "BackendsUnavailable",
        what="policy Degraded",
    )
    assert cl.config().backend("medium").replicas == 0  # type: ignore[union-attr]
    cluster.hold_unready(cl.ns, "chat-medium", held=False)
    wait_for(lambda: cl.cond("modelpools", "chat", "Ready").get("status") == "True", what="pool recovered")
    wait_for(lambda: cl.config().backend("medium").replicas == 1, what="backend replicas back")  # type: ignore[union-attr]


def test_a_pod_level_cause_reaches_the_pool_status_within_a_resync(cluster: Any, cl: Cluster) -> None:
    """A model whose pod cannot start says why (the kubelet's reason and message, naming the missing
    Secret) in its status entry, Ready and Degraded (RolloutStuck at once), and a Warning Event."""
    apply_examples(cl)
    cluster.hold_unready(cl.ns, "chat-small")
    labels = {
        "app.kubernetes.io/managed-by": "tollway-operator",
        "app.kubernetes.io/component": "model-server",
        "tollway.io/pool": "chat",
        "tollway.io/model": "small",
    }
    cl.core.create_namespaced_pod(
        cl.ns,
        {
            "metadata": {"name": "chat-small-abc", "labels": labels},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
        },
    )
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
    cl.core.patch_namespaced_pod_status(
        "chat-small-abc",
        cl.ns,
        {
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {"name": "vllm", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                     "state": {"waiting": waiting}}
                ],
            }
        },
    )  # fmt: skip
    small = wait_for(
        lambda: next((m for m in cl.get("modelpools", "chat")["status"]["models"] if m["name"] == "small" and m.get("reason")), None),
        what="small's status entry names the cause",
    )  # fmt: skip
    assert (small["reason"], small["message"]) == (
        "CreateContainerConfigError",
        'secret "hf-token" not found',
    )
    assert 'secret "hf-token" not found' in cl.cond("modelpools", "chat", "Ready")["message"]
    degraded = cl.cond("modelpools", "chat", "Degraded")
    assert degraded["reason"] == "RolloutStuck" and "CreateContainerConfigError" in degraded["message"]
    wait_for(
        lambda: [e for e in cl.events("chat") if e.get("type") == "Warning" and "hf-token" in e["message"]],
        what="a Warning Event",
    )


def test_autoscaled_replicas_are_kept_within_bounds(cl: Cluster) -> None:
    apply_examples(cl)
    cl.apps.patch_namespaced_deployment(
        "chat-small", cl.ns, {"spec": {"replicas": 3}}
    )  # what the autoscaler does
    wait_for(
        lambda: cl.config().backend("small").replicas == 3, what="ready replicas reach the router config"
    )  # type: ignore[union-attr]
    assert cl.deployment("chat-small")["spec"]["replicas"] == 3  # type: ignore[index]
    cl.apps.patch_namespaced_deployment("chat-small", cl.ns, {"spec": {"replicas": 9}})  # beyond max 4
    wait_for(lambda: cl.deployment("chat-small")["spec"]["replicas"] == 4, what="clamped to max")  # type: ignore[index]


def test_children_are_watched_with_a_server_side_label_selector(cluster: Any, cl: Cluster) -> None:
    """The operator streams only its own children: the API server filters the watches of
    Deployments, Services, ConfigMaps and PodDisruptionBudgets by the managed-by label, rather
    than kopf dropping everyone else's objects after receiving them."""
    apply_examples(cl)
    watches = [
        r
        for r in list(cluster.emulator)
        if r.params.get("watch") in ("true", "1")
        and r.resource is not None
        and r.resource.plural in {"deployments", "services", "configmaps", "poddisruptionbudgets"}
    ]
    assert {r.resource.plural for r in watches} == {
        "deployments",
        "services",
        "configmaps",
        "poddisruptionbudgets",
    }
    for request in watches:
        assert request.params.get("labelSelector") == "app.kubernetes.io/managed-by=tollway-operator", (
            f"{request.resource.plural} watched with {request.params}"
        )


def test_operator_metrics_are_served(operator: Any, metrics_port: int, cl: Cluster) -> None:
    apply_examples(cl)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'tollway_operator_reconciles_total{kind="ModelPool"' in text
    assert "tollway_operator_reconcile_duration_seconds_bucket" in text
    assert 'tollway_operator_child_changes_total{action="created",kind="Deployment"}' in text


def test_peering_objects_are_created_once(api: Any, operator: Any, cl: Cluster) -> None:
    """`--peering NAME` needs kopf's peering object; the operator creates it when missing."""
    import asyncio

    from tollway_operator import handlers, kube

    for kind, plural, scope in (
        ("KopfPeering", "kopfpeerings", "Namespaced"),
        ("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    ):
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "group": "kopf.dev",
                "scope": scope,
                "names": {"kind": kind, "plural": plural},
                "versions": [{"name": "v1", "served": True, "storage": True}],
            },
        }
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)

    async def run() -> tuple[list[str], list[str], list[str]]:
        client = kube.Kube(await kube.connect())
        try:
            first = await handlers.ensure_peering(client, "tollway", False, [cl.ns, "team-*"])
            again = await handlers.ensure_peering(client, "tollway", False, [cl.ns])
            cluster = await handlers.ensure_peering(client, "tollway", True, [])
            return first, again, cluster
        finally:
            await client.close()

    first, again, cluster = asyncio.run(run())
    assert first == [f"KopfPeering {cl.ns}/tollway"] and again == []  # globs skipped, 409 is fine
    assert cluster == ["ClusterKopfPeering tollway"]
    assert (
        cl.custom.get_namespaced_custom_object("kopf.dev", "v1", cl.ns, "kopfpeerings", "tollway")[
            "metadata"
        ]["name"]
        == "tollway"
    )


def test_an_hpa_style_scale_changes_replicas_without_restarting_router_pods(cl: Cluster) -> None:
    apply_examples(cl)
    before = cl.deployment("chat-auto-router")
    assert before is not None and before["spec"]["replicas"] == 2
    scale = cl.custom.get_namespaced_custom_object_scale(
        GROUP, VERSION, cl.ns, "routingpolicies", "chat-auto"
    )
    # What an HPA reads: the selector of the pods whose metrics it averages.
    assert (
        scale["status"]["selector"]
        == "app.kubernetes.io/instance=chat-auto,app.kubernetes.io/name=tollway-router"
    )
    # What an HPA writes: the scale subresource's spec.replicas.
    cl.custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, cl.ns, "routingpolicies", "chat-auto", {"spec": {"replicas": 4}}
    )
    after = wait_for(
        lambda: (dep := cl.deployment("chat-auto-router")) and dep["spec"]["replicas"] == 4 and dep,
        what="router Deployment scaled to 4",
    )
    assert after["spec"]["template"] == before["spec"]["template"]  # no rollout of the running pods
    wait_for(lambda: cl.config().budgets.replica_share == 0.25, what="share hot-reloaded via the ConfigMap")  # type: ignore[union-attr]
    policy = wait_for(
        lambda: (p := cl.get("routingpolicies", "chat-auto"))["status"].get("routerReplicas") == 4 and p,
        what="status follows",
    )
    assert policy["spec"]["router"]["replicas"] == 4


def test_an_external_scaler_owns_the_router_replicas(cl: Cluster) -> None:
    cl.create(example("modelpool", cl.ns))
    policy = example("routingpolicy", cl.ns)
    policy["spec"]["router"] = {"replicas": 2, "replicasOwner": "external"}
    cl.create(policy)
    wait_for(lambda: cl.cond("routingpolicies", "chat-auto", "Ready").get("status") == "True", what="Ready")
    template = cl.deployment("chat-auto-router")["spec"]["template"]  # type: ignore[index]
    # An HPA targeting the Deployment itself scales it through the Deployment's scale subresource.
    cl.apps.patch_namespaced_deployment_scale("chat-auto-router", cl.ns, {"spec": {"replicas": 6}})
    wait_for(lambda: cl.config().budgets.replica_share == pytest.approx(1 / 6), what="share follows the HPA")  # type: ignore[union-attr]
    cl.patch("routingpolicies", "chat-auto", {"spec": {"objective": {"alpha": 2.0}}})  # a reconcile
    wait_for(lambda: cl.config().objective.alpha == 2.0, what="reconciled")  # type: ignore[union-attr]
    dep = cl.deployment("chat-auto-router")
    assert dep is not None and dep["spec"]["replicas"] == 6  # left alone by the operator
    assert dep["spec"]["template"] != template  # (alpha rolls the pods; the replicas stay the HPA's)
