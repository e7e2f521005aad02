"""charts/tollway: lints clean, renders manifests Kubernetes 1.32 accepts, grants least privilege, and
agrees with the plain YAML in manifests/install/."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import kubernetes_validate
import pytest
import yaml
from crd_validation import REPO_ROOT
from kubectl_api import KubeAPI

from tollway_operator import cli, run

KUBERNETES_VERSION = "1.32.0"
CHART = REPO_ROOT / "charts" / "tollway"
CUSTOM_KINDS = {"ServiceMonitor"}  # not in Kubernetes' own schemas
ALL_FLAGS = (
    "--set",
    "serviceMonitor.enabled=true,keda.enabled=true,peering.enabled=true,scrapeConfig.create=true,replicas=2",
)
WATCHED = ("--set", "watchNamespaces={team-a,team-b}")
RENDERINGS = {
    "defaults": (),
    "all-flags-cluster-wide": ALL_FLAGS,
    "all-flags-watched-namespaces": (*ALL_FLAGS, *WATCHED),
    "watched-namespaces": WATCHED,
}

Render = Callable[..., str]


def load_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def objects(text: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [doc for doc in load_docs(text) if kind is None or doc["kind"] == kind]


def the(text: str, kind: str) -> dict[str, Any]:
    (obj,) = objects(text, kind)
    return obj


# --- lint and schema validation ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [(), (*ALL_FLAGS, *WATCHED)], ids=["defaults", "all-flags"])
def test_helm_lint_is_clean(tool: Callable[[str], str], args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [tool("helm"), "lint", "--strict", str(CHART), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", RENDERINGS)
def test_rendered_manifests_pass_kubernetes_validate_strict(
    helm_template: Render, tool: Callable[[str], str], tmp_path: Path, name: str
) -> None:
    rendered = helm_template(*RENDERINGS[name])
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr

    # Everything Kubernetes has a schema for passes; the rest are exactly the expected custom kinds.
    without_schema = set()
    for obj in objects(rendered):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.add(obj["kind"])
    assert without_schema <= CUSTOM_KINDS


def test_peering_installs_kopf_crds_unless_told_not_to(helm_template: Render) -> None:
    rendered = helm_template(*ALL_FLAGS)
    crds = {c["spec"]["names"]["kind"]: c for c in objects(rendered, "CustomResourceDefinition")}
    assert set(crds) == {"ClusterKopfPeering", "KopfPeering"}
    assert {c["spec"]["group"] for c in crds.values()} == {"kopf.dev"}
    assert crds["ClusterKopfPeering"]["spec"]["scope"] == "Cluster"
    assert crds["KopfPeering"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        # shared with any other kopf operator in the cluster: never deleted with this release
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert (
        objects(helm_template(*ALL_FLAGS, "--set", "peering.installCRDs=false"), "CustomResourceDefinition")
        == []
    )


@pytest.mark.parametrize(
    ("args", "kind", "namespaces"),
    [
        (ALL_FLAGS, "ClusterKopfPeering", [None]),
        ((*ALL_FLAGS, *WATCHED), "KopfPeering", ["team-a", "team-b"]),
    ],
    ids=["cluster-wide", "watched-namespaces"],
)
def test_peering_object_once_the_cluster_serves_kopf_dev(
    helm_template: Render, args: tuple[str, ...], kind: str, namespaces: list[str | None]
) -> None:
    # A release cannot hold a new CRD and its objects (Helm maps all objects before creating any) ...
    assert objects(helm_template(*args), kind) == []
    # ... so the object comes with the next upgrade, once kopf.dev is served.
    rendered = helm_template(*args, "--api-versions", f"kopf.dev/v1/{kind}")
    peerings = objects(rendered, kind)
    assert [p["metadata"].get("namespace") for p in peerings] == namespaces
    (crd,) = [c for c in objects(rendered, "CustomResourceDefinition") if c["spec"]["names"]["kind"] == kind]
    for obj in peerings:
        assert obj["apiVersion"] == "kopf.dev/v1" and obj["metadata"]["name"] == "tollway"
        jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(obj)


def test_no_peering_objects_by_default(helm_template: Render) -> None:
    rendered = helm_template()
    kinds = {obj["kind"] for obj in objects(rendered)}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"}


async def test_helm_install_dry_run_renders_notes(kube_api: KubeAPI, tool: Callable[[str], str]) -> None:
    """`helm install` against a (emulated) Kubernetes 1.32: the kubeVersion constraint holds and NOTES render."""
    install = (
        "install",
        "tollway",
        str(CHART),
        "--namespace",
        "tollway-system",
        "--dry-run=client",
        "--disable-openapi-validation",
    )
    result = await kube_api.run(tool("helm"), *install)
    assert result.returncode == 0, result.stderr
    assert "serves ModelPools and RoutingPolicies in all namespaces" in result.stdout
    assert "kubectl -n tollway-system rollout status deployment/tollway" in result.stdout
    assert "files/prometheus-scrape-config.yaml" in result.stdout
    assert "customresourcedefinition" not in result.stdout.lower().split("notes:")[1]

    # ServiceMonitors need prometheus-operator's CRD: without it the install says so ...
    result = await kube_api.run(tool("helm"), *install, *ALL_FLAGS, *WATCHED)
    assert result.returncode != 0
    assert 'no matches for kind "ServiceMonitor" in version "monitoring.coreos.com/v1"' in result.stderr
    # ... and with it, everything installs.
    kube_api.emulator.resources[kmock.resource("monitoring.coreos.com", "v1", "servicemonitors")] = (
        kmock.ResourceInfo(
            namespaced=True,
            kind="ServiceMonitor",
            singular="servicemonitor",
            verbs={"get", "list", "create", "patch"},
        )
    )
    result = await kube_api.run(tool("helm"), *install, *ALL_FLAGS, *WATCHED)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:")[1]
    assert "in these namespaces: team-a, team-b" in notes
    assert 'Peering is on (2 replicas, peering object "tollway")' in notes
    assert "Run `helm upgrade` once more with the same values to create the KopfPeering" in notes
    assert "ServiceMonitors tollway-model-servers, tollway-routers and tollway-operator" in notes


# --- the operator Deployment --------------------------------------------------------------------------


def operator_container(rendered: str) -> dict[str, Any]:
    (container,) = the(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def operator_deployment(rendered: str) -> dict[str, Any]:
    """The operator's Deployment, among others the chart may run (the in-chart Redis)."""
    (deployment,) = [d for d in objects(rendered, "Deployment") if d["metadata"]["name"] == "tollway"]
    return deployment


