"""End-to-end: try tollway without GPUs (`spec.simulate`).

A pool in simulate mode runs `tollway simulate` (the tollway image) in place of vLLM: its pods
ask for no GPU, ignore the pool's GPU scheduling settings, mount no cache and run on any node. The
suite checks that on the cluster, then shows that what the operator rendered works: the exact
command lines of the router and the simulators, with the rendered router config, the Secrets and
the API key wiring, are started here as local processes (the local control plane's nodes run no
containers), remapping only listen addresses, ports and mounted paths (`local_pods.py`), and the
official `openai` client gets a chat completion through the router.

`TOLLWAY_E2E_IMAGE` names the tollway image the pods use on a real cluster (default: the
operator's default image).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from e2e_lib import GPU, GPU_TOLERATION, Cluster, OperatorProcess, condition, current
from local_pods import LocalProcess, local_container, start

from router_service.config import RouterConfig

pytestmark = pytest.mark.timeout(600)
POOL, POLICY = "try", "try-auto"
MODELS = ("small", "large")
ROUTER_TOKEN = "try-router-token"
MODEL_KEY = "try-model-key"


def manifests(namespace: str) -> list[dict[str, Any]]:
    image = os.environ.get("TOLLWAY_E2E_IMAGE")
    simulate: dict[str, Any] = {"enabled": True} | ({"image": image} if image else {})
    router: dict[str, Any] = {"replicas": 1, "authSecret": {"name": "try-router-auth", "key": "tokens"}}
    if image:
        router["image"] = image
    secrets = [
        {"name": "try-router-auth", "data": {"tokens": f"{ROUTER_TOKEN}\n"}},
        {"name": "try-model-key", "data": {"key": MODEL_KEY}},
    ]
    return [
        *(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": s["name"], "namespace": namespace},
                "stringData": s["data"],
            }
            for s in secrets
        ),
        {
            "apiVersion": "tollway.io/v1alpha1",
            "kind": "ModelPool",
            "metadata": {"name": POOL, "namespace": namespace},
            "spec": {
                "simulate": simulate,
                "apiKeySecret": {"name": "try-model-key", "key": "key"},
                # GPU settings a simulated pool ignores: its pods land on any node.
                "scheduling": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [GPU_TOLERATION],
                },
                "networkPolicy": {
                    "prometheus": {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                    }
                },
                "calibration": {"enabled": False},
                "models": [
                    {
                        "name": "small",
                        "model": "mistralai/Mistral-7B-Instruct-v0.3",
                        "profile": "mistralai/mistral-7b-chat",
                        "sizeBillions": 7,
                        "cost": {"inputPerMillionTokens": 0.2, "outputPerMillionTokens": 0.2},
                        # A Secret that does not exist: a simulator downloads nothing.
                        "hfTokenSecret": {"name": "try-absent-hf-token"},
                    },
                    {
                        "name": "large",
                        "model": "Qwen/Qwen2.5-72B-Instruct",
                        "profile": "gpt-4-1106-preview",
                        "sizeBillions": 72,
                        "gpus": 4,
                        "maxModelLen": 32768,
                        "cost": {"inputPerMillionTokens": 10, "outputPerMillionTokens": 30},
                        "cache": {"kind": "pvc"},
                    },
                ],
            },
        },
        {
            "apiVersion": "tollway.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": POLICY, "namespace": namespace},
            "spec": {"poolRef": {"name": POOL}, "router": router},
        },
    ]


@pytest.fixture(scope="module")
def simulated_pool(cluster: Cluster, namespace: str, operator: OperatorProcess | None) -> Iterator[Cluster]:
    cluster.apply(manifests(namespace))
    try:
        yield cluster
    finally:
        cluster.kubectl("delete", "routingpolicy", POLICY, "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "modelpool", POOL, "-n", namespace, "--wait=false", check=False)
        cluster.wait_for(
            lambda: not {f"{POOL}-{m}" for m in MODELS} & cluster.names("deployments"),
            "the simulators collected",
        )


def expect_ready(cl: Cluster) -> bool:
    return cl.emulated or os.environ.get("TOLLWAY_E2E_EXPECT_READY") == "1"


def test_simulated_pods_ask_for_no_gpu_and_run_on_any_node(simulated_pool: Cluster) -> None:
    cl = simulated_pool
    names = {f"{POOL}-{m}" for m in MODELS}
    cl.wait_for(lambda: names <= cl.names("deployments"), "the simulators' Deployments")
    assert not names & cl.names("statefulsets")  # no cache, so no per-replica claims
    assert not [
        c for c in cl.items("persistentvolumeclaims") if c["metadata"]["name"].endswith(f"{POOL}-large-0")
    ]
    for name in names:
        template = cl.get("deployment", name)["spec"]["template"]
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["command"][:2] == ["tollway", "simulate"]
        assert GPU not in str(container["resources"]), container["resources"]
        assert not {"nodeSelector", "tolerations", "affinity"} & set(pod), "a simulator runs on any node"
    policy = cl.get("networkpolicy", f"{POOL}-models")
    assert policy is not None and policy["spec"]["podSelector"]["matchLabels"]["tollway.io/pool"] == POOL

    if not cl.emulated and expect_ready(cl):
        gpu_nodes = cl.gpu_nodes()

        def running() -> list[dict[str, Any]] | None:
            pods = [
                p
                for p in cl.items("pods", f"tollway.io/pool={POOL},app.kubernetes.io/component=model-server")
            ]
            ok = [
                p
                for p in pods
                if p["status"].get("phase") == "Running" and condition(p, "Ready").get("status") == "True"
            ]
            return ok if len(ok) == len(MODELS) and len(pods) == len(MODELS) else None

        pods = cl.wait_for(running, "the simulator pods Running and Ready")
        for pod in pods:
            requested = [c["resources"] for c in pod["spec"]["containers"]]
            assert GPU not in str(requested)
            # The GPU nodes are tainted and the simulators tolerate nothing: a node without GPUs.
            assert pod["spec"]["nodeName"] not in gpu_nodes, pod["spec"]["nodeName"]
    pool = cl.wait_for(lambda: (p := cl.get("modelpool", POOL)) and current(p) and p, "the pool's status")
    if expect_ready(cl):
        cl.wait_for(
            lambda: condition(cl.get("modelpool", POOL), "Ready").get("status") == "True", "pool Ready"
        )
        cl.wait_for(
            lambda: condition(cl.get("routingpolicy", POLICY), "Ready").get("status") == "True",
            "the router Ready",
        )
    else:
        assert condition(pool, "Ready").get("reason") in {"AllModelsAvailable", "ModelsUnavailable"}


def served_config(cl: Cluster) -> RouterConfig | None:
    """The router's config once every simulator has a ready replica (what the router routes by)."""
    cm = cl.get("configmap", f"{POLICY}-router")
    if cm is None:
        return None
    config = RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"]))
    return config if all(b.replicas >= 1 for b in config.backends) else None


