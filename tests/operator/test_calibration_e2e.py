"""Calibration in the cluster, end to end on the Kubernetes emulator with the real operator.

Adding a model to a pool creates one calibration Job, for that model only. Pods do not run on the
emulator, so the test plays the kubelet and the Job controller: it runs the Job's exact rendered
command (`tollway calibrate ...`) as a local process against simulators, with only the cluster's
addresses and mounted paths mapped to local ones, pushing to a local router built from the
router config the operator rendered; then it marks the Job Complete and gives its pod the
termination message the command wrote. The results reach the router (it routes the model with
them, under the revision the operator expects) and the pool's status shows them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import numpy as np
import pytest
import yaml
from operator_testlib import GROUP, VERSION, wait_for
from test_operator_integration import Cluster

from router_service.calibration.dataset import CalibrationItem, load_dataset
from router_service.calibration.simulated import skill_lines, write_skill
from router_service.config import RouterConfig
from router_service.proxy.server import BackgroundRouter
from router_service.routing.history import History, load_builtin_history
from router_service.simulator import SimulatorProfile, SimulatorServer

pytestmark = pytest.mark.timeout(120)

PROFILES = {"small": "mistralai/mistral-7b-chat", "large": "gpt-4-1106-preview"}
SET_KEY = "set.jsonl"
ROUTER_TOKEN = "calibration-e2e-token"


@pytest.fixture(scope="module")
def lines() -> tuple[list[CalibrationItem], History]:
    """40 lines of the built-in set, and the RouterBench columns the two models answer like."""
    items = load_dataset("builtin").items[::47][:40]
    history = load_builtin_history()
    row = {p: i for i, p in enumerate(history.prompts)}
    return items, history.select([row[i.prompt] for i in items]).columns(list(PROFILES.values()))


@pytest.fixture
def simulators(lines, tmp_path: Path):
    items, truth = lines
    sims = {}
    for j, name in enumerate(PROFILES):
        skill = write_skill(skill_lines(items, truth.scores[:, j]), tmp_path / f"{name}.skill.jsonl")
        sims[name] = SimulatorServer(SimulatorProfile(model=name, speedup=200.0, skill=str(skill))).start()
    yield sims
    for sim in sims.values():
        sim.stop()


def pool_body(namespace: str, models: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelPool",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "models": [{"name": m, "model": f"org/{m}", "profile": PROFILES[m]} for m in models],
            "calibration": {
                "dataset": {"configMap": {"name": "calibration-set", "key": SET_KEY}},
                "concurrency": 3,
            },
        },
    }


def policy_body(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": "chat-auto", "namespace": namespace},
        "spec": {
            "poolRef": {"name": "chat"},
            "router": {"replicas": 1, "authSecret": {"name": "router-auth", "key": "tokens"}},
        },
    }


def calibration_jobs(cl: Cluster) -> dict[str, dict[str, Any]]:
    items = (cl.raw(f"/apis/batch/v1/namespaces/{cl.ns}/jobs") or {}).get("items", [])
    return {j["metadata"]["name"]: j for j in items}


def model_status(cl: Cluster, model: str) -> dict[str, Any]:
    status = cl.get("modelpools", "chat").get("status") or {}
    return next((m for m in (status.get("calibration") or {}).get("models", []) if m["name"] == model), {})


def local_command(job: dict[str, Any], mapping: dict[str, str]) -> list[str]:
    """The Job's command with cluster addresses and mounted paths replaced (nothing else)."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    assert command[:2] == ["tollway", "calibrate"]
    out = [str(Path(sys.executable).parent / "tollway")]
    for arg in command[1:]:
        for cluster_value, local_value in mapping.items():
            arg = arg.replace(cluster_value, local_value)
        out.append(arg)
    return out


