"""The apply logic of the I/O adapter: when to patch, and what."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tollway_operator import kube as k


def desired(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x", "namespace": "ns", "labels": {"a": "1"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}}} | spec,
    }


def live_from(obj: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a server would return: our object (with the last-applied record) plus defaults."""
    live = k.with_last_applied(obj)
    live["metadata"] |= {"uid": "u", "resourceVersion": "7"}
    live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    live["spec"] |= extra
    live["status"] = {"readyReplicas": 2}
    return live


def test_contains_tolerates_server_defaults() -> None:
    assert k.contains({"a": 1, "b": [{"x": 1, "y": 2}], "c": 3}, {"a": 1, "b": [{"x": 1}]})
    assert not k.contains({"a": 1, "b": [{"x": 1}, {"x": 2}]}, {"b": [{"x": 1}]})  # list length matters
    assert not k.contains({"a": "1"}, {"a": 1})
    assert not k.contains({"a": 1}, {"a": True})
    assert k.contains({"a": 1.0}, {"a": 1})


def test_quantities_compare_by_value_as_the_api_server_normalises_them() -> None:
    """The API server stores `cpu: 1` as "1", `1024Mi` as "1Gi", `0.5` as "500m"."""
    written = {"resources": {"requests": {"cpu": 1, "memory": "1024Mi"}, "limits": {"cpu": 0.5}}}
    stored = {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "500m"}}}
    assert k.contains(stored, written)
    assert k.contains({"emptyDir": {"sizeLimit": "512Mi"}}, {"emptyDir": {"sizeLimit": "0.5Gi"}})
    assert not k.contains(stored, {"resources": {"requests": {"cpu": 2}}})
    assert not k.contains({"requests": {"cpu": "bogus"}}, {"requests": {"cpu": 1}})
    assert not k.contains({"args": ["1"]}, {"args": [1]})  # elsewhere types still matter
    obj = desired()
    obj["spec"]["template"]["spec"]["containers"][0]["resources"] = written
    live = live_from(obj)
    live["spec"]["template"]["spec"]["containers"][0]["resources"] = stored
    assert k.apply_patch(live, obj) is None


def test_no_patch_when_live_matches() -> None:
    obj = desired()
    assert k.apply_patch(live_from(obj, progressDeadlineSeconds=600), obj) is None


def test_drift_is_patched_back() -> None:
    obj = desired()
    live = live_from(obj)
    live["spec"]["replicas"] = 5
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "hacked"
    patch = k.apply_patch(live, obj)
    assert patch is not None
    assert patch["spec"]["replicas"] == 2
    assert patch["spec"]["template"]["spec"]["containers"][0]["image"] == "i:1"
    assert "namespace" not in patch["metadata"]


def test_removed_fields_are_nulled() -> None:
    old = desired()
    old["metadata"]["labels"]["gone"] = "yes"
    old["spec"]["template"]["spec"]["nodeSelector"] = {"gpu": "a100"}
    live = live_from(old)
    patch = k.apply_patch(live, desired())
    assert patch is not None
    assert patch["metadata"]["labels"] == {"a": "1", "gone": None}
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    # ... and the record is updated so the next apply is quiet
    record = json.loads(patch["metadata"]["annotations"][k.LAST_APPLIED])
    assert "nodeSelector" not in record["spec"]["template"]["spec"]


def test_replicas_left_out_of_the_desired_state_are_never_nulled() -> None:
    """KEDA mode: the operator sets spec.replicas on creation and then leaves it to KEDA. A merge
    patch with `replicas: null` would make the API server default it to 1 (waking a scaled-to-zero
    model), so replicas is never a removal, also from records written before this rule."""
    created = desired(replicas=0)
    live = live_from(created)  # its record still has spec.replicas, as older versions wrote it
    later = desired()
    del later["spec"]["replicas"]
    assert k.apply_patch(live, later) is None
    later["spec"]["template"]["spec"]["containers"][0]["image"] = "i:2"
    patch = k.apply_patch(live, later)
    assert patch is not None and "replicas" not in patch["spec"]
    assert "replicas" not in json.loads(patch["metadata"]["annotations"][k.LAST_APPLIED])["spec"]


