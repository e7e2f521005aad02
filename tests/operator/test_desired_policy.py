"""Desired state of a RoutingPolicy: router config, ConfigMap, Deployment, Service, PDB, budgets."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from operator_testlib import EXAMPLES

from router_service.config import RouterConfig
from tollway_operator import desired as d
from tollway_operator.api import SpecError, parse_model_pool, parse_routing_policy

OWNER = d.Owner(kind="RoutingPolicy", name="chat-auto", namespace="ml", uid="uid-p")
POOL_OWNER = d.Owner(kind="ModelPool", name="chat", namespace="ml", uid="uid-c")
POOL = parse_model_pool(
    {
        "models": [
            {
                "name": "small",
                "model": "a/small",
                "profile": "mistralai/mistral-7b-chat",
                "cost": {"inputPerMillionTokens": 0.2, "outputPerMillionTokens": 0.2},
            },
            {
                "name": "large",
                "model": "a/large",
                "maxModelLen": 32768,
                "extraArgs": ["--enable-prefix-caching", "--max-num-seqs=4"],
                "cost": {"inputPerMillionTokens": 10, "outputPerMillionTokens": 30},
            },
            {
                "name": "gpt",
                "endpoint": {
                    "url": "https://api.example.com",
                    "apiKeySecret": {"name": "openai", "key": "key"},
                    "upstreamModel": "gpt-4o",
                },
                "cost": {"inputPerMillionTokens": 2.5, "outputPerMillionTokens": 10},
            },
        ]
    }
)


def policy(**spec: Any) -> Any:
    return parse_routing_policy({"poolRef": {"name": "chat"}} | spec)


def plan(
    spec: Any = None, ready: dict[str, int] | None = None, quality: dict[str, float] | None = None
) -> d.RouterPlan:
    return d.policy_children(
        OWNER,
        spec or policy(),
        "chat",
        POOL,
        ready if ready is not None else {"small": 2, "large": 0},
        quality,
    )


def child(p: d.RouterPlan, kind: str) -> dict[str, Any]:
    return next(c for c in p.children if c["kind"] == kind)


def config_of(p: d.RouterPlan) -> RouterConfig:
    return RouterConfig.model_validate(yaml.safe_load(child(p, "ConfigMap")["data"]["router.yaml"]))


def test_backends_from_pool_services_prices_and_ready_replicas() -> None:
    cfg = config_of(plan())
    small, large, gpt = cfg.backends
    assert small.url == "http://chat-small.ml.svc.cluster.local:8000"
    assert (
        small.profile == "mistralai/mistral-7b-chat" and large.profile == "large"
    )  # profile defaults to the name
    assert small.price.input_per_million_tokens == 0.2 and large.price.output_per_million_tokens == 30
    assert (small.replicas, large.replicas, gpt.replicas) == (2, 0, 1)  # 0 ready: the router degrades it
    assert gpt.url == "https://api.example.com" and gpt.upstream_model == "gpt-4o"
    assert gpt.api_key_env == "TOLLWAY_BACKEND_GPT_API_KEY" and small.api_key_env is None


def test_vllm_concurrency_and_context_window_reach_the_router() -> None:
    backends = {b.name: b for b in config_of(plan()).backends}
    assert (backends["large"].max_num_seqs, backends["large"].max_model_len) == (4, 32768)
    assert (backends["small"].max_num_seqs, backends["small"].max_model_len) == (None, None)  # not set
    assert backends["gpt"].max_num_seqs is None  # an external endpoint: nothing known
    assert d.vllm_flag(["--max-num-seqs", "16"], "--max-num-seqs") == 16
    assert d.vllm_flag(["--max-num-seqs=x"], "--max-num-seqs") is None


def test_settings_are_carried_into_the_config() -> None:
    spec = policy(
        servedModelName="smart",
        objective={"alpha": 2.0, "algorithm": "port", "rejectBelow": -1},
        history={"url": "https://example.com/h.jsonl"},
        embedding={"kind": "hashed", "dimensions": 256},
        ann={"k": 7, "efSearch": 99},
        estimator={"weighting": "uniform", "shrinkage": 5, "prior": "global", "chooseK": True},
        learning={"warmupFraction": 0.05, "expectedQueries": 500, "refitEvery": 100},
        degradation={
            "mode": "shed",
            "maxWaitingPerReplica": 3,
            "maxKvCacheUsage": 0.8,
            "retryAfterSeconds": 4,
        },
    )
    cfg = config_of(plan(spec))
    assert cfg.served_model_name == "smart"
    assert (cfg.objective.alpha, cfg.objective.algorithm, cfg.objective.reject_below) == (2.0, "port", -1)
    assert cfg.history.url == "https://example.com/h.jsonl"
    assert cfg.embedding.dimensions == 256 and cfg.ann.k == 7 and cfg.ann.ef_search == 99
    assert (cfg.estimator.weighting, cfg.estimator.shrinkage, cfg.estimator.prior) == ("uniform", 5, "global")
    assert cfg.estimator.choose_k
    assert (cfg.learning.warmup_fraction, cfg.learning.expected_queries, cfg.learning.refit_every) == (
        0.05,
        500,
        100,
    )
    assert (
        cfg.degradation.mode,
        cfg.degradation.max_waiting_per_replica,
        cfg.degradation.max_kv_cache_usage,
    ) == ("shed", 3, 0.8)
    assert cfg.degradation.retry_after_seconds == 4
    assert cfg.budgets.state_file == "/var/lib/tollway/ledger.json"


def test_per_model_budgets_and_replica_share() -> None:
    spec = policy(
        budgets={"windowSeconds": 600, "perModel": {"small": 1000, "large": 50}}, router={"replicas": 4}
    )
    p = plan(spec)
    cfg = config_of(p)
    assert cfg.budgets.tokens == {"small": 1000, "large": 50}
    assert cfg.budgets.window_seconds == 600
    assert cfg.budgets.replica_share == pytest.approx(0.25)
    assert p.budgets.tokens == {"small": 1000, "large": 50}


def test_per_model_budget_for_unknown_model_is_a_reference_error() -> None:
    with pytest.raises(d.PolicyReferenceError) as err:
        plan(policy(budgets={"perModel": {"small": 1, "huge": 2}}))
    assert err.value.reason == "UnknownModels" and "huge" in err.value.message


def test_total_budget_split_weighted_by_quality_and_price() -> None:
    spec = policy(budgets={"totalTokens": 1_000_000, "split": "weighted"})
    quality = {"mistralai/mistral-7b-chat": 0.6, "large": 0.9, "gpt": 0.8}
    tokens = plan(spec, quality=quality).budgets.tokens
    assert sum(tokens.values()) == 1_000_000
    # weights sqrt(perf / mean price): small 0.6/0.2, large 0.9/20, gpt 0.8/6.25
    import math

    w = {"small": math.sqrt(0.6 / 0.2), "large": math.sqrt(0.9 / 20), "gpt": math.sqrt(0.8 / 6.25)}
    for name, weight in w.items():
        assert tokens[name] == pytest.approx(1_000_000 * weight / sum(w.values()), abs=1)


@pytest.mark.parametrize("split", ["uniform", "cost", "perf"])
def test_total_budget_other_splits(split: str) -> None:
    spec = policy(budgets={"totalTokens": 999, "split": split})
    tokens = plan(spec, quality={"mistralai/mistral-7b-chat": 0.5, "large": 0.5, "gpt": 0.5}).budgets.tokens
    assert sum(tokens.values()) == 999
    if split in ("uniform", "perf"):
        assert sorted(tokens.values()) == [333, 333, 333]
    else:
        assert tokens["small"] > tokens["gpt"] > tokens["large"]


def test_missing_quality_falls_back_with_a_note() -> None:
    spec = policy(budgets={"totalTokens": 100, "split": "perf"})
    res = plan(spec, quality={"large": 0.8}).budgets
    assert res.tokens == {"small": 34, "large": 33, "gpt": 33}  # unknown profiles get the known mean
    assert any("mistralai/mistral-7b-chat" in n for n in res.notes)


def test_free_models_get_a_bounded_share() -> None:
    free = parse_model_pool(
        {
            "models": [
                {"name": "a", "model": "x/a"},
                {
                    "name": "b",
                    "model": "x/b",
                    "cost": {"inputPerMillionTokens": 1, "outputPerMillionTokens": 1},
                },
            ]
        }
    )
    res = d.resolve_budgets(policy(budgets={"totalTokens": 100, "split": "cost"}).budgets, free.models, {})
    assert res.tokens == {"a": 50, "b": 50}  # a zero price counts as the cheapest priced model


def test_no_budgets() -> None:
    assert config_of(plan()).budgets.tokens == {}


def test_config_map() -> None:
    cm = child(plan(), "ConfigMap")
    assert cm["metadata"]["name"] == "chat-auto-router"
    assert cm["metadata"]["labels"]["app.kubernetes.io/component"] == "router"
    assert cm["metadata"]["labels"]["tollway.io/policy"] == "chat-auto"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-p"


def test_router_deployment() -> None:
    spec = policy(
        router={
            "replicas": 3,
            "image": "reg/tollway:9",
            "resources": {"limits": {"memory": "1Gi"}},
            "logLevel": "debug",
        }
    )
    dep = child(plan(spec), "Deployment")
    assert dep["metadata"]["name"] == "chat-auto-router"
    assert dep["spec"]["replicas"] == 3
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "reg/tollway:9"
    assert c["command"] == [
        "tollway", "router", "--config", "/etc/tollway/router.yaml", "--host", "0.0.0.0", "--port", "8080", "--log-level", "debug",
    ]  # fmt: skip
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert c["resources"] == {"limits": {"memory": "1Gi"}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["TOLLWAY_BACKEND_GPT_API_KEY"] == {"secretKeyRef": {"name": "openai", "key": "key"}}
    assert (
        c["securityContext"]["runAsNonRoot"] is True
        and c["securityContext"]["readOnlyRootFilesystem"] is True
    )
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "chat-auto-router"
    assert "auth" not in volumes


def test_auth_secret_is_mounted_and_configured() -> None:
    p = plan(policy(router={"authSecret": {"name": "keys", "key": "tokens.txt"}}))
    dep = child(p, "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"] == {
        "secretName": "keys",
        "items": [{"key": "tokens.txt", "path": "tokens"}],
    }
    assert config_of(p).auth.bearer_tokens_file == "/etc/tollway/auth/tokens"


def test_history_config_map_is_mounted() -> None:
    dep = child(plan(policy(history={"configMap": "my-history"})), "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["history"]["configMap"]["name"] == "my-history"
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOLLWAY_HISTORY_DIR"] == "/etc/tollway/history"


def test_checksum_changes_with_config_but_not_with_ready_replicas() -> None:
    def checksum(p: d.RouterPlan) -> str:
        return child(p, "Deployment")["spec"]["template"]["metadata"]["annotations"][d.CHECKSUM_ANNOTATION]

    base = checksum(plan(ready={"small": 1, "large": 1}))
    assert checksum(plan(ready={"small": 3, "large": 0})) == base  # delivered by hot reload
    assert checksum(plan(policy(objective={"alpha": 3.0}), ready={"small": 1, "large": 1})) != base


def test_service_is_the_endpoint() -> None:
    svc = child(plan(), "Service")
    assert svc["metadata"]["name"] == "chat-auto"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/name": "tollway-router",
        "app.kubernetes.io/instance": "chat-auto",
    }
    assert d.router_endpoint("chat-auto", "ml") == "http://chat-auto.ml.svc/v1"


@pytest.mark.parametrize(("replicas", "has_pdb"), [(0, False), (1, False), (2, True), (5, True)])
def test_pdb_only_with_several_replicas(replicas: int, has_pdb: bool) -> None:
    p = plan(policy(router={"replicas": replicas}))
    pdbs = [c for c in p.children if c["kind"] == "PodDisruptionBudget"]
    assert bool(pdbs) == has_pdb
    if pdbs:
        assert pdbs[0]["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": d.router_selector("chat-auto")},
        }


def test_served_name_colliding_with_a_model() -> None:
    with pytest.raises(d.PolicyReferenceError) as err:
        plan(policy(servedModelName="small"))
    assert err.value.reason == "ServedNameCollides"


def test_policy_name_must_be_a_service_name() -> None:
    bad = d.Owner(kind="RoutingPolicy", name="9lives", namespace="ml", uid="u")
    with pytest.raises(SpecError, match=r"metadata\.name"):
        d.policy_children(bad, policy(), "chat", POOL, {})


def test_example_policy_over_example_pool() -> None:
    pool = parse_model_pool(yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())["spec"])
    spec = parse_routing_policy(yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text())["spec"])
    p = d.policy_children(
        OWNER,
        spec,
        "chat",
        pool,
        {"small": 1, "medium": 1, "large": 0},
        {"mistralai/mistral-7b-chat": 0.58, "mistralai/mixtral-8x7b-chat": 0.74, "gpt-4-1106-preview": 0.88},
    )
    assert sum(p.budgets.tokens.values()) == 20_000_000
    assert p.budgets.tokens["small"] > p.budgets.tokens["medium"] > p.budgets.tokens["large"]
    assert config_of(p).budgets.replica_share == 0.5
    assert [c["kind"] for c in p.children] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ]


def test_the_router_runs_as_its_own_service_account_allowed_only_to_read_endpointslices() -> None:
    p = plan()
    account, role, binding = (child(p, k) for k in ("ServiceAccount", "Role", "RoleBinding"))
    name = "chat-auto-router"
    assert {account["metadata"]["name"], role["metadata"]["name"], binding["metadata"]["name"]} == {name}
    assert all(
        c["metadata"]["namespace"] == "ml" and c["metadata"]["ownerReferences"]
        for c in (account, role, binding)
    )
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "ml"}]
    pod = child(p, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == name and pod["automountServiceAccountToken"] is True
    kinds = [c["kind"] for c in p.children]
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")  # applied before its pods need it


def test_deployed_models_are_found_through_their_services_endpointslices() -> None:
    backends = {b.name: b for b in config_of(plan()).backends}
    small = backends["small"].endpoint_slices
    assert small is not None
    assert (small.service, small.namespace, small.port_name) == ("chat-small", "ml", "http")
    assert backends["small"].url == "http://chat-small.ml.svc.cluster.local:8000"  # until the first list
    assert backends["gpt"].endpoint_slices is None  # an external endpoint has no pods
    # The Service's port is the one the slices name.
    service = next(
        c
        for c in d.pool_children(POOL_OWNER, POOL)
        if c["kind"] == "Service" and c["metadata"]["name"] == "chat-small"
    )
    assert service["spec"]["ports"][0]["name"] == small.port_name


# --- scaling the router, shared state -----------------------------------------------------------


def deployment_of(p: d.RouterPlan) -> dict[str, Any]:
    return child(p, "Deployment")


def test_scaling_the_router_changes_no_pod_template() -> None:
    two, five = plan(policy(router={"replicas": 2})), plan(policy(router={"replicas": 5}))
    assert deployment_of(two)["spec"]["replicas"] == 2 and deployment_of(five)["spec"]["replicas"] == 5
    # The pods are not rolled: same template (checksum included), only replicas differ...
    assert deployment_of(two)["spec"]["template"] == deployment_of(five)["spec"]["template"]
    # ... and the new share reaches running routers by hot reload of the ConfigMap.
    assert config_of(two).budgets.replica_share == 0.5 and config_of(five).budgets.replica_share == 0.2
    # Anything else in the config still rolls them.
    other = plan(policy(router={"replicas": 2}, objective={"alpha": 3.0}))
    assert deployment_of(other)["spec"]["template"] != deployment_of(two)["spec"]["template"]


def test_an_external_owner_keeps_the_live_router_replicas() -> None:
    spec = policy(router={"replicas": 2, "replicasOwner": "external"})
    created = d.policy_children(OWNER, spec, "chat", POOL, {}, live_router_replicas=None)
    assert deployment_of(created)["spec"]["replicas"] == 2  # set once, at creation
    scaled = d.policy_children(OWNER, spec, "chat", POOL, {}, live_router_replicas=7)
    assert deployment_of(scaled)["spec"]["replicas"] == 7  # an HPA on the Deployment set 7: kept
    assert config_of(scaled).budgets.replica_share == pytest.approx(1 / 7)
    assert any(c["kind"] == "PodDisruptionBudget" for c in scaled.children)
    assert deployment_of(scaled)["spec"]["template"] == deployment_of(created)["spec"]["template"]
    owned = d.policy_children(OWNER, policy(router={"replicas": 2}), "chat", POOL, {}, live_router_replicas=7)
    assert deployment_of(owned)["spec"]["replicas"] == 2  # the policy owns them: spec wins


def env_of(p: d.RouterPlan) -> dict[str, Any]:
    return {e["name"]: e for e in deployment_of(p)["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_shared_state_url_from_the_policy_the_operator_default_or_a_secret() -> None:
    none = config_of(plan())
    assert none.state.url is None and none.state.key == "ml/chat-auto"
    default = d.policy_children(
        OWNER, policy(), "chat", POOL, {}, default_state_url="redis://tollway-redis:6379/0"
    )
    assert config_of(default).state.url == "redis://tollway-redis:6379/0"
    own = d.policy_children(
        OWNER,
        policy(state={"url": "redis://team-redis:6379/3", "syncIntervalSeconds": 1.0}),
        "chat",
        POOL,
        {},
        default_state_url="redis://tollway-redis:6379/0",
    )
    assert config_of(own).state.url == "redis://team-redis:6379/3"
    assert config_of(own).state.sync_interval_seconds == 1.0
    secret = plan(policy(state={"urlSecret": {"name": "redis-auth", "key": "url"}}))
    assert config_of(secret).state.url is None  # the password never lands in the ConfigMap
    assert "redis-auth" not in child(secret, "ConfigMap")["data"]["router.yaml"]
    assert env_of(secret)["TOLLWAY_STATE_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "url"}
    }
    assert env_of(secret)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Switching stores restarts the routers (a running router keeps the store it started with).
    assert deployment_of(default)["spec"]["template"] != deployment_of(plan())["spec"]["template"]


def test_the_scale_subresource_can_drive_an_hpa() -> None:
    from tollway_operator.crdgen import all_crds

    crd = all_crds()["tollway.io_routingpolicies.yaml"]
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.router.replicas",
        "statusReplicasPath": ".status.routerReplicas",
        "labelSelectorPath": ".status.routerSelector",
    }
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["routerSelector"]["type"] == "string"
    assert d.router_selector_text("chat-auto") == (
        "app.kubernetes.io/instance=chat-auto,app.kubernetes.io/name=tollway-router"
    )


def test_the_router_sends_the_key_the_pool_s_vllm_servers_require() -> None:
    keyed = parse_model_pool(
        {
            "apiKeySecret": {"name": "vllm-key", "key": "key"},
            "models": POOL.model_dump(by_alias=True, exclude_none=True)["models"],
        }
    )
    result = d.policy_children(OWNER, policy(), "chat", keyed, {"small": 1, "large": 1})
    backends = {b.name: b for b in result.config.backends}
    # The same variable the router reads for any backend key: `Authorization: Bearer <key>`.
    assert backends["small"].api_key_env == "TOLLWAY_BACKEND_SMALL_API_KEY"
    assert backends["large"].api_key_env == "TOLLWAY_BACKEND_LARGE_API_KEY"
    assert backends["gpt"].api_key_env == "TOLLWAY_BACKEND_GPT_API_KEY"  # the endpoint's own key
    dep = child(result, "Deployment")
    env = {e["name"]: e.get("valueFrom") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOLLWAY_BACKEND_SMALL_API_KEY"] == {"secretKeyRef": {"name": "vllm-key", "key": "key"}}
    assert env["TOLLWAY_BACKEND_GPT_API_KEY"] == {"secretKeyRef": {"name": "openai", "key": "key"}}
    assert plan().config.backends[0].api_key_env is None  # no key, no header


def test_router_prestop_and_grace_cover_its_drain() -> None:
    result = plan()
    pod = child(result, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # The router keeps serving while the endpoints drop it (no connection refused), then drains.
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    drain = result.config.server.drain_seconds
    assert pod["terminationGracePeriodSeconds"] == 5 + drain + 5