def test_deployment_defaults(helm_template: Render) -> None:
    rendered = helm_template()
    deployment = the(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(rendered)
    assert deployment["metadata"]["namespace"] == "tollway-system"
    assert deployment["spec"]["replicas"] == 1
    assert container["image"] == "ghcr.io/tollway/tollway:0.1.0"
    assert container["command"] == ["tollway"]
    assert container["args"] == [
        "operator",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=8090",
        "--standalone",
        "--all-namespaces",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TOLLWAY_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring.svc:9090"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 8090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["serviceAccountName"] == the(rendered, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["memory"] == "512Mi"


def test_the_operator_runs_routers_and_simulators_from_its_own_image(helm_template: Render) -> None:
    """A private mirror set once (image.repository) serves the routers, simulators and calibration
    Jobs too: the operator's default for them is its own image."""
    for values, image in (
        ((), "ghcr.io/tollway/tollway:0.1.0"),
        (("--set", "image.repository=mirror.example/ml/tollway", "--set", "image.tag=0.1.0-rc1"),
         "mirror.example/ml/tollway:0.1.0-rc1"),
    ):  # fmt: skip
        container = operator_container(helm_template(*values))
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert container["image"] == env["TOLLWAY_IMAGE"] == image


def test_deployment_follows_values(helm_template: Render) -> None:
    rendered = helm_template(
        *WATCHED,
        "--set",
        "replicas=3,logLevel=debug,image.tag=1.2.3,prometheusUrl=http://prom:9090,probes.port=9000",
        "--set",
        "resources.requests.cpu=250m",
    )
    container = operator_container(rendered)
    assert the(rendered, "Deployment")["spec"]["replicas"] == 3
    assert container["image"] == "ghcr.io/tollway/tollway:1.2.3"
    assert container["args"] == [
        "operator",
        "--debug",
        "--liveness=http://0.0.0.0:9000/healthz",
        "--metrics-port=8090",
        "--peering=tollway",  # more than one replica: kopf peering keeps one active
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert {e["name"]: e.get("value") for e in container["env"]}[
        "TOLLWAY_PROMETHEUS_URL"
    ] == "http://prom:9090"
    assert container["resources"]["requests"]["cpu"] == "250m"


@pytest.mark.parametrize("name", RENDERINGS)
def test_container_command_is_a_valid_tollway_operator_command_line(helm_template: Render, name: str) -> None:
    """The chart and `tollway operator` agree on the command line (parsed by the operator's own parser)."""
    container = operator_container(helm_template(*RENDERINGS[name]))
    assert container["command"] == ["tollway"] and container["args"][0] == "operator"
    assert cli.SUBCOMMANDS["operator"][0] == "tollway_operator.run"
    args = run.build_parser().parse_args(container["args"][1:])
    kopf = run.kopf_args(args)
    assert ("--all-namespaces" in kopf) == ("watchNamespaces" not in " ".join(RENDERINGS[name]))
    assert ("--standalone" in kopf) == ("replicas=2" not in " ".join(RENDERINGS[name]))
    assert kopf[kopf.index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"
    assert args.metrics_port == 8090


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "logLevel=warning"), 'logLevel: logLevel must be one of the following: "debug", "info"'),
        (("--set", "watchNamespaces={Team_A}"), "watchNamespaces.0: Does not match pattern"),
        (
            ("--set", "watchNamespaces=team-a"),
            "watchNamespaces: Invalid type. Expected: array, given: string",
        ),
        (("--set", "prometheusUrl=prometheus:9090"), "prometheusUrl: Does not match pattern '^https?://'"),
        (("--set", "replicas=-1"), "replicas: Must be greater than or equal to 0"),
        (("--set", "redis.url=http://redis:6379"), "redis.url: Does not match pattern"),
        (("--set", "imag.tag=1.0"), "Additional property imag is not allowed"),
        (
            ("--set", "serviceAccount.create=false"),
            "serviceAccount.name is required when serviceAccount.create is false",
        ),
    ],
    ids=[
        "log-level",
        "namespace-name",
        "namespaces-not-list",
        "prometheus-url",
        "replicas",
        "redis-url",
        "typo",
        "service-account",
    ],
)
def test_bad_values_fail_with_a_message(
    tool: Callable[[str], str], args: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        [tool("helm"), "template", "t", str(CHART), *args], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --- RBAC ------------------------------------------------------------------------------------------------

# What the operator uses, and nothing else: (apiGroup, resource) -> verbs. e2e/test_rbac.py checks these
# against every call the operator makes in the e2e run (the API server's audit log); this pins the render.
OPERATOR_RULES = {
    ("tollway.io", "modelpools"): {"get", "list", "watch", "patch"},
    ("tollway.io", "routingpolicies"): {"get", "list", "watch", "patch"},
    ("tollway.io", "modelpools/status"): {"patch"},
    ("tollway.io", "routingpolicies/status"): {"patch"},
    ("tollway.io", "modelpools/finalizers"): {"update"},
    ("tollway.io", "routingpolicies/finalizers"): {"update"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"list", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    # The router's ServiceAccount, Role and RoleBinding (EndpointSlices read access), which the
    # operator may only grant because it holds that access itself.
    ("", "serviceaccounts"): {"get", "list", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "list", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "list", "create", "patch", "delete"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
}
KEDA_RULES = {("keda.sh", "scaledobjects"): {"get", "list", "create", "patch", "delete"}}
PEERING_VERBS = {"list", "watch", "create", "patch"}
FORBIDDEN = {
    "secrets",
    "customresourcedefinitions",
    "namespaces",
    "pods/exec",
    "nodes",
    "clusterroles",
    "clusterrolebindings",
}


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("name", RENDERINGS)
def test_rbac_has_no_wildcards_and_no_secrets(helm_template: Render, name: str) -> None:
    for role in objects(helm_template(*RENDERINGS[name]), "ClusterRole") + objects(
        helm_template(*RENDERINGS[name]), "Role"
    ):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{role['metadata']['name']}: wildcard in {key}: {rule}"
            assert not FORBIDDEN & set(rule["resources"]), f"{role['metadata']['name']} grants {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_rbac_default_is_exactly_what_the_operator_needs(helm_template: Render) -> None:
    rendered = helm_template()
    (role,) = objects(rendered, "ClusterRole")
    assert grants(role) == OPERATOR_RULES
    (binding,) = objects(rendered, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "tollway",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tollway", "namespace": "tollway-system"}
    ]
    assert objects(rendered, "RoleBinding") == []


def test_rbac_flags_add_only_their_rules(helm_template: Render) -> None:
    rendered = helm_template(*ALL_FLAGS)
    roles = {r["metadata"]["name"]: grants(r) for r in objects(rendered, "ClusterRole")}
    assert roles == {
        "tollway": OPERATOR_RULES | KEDA_RULES,
        "tollway-peering": {("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS},
    }


def test_rbac_watched_namespaces_bind_only_there(helm_template: Render) -> None:
    rendered = helm_template(*ALL_FLAGS, *WATCHED)
    assert objects(rendered, "ClusterRoleBinding") == [], (
        "a namespaced install must grant nothing cluster-wide"
    )
    roles = {r["metadata"]["name"]: grants(r) for r in objects(rendered, "ClusterRole")}
    assert roles["tollway-peering"] == {("kopf.dev", "kopfpeerings"): PEERING_VERBS}
    bound = sorted(
        (b["metadata"]["namespace"], b["roleRef"]["name"]) for b in objects(rendered, "RoleBinding")
    )
    assert bound == [
        ("team-a", "tollway"),
        ("team-a", "tollway-peering"),
        ("team-b", "tollway"),
        ("team-b", "tollway-peering"),
    ]
    for binding in objects(rendered, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "tollway", "namespace": "tollway-system"}
        ]


# --- metrics -------------------------------------------------------------------------------------------

VLLM_RELABEL = {
    "source_labels": ["__name__"],
    "regex": "vllm_(.+)",
    "target_label": "__name__",
    "replacement": "vllm:$1",
}


def test_service_monitors_select_operator_children_and_restore_vllm_names(helm_template: Render) -> None:
    assert objects(helm_template(), "ServiceMonitor") == []
    monitors = {m["metadata"]["name"]: m for m in objects(helm_template(*ALL_FLAGS), "ServiceMonitor")}
    assert set(monitors) == {"tollway-model-servers", "tollway-routers", "tollway-operator"}
    vllm, router = monitors["tollway-model-servers"]["spec"], monitors["tollway-routers"]["spec"]
    assert vllm["selector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "tollway",
        "app.kubernetes.io/component": "model-server",
    }
    assert router["selector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert vllm["namespaceSelector"] == {"any": True}
    (endpoint,) = vllm["endpoints"]
    assert endpoint["metricRelabelings"] == [
        {
            "sourceLabels": ["__name__"],
            "regex": "vllm_(.+)",
            "targetLabel": "__name__",
            "replacement": "vllm:$1",
        }
    ]
    watched = objects(helm_template(*ALL_FLAGS, *WATCHED), "ServiceMonitor")
    children = [m for m in watched if m["metadata"]["name"] != "tollway-operator"]
    assert len(children) == 2
    assert all(m["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]} for m in children)


def test_scrape_config_configmap_carries_the_shipped_file(helm_template: Render) -> None:
    (cm,) = objects(helm_template(*ALL_FLAGS), "ConfigMap")
    shipped = (CHART / "files" / "prometheus-scrape-config.yaml").read_text()
    assert cm["data"]["prometheus-scrape-config.yaml"].strip() == shipped.strip()


# --- the operator's own metrics ------------------------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize(
    "args",
    [(), ("--set", "metrics.port=9100,redis.enabled=true", *ALL_FLAGS)],
    ids=["defaults", "all-flags-and-redis"],
)
def test_metrics_service_selects_the_operator_pods_on_their_metrics_port(
    helm_template: Render, args: tuple[str, ...]
) -> None:
    rendered = helm_template(*args)
    services = {s["metadata"]["name"]: s for s in objects(rendered, "Service")}
    service = services["tollway-metrics"]
    assert service["metadata"]["namespace"] == "tollway-system"
    deployment = operator_deployment(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    # ... and nothing else the chart runs (the in-chart Redis has pods too).
    workloads = objects(rendered, "Deployment") + objects(rendered, "StatefulSet")
    others = [w for w in workloads if w["metadata"]["name"] != "tollway"]
    assert not any(
        selects(service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"]) for o in others
    )

    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_port = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert port["name"] == "metrics" and container_port["name"] == "metrics"
    assert port["port"] == container_port["containerPort"]
    assert f"--metrics-port={container_port['containerPort']}" in container["args"]


def test_operator_service_monitor_only_with_the_flag_and_it_selects_the_metrics_service(
    helm_template: Render,
) -> None:
    assert "tollway-operator" not in {
        m["metadata"]["name"] for m in objects(helm_template(), "ServiceMonitor")
    }
    rendered = helm_template(*ALL_FLAGS, *WATCHED)
    (monitor,) = [
        m for m in objects(rendered, "ServiceMonitor") if m["metadata"]["name"] == "tollway-operator"
    ]
    service = next(s for s in objects(rendered, "Service") if s["metadata"]["name"] == "tollway-metrics")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["tollway-system"]}
    assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in spec["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    # The monitors of the model servers and routers do not pick up the operator's Service.
    for other in objects(rendered, "ServiceMonitor"):
        if other["metadata"]["name"] != "tollway-operator":
            assert not selects(other["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


# --- manifests/install --------------------------------------------------------------------------------


def test_install_manifests_are_the_charts_default_render(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(repo_root / ".ci" / "render-install-manifests"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_install_manifests_need_no_helm(repo_root: Path, helm_template: Render) -> None:
    install = repo_root / "manifests" / "install"
    docs = [doc for path in sorted(install.glob("*.yaml")) for doc in load_docs(path.read_text())]
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Namespace",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        labels = doc["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels and labels.get("app.kubernetes.io/managed-by") != "Helm"
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    assert all(d["metadata"].get("namespace", "tollway-system") == "tollway-system" for d in docs)
    assert namespace["metadata"]["name"] == "tollway-system"
    chart_deployment = the(helm_template(), "Deployment")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert (
        deployment["spec"]["template"]["spec"]["containers"]
        == chart_deployment["spec"]["template"]["spec"]["containers"]
    )


# --- shared state for the routers (Redis) ----------------------------------------------------------


def operator_env(rendered: str) -> dict[str, dict[str, Any]]:
    (container,) = operator_deployment(rendered)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_no_redis_and_no_router_state_url_by_default(helm_template: Render) -> None:
    assert "TOLLWAY_ROUTER_STATE_URL" not in operator_env(helm_template())


def test_in_chart_redis_is_valid_persistent_and_the_operators_default(helm_template: Render) -> None:
    rendered = helm_template("--set", "redis.enabled=true,redis.persistence.storageClassName=fast")
    redis_objects = [o for o in objects(rendered) if o["metadata"]["name"] == "tollway-redis"]
    assert sorted(o["kind"] for o in redis_objects) == ["Deployment", "PersistentVolumeClaim", "Service"]
    for obj in redis_objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    (deployment,) = [o for o in redis_objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    # Durable (append-only file on the claim) and never evicting a budget key.
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "tollway-redis"}}]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (claim,) = [o for o in redis_objects if o["kind"] == "PersistentVolumeClaim"]
    assert (
        claim["spec"]["storageClassName"] == "fast"
        and claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    )
    (service,) = [o for o in redis_objects if o["kind"] == "Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert operator_env(rendered)["TOLLWAY_ROUTER_STATE_URL"]["value"] == (
        "redis://tollway-redis.tollway-system.svc:6379/0"
    )
    scratch = helm_template("--set", "redis.enabled=true,redis.persistence.enabled=false")
    assert not objects(scratch, "PersistentVolumeClaim")
    (deployment,) = [d for d in objects(scratch, "Deployment") if d["metadata"]["name"] == "tollway-redis"]
    assert deployment["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_an_existing_redis_by_url_or_secret(helm_template: Render) -> None:
    by_url = helm_template("--set", "redis.url=redis://shared-redis.infra:6379/4")
    assert operator_env(by_url)["TOLLWAY_ROUTER_STATE_URL"]["value"] == "redis://shared-redis.infra:6379/4"
    assert [d["metadata"]["name"] for d in objects(by_url, "Deployment")] == ["tollway"]
    by_secret = helm_template("--set", "redis.url=redis://ignored:6379/0,redis.existingSecret.name=redis-url")
    assert operator_env(by_secret)["TOLLWAY_ROUTER_STATE_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-url", "key": "url"}
    }


def test_simulate_default_reaches_the_operator(helm_template: Render) -> None:
    """simulate.default=true: pools that do not choose run simulators (state.simulate_default)."""
    from tollway_operator import state

    assert state.SIMULATE_ENV not in operator_env(helm_template())
    env = operator_env(helm_template("--set", "simulate.default=true"))
    assert env[state.SIMULATE_ENV] == {"name": state.SIMULATE_ENV, "value": "true"}