def test_fields_set_by_others_are_left_alone() -> None:
    obj = desired()
    live = live_from(obj)
    live["metadata"]["annotations"]["someone/else"] = "keep"
    live["metadata"]["labels"]["foreign"] = "keep"
    assert k.apply_patch(live, obj) is None


def test_kinds_and_paths() -> None:
    assert k.kind_of(desired()) is k.DEPLOYMENT
    assert k.DEPLOYMENT.path("ns", "x", "status") == "/apis/apps/v1/namespaces/ns/deployments/x/status"
    assert k.SERVICE.path("ns") == "/api/v1/namespaces/ns/services"
    with pytest.raises(ValueError, match="does not manage"):
        k.kind_of({"apiVersion": "v1", "kind": "Pod"})


# --- adopting an object that holds a child's name ----------------------------------------------------------

POOL_REF = {"apiVersion": "tollway.io/v1alpha1", "kind": "ModelPool", "name": "p", "uid": "pool-2"}


class RecordingKube(k.Kube):
    """A Kube whose API answers from `objects` (path -> object); a POST of an existing path is a 409."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, str]] = []

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        self.calls.append((method, path))
        if method == "POST":
            path = f"{path}/{body['metadata']['name']}"
            if path in self.objects:
                raise k.ApiError(409, "AlreadyExists", "taken")
            self.objects[path] = body
            return body
        if path not in self.objects:
            raise k.ApiError(404, "NotFound", "")
        if method == "PATCH":
            self.objects[path] = k.deep_merge(json.loads(json.dumps(self.objects[path])), body)
        return self.objects[path]


def owned_child() -> dict[str, Any]:
    obj = desired()
    obj["metadata"]["ownerReferences"] = [POOL_REF | {"controller": True, "blockOwnerDeletion": True}]
    return obj


def orphan() -> dict[str, Any]:
    """The child as the garbage collector left it after `kubectl delete --cascade=orphan` of its old owner."""
    live = live_from(desired())
    live["metadata"]["ownerReferences"] = []
    return live


CHILD = "/apis/apps/v1/namespaces/ns/deployments/x"
POOL = "/apis/tollway.io/v1alpha1/namespaces/ns/modelpools/p"


async def test_an_orphan_holding_the_name_is_adopted_by_a_live_owner() -> None:
    kube = RecordingKube({CHILD: orphan(), POOL: {"metadata": {"name": "p", "uid": "pool-2"}}})
    result, obj = await kube.apply(owned_child(), live=None)
    assert result == "updated"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "pool-2"
    assert [m for m, _ in kube.calls] == ["POST", "GET", "GET", "PATCH"]


@pytest.mark.parametrize(
    "owner",
    [
        None,  # gone
        {"metadata": {"name": "p", "uid": "pool-2", "deletionTimestamp": "2026-01-01T00:00:00Z"}},
        {"metadata": {"name": "p", "uid": "pool-3"}},  # deleted and created again since the read
    ],
)
async def test_an_orphan_is_not_handed_to_an_owner_being_deleted(owner: dict[str, Any] | None) -> None:
    """Else the garbage collector would delete what `--cascade=orphan` meant to keep."""
    kube = RecordingKube({CHILD: orphan()} | ({POOL: owner} if owner else {}))
    with pytest.raises(k.ApiError) as raised:
        await kube.apply(owned_child(), live=None)
    assert raised.value.status == 409 and raised.value.reason == "OwnerDeleted"
    assert "PATCH" not in [m for m, _ in kube.calls]
    assert kube.objects[CHILD]["metadata"]["ownerReferences"] == []


async def test_a_child_already_owned_needs_no_owner_check() -> None:
    live = live_from(owned_child())
    kube = RecordingKube({CHILD: live})
    result, _ = await kube.apply(owned_child(), live=None)
    assert result == "unchanged"
    assert kube.calls == [("POST", "/apis/apps/v1/namespaces/ns/deployments"), ("GET", CHILD)]
