"""End-to-end: uninstalling tollway never strands a namespace.

Its own release and namespace: the chart installed, the operator run as the chart's ServiceAccount,
an autoscaled pool (the autoscaler at work on it) and its policy. Then the operator stops, `helm
uninstall` removes the chart, and deleting the namespace must complete within 60 s: nothing of
tollway's may hold a finalizer that only a running operator would remove.
"""

from __future__ import annotations

import copy
import time

import pytest
from e2e_lib import Cluster, in_cluster_operator, own_release, real_cluster_only, run_operator
from test_lifecycle import examples, hf_token_secret

pytestmark = pytest.mark.timeout(400)
NAMESPACE_DELETION_LIMIT_S = 60


def test_uninstall_then_namespace_deletion_completes(
    cluster: Cluster, crds: None, keda_crd: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cl = cluster
    real_cluster_only(cl, "helm, RBAC and a namespace controller")
    if in_cluster_operator():
        pytest.skip("runs its own operator next to its own release (TOLLWAY_E2E_OPERATOR=in-cluster)")
    workdir = tmp_path_factory.mktemp("uninstall")
    # After a failure, own_release leaves nothing of this test's behind.
    with own_release(cl, "tollway-e2e-uninstall", workdir) as (namespace, kubeconfig):
        pool, policy = copy.deepcopy(examples(namespace))
        pool["spec"]["autoscaling"]["intervalSeconds"] = 1
        with run_operator(kubeconfig, namespace, workdir / "operator.log") as operator:
            cl.apply([hf_token_secret(namespace), pool, policy])
            cl.wait_for(
                lambda: {"chat-small", "chat-auto-router"} <= cl.names("deployments", namespace=namespace),
                "the children",
            )
            autoscaled = cl.wait_for(
                lambda: (
                    (p := cl.get("modelpool", "chat", namespace=namespace))
                    and (p.get("status") or {}).get("autoscaling", {}).get("lastEvaluationTime")
                    and p
                ),
                "the autoscaler's first evaluation",
            )
            # Let the autoscaler and the resync loop run a few more rounds on the pool.
            time.sleep(3 * max(operator.resync_seconds, 1))
            autoscaled = cl.get("modelpool", "chat", namespace=namespace)
            assert not autoscaled["metadata"].get("finalizers"), autoscaled["metadata"]["finalizers"]
            assert not cl.get("routingpolicy", "chat-auto", namespace=namespace)["metadata"].get("finalizers")
        cl.helm("uninstall", namespace, "--namespace", namespace, "--wait")
        started = time.monotonic()
        cl.kubectl("delete", "namespace", namespace, "--wait=false")
        try:
            gone = cl.wait_for(
                lambda: (
                    cl.kubectl("get", "namespace", namespace, check=False).returncode != 0
                    and time.monotonic()
                ),
                "the namespace deleted",
                timeout=NAMESPACE_DELETION_LIMIT_S,
            )
        except AssertionError as e:
            ns = cl.get("namespace", namespace) or {}
            raise AssertionError(
                f"{e}; the namespace's conditions: {ns.get('status', {}).get('conditions')}"
            ) from None
        assert gone - started <= NAMESPACE_DELETION_LIMIT_S