def play_job_controller(cl: Cluster, job: dict[str, Any], message: str) -> None:
    """What the Job controller and the kubelet would report: a pod that ended with `message`, and
    the Job Complete."""
    name = job["metadata"]["name"]
    labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": name}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-x1y2z",
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}
            ],
        },
        "spec": job["spec"]["template"]["spec"],
    }
    cl.core.create_namespaced_pod(cl.ns, pod)
    terminated = {"exitCode": 0, "reason": "Completed", "message": message}
    cl.core.patch_namespaced_pod_status(
        f"{name}-x1y2z",
        cl.ns,
        {
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "calibrate",
                        "image": job["spec"]["template"]["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
    )
    batch = kubernetes.client.BatchV1Api(cl.api)
    done = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    batch.patch_namespaced_job_status(name, cl.ns, {"status": {"succeeded": 1, "conditions": [done]}})


def run_job_locally(
    cl: Cluster,
    job: dict[str, Any],
    sim: SimulatorServer,
    router: BackgroundRouter,
    tmp_path: Path,
    set_file: Path,
) -> str:
    """Run the Job's command against a simulator and the local router; returns its termination message."""
    model = job["metadata"]["labels"]["tollway.io/model"]
    work = tmp_path / f"work-{model}"
    work.mkdir()
    token = tmp_path / "push-token"
    token.write_text(ROUTER_TOKEN + "\n")
    mapping = {
        f"http://chat-{model}.{cl.ns}.svc.cluster.local:8000": sim.url,
        f"http://chat-auto.{cl.ns}.svc/v1": router.url,
        "/etc/tollway/push/chat-auto/token": str(token),
        f"/etc/tollway/calibration-set/{SET_KEY}": str(set_file),
        "/var/lib/tollway-calibration": str(work),
        "/dev/termination-log": str(work / "termination-log"),
    }
    command = local_command(job, mapping)
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    message = (work / "termination-log").read_text()
    assert len(message.encode()) <= 4096
    return message


def start_local_router(cl: Cluster, sims: dict[str, SimulatorServer], tmp_path: Path) -> BackgroundRouter:
    """The router the operator configured (its ConfigMap), with local addresses and paths."""
    config = cl.config("chat-auto")
    assert config is not None
    wire = config.to_wire()
    for backend in wire["backends"]:
        backend["url"] = sims[backend["name"]].url
    tokens = tmp_path / "router-tokens"
    tokens.write_text(ROUTER_TOKEN + "\n")
    wire["auth"]["bearerTokensFile"] = str(tokens)
    wire["budgets"]["stateFile"] = str(tmp_path / "router-state" / "ledger.json")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(wire))
    return BackgroundRouter(path, reload_interval_seconds=0.1).start()


def refresh_router_config(cl: Cluster, router: BackgroundRouter, tmp_path: Path) -> RouterConfig:
    """Copy what the operator now renders into the router's file (the kubelet's ConfigMap sync)."""
    config = cl.config("chat-auto")
    assert config is not None
    path = tmp_path / "router.yaml"
    wire = yaml.safe_load(path.read_text())
    revisions = {b.name: b.calibration_revision for b in config.backends}
    for backend in wire["backends"]:
        backend["calibrationRevision"] = revisions[backend["name"]]
    path.write_text(yaml.safe_dump(wire))
    return config


def test_adding_a_model_calibrates_that_model_only_and_its_results_reach_the_router_and_the_status(
    cl_calibration: Cluster, simulators: dict[str, SimulatorServer], lines, tmp_path: Path
) -> None:
    cl = cl_calibration
    items, truth = lines
    set_file = tmp_path / SET_KEY
    set_file.write_text("".join(i.model_dump_json(exclude_none=True) + "\n" for i in items))
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "calibration-set"},
        "data": {SET_KEY: set_file.read_text()},
    }
    cl.core.create_namespaced_config_map(cl.ns, cm)
    cl.create(policy_body(cl.ns))
    cl.create(pool_body(cl.ns, ["small"]))

    # One Job, for small; the router is told which revision to expect.
    wait_for(lambda: len(calibration_jobs(cl)) == 1, timeout=20, what="small's calibration Job")
    (small_job,) = calibration_jobs(cl).values()
    small_revision = small_job["metadata"]["labels"]["tollway.io/calibration-revision"]
    assert small_job["metadata"]["labels"]["tollway.io/model"] == "small"
    assert small_job["metadata"]["name"] == f"chat-small-cal-{small_revision}"
    wait_for(lambda: model_status(cl, "small").get("state") == "Pending", what="small Pending")
    wait_for(
        lambda: (
            (cl.config("chat-auto") or RouterConfig.model_construct(backends=[])).backends
            and cl.config("chat-auto").backend("small").calibration_revision == small_revision
        ),  # type: ignore[union-attr]
        what="the router config expects small's revision",
    )

    router = start_local_router(cl, simulators, tmp_path)
    try:
        message = run_job_locally(cl, small_job, simulators["small"], router, tmp_path, set_file)
        play_job_controller(cl, small_job, message)
        wait_for(lambda: model_status(cl, "small").get("state") == "Done", timeout=20, what="small Done")

        # Adding a model: one new Job, for large only; small's is neither re-created nor repeated.
        cl.patch("modelpools", "chat", {"spec": pool_body(cl.ns, ["small", "large"])["spec"]})
        wait_for(lambda: len(calibration_jobs(cl)) == 2, timeout=20, what="large's calibration Job")
        jobs = calibration_jobs(cl)
        assert small_job["metadata"]["name"] in jobs
        assert jobs[small_job["metadata"]["name"]]["metadata"]["uid"] == small_job["metadata"]["uid"]
        (large_job,) = [j for n, j in jobs.items() if n != small_job["metadata"]["name"]]
        assert large_job["metadata"]["labels"]["tollway.io/model"] == "large"
        large_revision = large_job["metadata"]["labels"]["tollway.io/calibration-revision"]
        assert model_status(cl, "small")["revision"] == small_revision  # unchanged

        # The router gets large as a backend (hot reload of the new config).
        def router_has_large() -> bool:
            config = cl.config("chat-auto")
            if config is None or config.backend("large") is None:
                return False
            if config.backend("large").calibration_revision != large_revision:  # type: ignore[union-attr]
                return False
            wire = config.to_wire()
            local = yaml.safe_load((tmp_path / "router.yaml").read_text())
            large = next(b for b in wire["backends"] if b["name"] == "large")
            local["backends"].append({**large, "url": simulators["large"].url})
            (tmp_path / "router.yaml").write_text(yaml.safe_dump(local))
            return True

        wait_for(router_has_large, timeout=20, what="the router config with large")
        wait_for(lambda: router.runtime.state.config.backend("large") is not None, timeout=30, what="reload")

        message = run_job_locally(cl, large_job, simulators["large"], router, tmp_path, set_file)

        # The results reach the router: both models are routed by their measured columns, under
        # the revisions the operator expects.
        engine = router.runtime.state.engine
        assert {m: info["revision"] for m, info in engine.calibrated.items()} == {
            "small": small_revision,
            "large": large_revision,
        }
        stored = router.runtime.store.calibrations()
        for j, model in enumerate(PROFILES):
            scores = {row.prompt: row.score for row in stored[model].rows}
            np.testing.assert_array_equal([scores[i.prompt] for i in items], truth.scores[:, j])

        # ... and the pool's status shows them.
        play_job_controller(cl, large_job, message)
        wait_for(lambda: model_status(cl, "large").get("state") == "Done", timeout=20, what="large Done")
    finally:
        router.stop(timeout=10)
    large = model_status(cl, "large")
    assert large["revision"] == large_revision and large["job"] == large_job["metadata"]["name"]
    assert large["queries"] == large["lines"] == len(items) and large["failed"] == 0
    assert large["meanScore"] == pytest.approx(truth.scores[:, 1].mean(), abs=1e-4)
    for task, t in large["tasks"].items():
        rows = [k for k, i in enumerate(items) if i.task == task]
        assert t == {"queries": len(rows), "meanScore": pytest.approx(truth.scores[rows, 1].mean(), abs=1e-4)}
    assert large["routers"] == ["chat-auto"]
    pool_status = cl.get("modelpools", "chat")["status"]["calibration"]
    assert pool_status["summary"] == "2/2 calibrated"
    wait_for(  # kopf posts Events from a queue, shortly after the reconcile
        lambda: [e.get("reason") for e in cl.events("chat")].count("Calibrated") == 2,
        what="a Calibrated Event per model",
    )

    # A policy created after the calibrations has not got them: the pool's status names it.
    late = policy_body(cl.ns)
    late["metadata"]["name"] = "late"
    cl.create(late)
    for model in ("small", "large"):
        entry = wait_for(
            lambda model=model: (e := model_status(cl, model)).get("missingRouters") == ["late"] and e,
            timeout=20,
            what=f"{model}'s status naming the policy without its results",
        )
        assert entry["state"] == "Done" and "not in the router of late" in entry["message"]
    cl.delete("routingpolicies", "late")
    wait_for(lambda: "missingRouters" not in model_status(cl, "large"), timeout=20, what="late gone")

    # A new revision of large (new weights) replaces its Job; small's stays.
    cl.patch(
        "modelpools",
        "chat",
        {
            "spec": {
                "models": [
                    {"name": "small", "model": "org/small", "profile": PROFILES["small"]},
                    {"name": "large", "model": "org/large-v2", "profile": PROFILES["large"]},
                ]
            }
        },
    )
    wait_for(
        lambda: large_job["metadata"]["name"] not in calibration_jobs(cl) and len(calibration_jobs(cl)) == 2,
        timeout=20,
        what="large's new Job replacing the old one",
    )
    assert small_job["metadata"]["name"] in calibration_jobs(cl)
    assert model_status(cl, "large")["revision"] != large_revision
    assert model_status(cl, "small")["state"] == "Done"


@pytest.fixture
def cl_calibration(api: Any, namespace: str) -> Cluster:
    return Cluster(api, namespace)