def test_the_rendered_command_lines_answer_an_openai_client(simulated_pool: Cluster, tmp_path: Path) -> None:
    cl = simulated_pool
    if not expect_ready(cl):
        pytest.skip(
            "the simulators must be ready for the router to route to them (TOLLWAY_E2E_EXPECT_READY=1)"
        )
    config = cl.wait_for(lambda: served_config(cl), "the router config with every simulator ready")
    started: list[LocalProcess] = []
    try:
        local_urls: dict[str, str] = {}
        for model in MODELS:
            deployment = cl.get("deployment", f"{POOL}-{model}")
            sim = local_container(cl, deployment["spec"]["template"], tmp_path / model)
            started.append(start(sim, "/health"))
            local_urls[model] = started[-1].url
        backends = {b.name: b.url for b in config.backends}

        def to_local(text: str) -> str:  # what the cluster's DNS would resolve the Services to
            for model, url in backends.items():
                text = text.replace(url, local_urls[model])
            return text

        router_deployment = cl.get("deployment", f"{POLICY}-router")
        router = local_container(cl, router_deployment["spec"]["template"], tmp_path / "router", to_local)
        assert router.argv[1:3] == ["router", "--config"]
        started.append(start(router, "/readyz", timeout=180))
        router_url = started[-1].url

        # The simulators require the pool's API key, as vLLM with --api-key does ...
        direct = httpx.post(
            f"{local_urls['small']}/v1/chat/completions",
            json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert direct.status_code == 401
        # ... and the router sends it: routed and pinned requests are answered.
        client = openai.OpenAI(base_url=f"{router_url}/v1", api_key=ROUTER_TOKEN, max_retries=0, timeout=60)
        served = set()
        for model in ("auto", *MODELS):
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": "Write a function that reverses a list."}],
                max_tokens=16,
            )
            completion = raw.parse()
            assert completion.choices[0].message.content
            assert completion.usage is not None and completion.usage.completion_tokens > 0
            served.add(raw.headers["x-tollway-model"])
            if model != "auto":
                assert raw.headers["x-tollway-model"] == model
        assert served == set(MODELS)
        with pytest.raises(openai.AuthenticationError):  # the router's own bearer auth, from its Secret
            openai.OpenAI(
                base_url=f"{router_url}/v1", api_key="wrong", max_retries=0
            ).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
    finally:
        for process in reversed(started):
            process.stop()
