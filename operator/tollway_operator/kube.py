"""A thin async adapter over the Kubernetes API for the operator's children.

`Kube.apply(obj)` makes one object look like the desired manifest: create it when absent, else
send a JSON merge patch with the desired fields (and `null` for fields that an earlier apply set
and the desired state no longer has — remembered in the `tollway.io/last-applied` annotation,
like kubectl's last-applied-configuration; `spec.replicas` is never removed, see SHARED_FIELDS). Nothing is sent when the live object already contains
the desired state, so drift repair costs one GET per child. `list_children`/`delete` find and
remove children that the desired state no longer has.

Credentials: the in-cluster service account, else `$KUBECONFIG` (read at connect time, not at
import), else ~/.kube/config. Uses `kubernetes.aio` (the official client's asyncio flavour).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode

from kubernetes.aio import client as aio_client
from kubernetes.aio import config as aio_config
from kubernetes.utils.quantity import parse_quantity

log = logging.getLogger("tollway.kube")

LAST_APPLIED = "tollway.io/last-applied"
MERGE_PATCH = "application/merge-patch+json"

ApplyResult = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


DEPLOYMENT = Kind("apps", "v1", "deployments", "Deployment")
STATEFULSET = Kind("apps", "v1", "statefulsets", "StatefulSet")
NETWORK_POLICY = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
SERVICE = Kind("", "v1", "services", "Service")
CONFIGMAP = Kind("", "v1", "configmaps", "ConfigMap")
PVC = Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
PDB = Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
JOB = Kind("batch", "v1", "jobs", "Job")
POD = Kind("", "v1", "pods", "Pod")
"""Only listed (the scheduler's reasons; calibration pods' termination messages), never applied."""
SCALED_OBJECT = Kind("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject")
MODELPOOL = Kind("tollway.io", "v1alpha1", "modelpools", "ModelPool")
ROUTINGPOLICY = Kind("tollway.io", "v1alpha1", "routingpolicies", "RoutingPolicy")
SERVICE_ACCOUNT = Kind("", "v1", "serviceaccounts", "ServiceAccount")
ROLE = Kind("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLE_BINDING = Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
KOPF_PEERING = Kind("kopf.dev", "v1", "kopfpeerings", "KopfPeering")
CLUSTER_KOPF_PEERING = Kind("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering")

KINDS = {
    (k.api_version, k.kind): k
    for k in (
        DEPLOYMENT,
        STATEFULSET,
        NETWORK_POLICY,
        SERVICE,
        CONFIGMAP,
        PVC,
        PDB,
        JOB,
        SCALED_OBJECT,
        SERVICE_ACCOUNT,
        ROLE,
        ROLE_BINDING,
        MODELPOOL,
        ROUTINGPOLICY,
        KOPF_PEERING,
        CLUSTER_KOPF_PEERING,
    )
}
CREATE_ONLY = {PVC, JOB}
"""Kinds whose spec is immutable after creation: created, never patched (a cache claim's size is
expanded apart, `reconcile`)."""
WORKLOAD_KINDS = {"Deployment": DEPLOYMENT, "StatefulSet": STATEFULSET}
"""The kinds a model runs as (`desired.workload_kind`)."""


def kind_of(obj: Mapping[str, Any]) -> Kind:
    try:
        return KINDS[obj["apiVersion"], obj["kind"]]
    except KeyError:
        raise ValueError(f"tollway does not manage {obj.get('apiVersion')}/{obj.get('kind')}") from None


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit tested)
# ---------------------------------------------------------------------------------------------


QUANTITY_MAPS = frozenset({"limits", "requests"})
"""Maps whose values are Kubernetes quantities (a container's resources)."""
QUANTITY_FIELDS = frozenset({"sizeLimit"})
"""Fields that are quantities themselves (an emptyDir's size limit)."""


def same_quantity(live: Any, desired: Any) -> bool:
    """Whether two quantities are equal in value: the API server stores them normalised (`cpu: 1`
    as "1", `1024Mi` as "1Gi", `0.5` as "500m")."""
    if isinstance(live, bool) or isinstance(desired, bool):
        return False
    try:
        return bool(parse_quantity(str(live)) == parse_quantity(str(desired)))
    except ValueError:
        return False


def contains(live: Any, desired: Any, quantity: bool = False) -> bool:
    """Whether `live` already has every field of `desired` (the server may add defaults: extra
    keys in dicts are fine; lists must have the same length, item by item; quantities compare by
    value)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v, quantity or k in QUANTITY_MAPS or k in QUANTITY_FIELDS)
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    if quantity and live != desired:
        return same_quantity(live, desired)
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return live == desired
    return live == desired


def removals(previous: Any, desired: Any) -> Any:
    """A merge patch of `null`s for the map keys `previous` had and `desired` has not (lists are
    replaced whole by a merge patch, so only maps need it). None when nothing is removed."""
    if not isinstance(previous, Mapping) or not isinstance(desired, Mapping):
        return None
    out: dict[str, Any] = {}
    for key, value in previous.items():
        if key not in desired:
            out[key] = None
        else:
            sub = removals(value, desired[key])
            if sub:
                out[key] = sub
    return out or None


def deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


SHARED_FIELDS = (("spec", "replicas"),)
"""Fields that others own once they are set (the autoscaler, KEDA's HPA, `kubectl scale`): tollway
sets them when it has a value for them, and never records or removes them. Removing one would send
`null`, which the API server replaces with its default (`replicas: 1` wakes a model at zero)."""


def _record(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the last-applied annotation keeps of an object: everything but status and the shared
    fields (also applied to records that older versions wrote)."""
    record = {k: json.loads(json.dumps(v)) for k, v in obj.items() if k != "status"}
    for path in SHARED_FIELDS:
        parent: Any = record
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return record


def with_last_applied(desired: Mapping[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(desired))
    record = json.dumps(_record(obj), sort_keys=True, separators=(",", ":"))
    obj.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED] = record
    return obj


def apply_patch(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes `live` match `desired`, or None if it already does."""
    annotated = with_last_applied(desired)
    raw_previous = (live.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        previous = _record(json.loads(raw_previous)) if raw_previous else None
    except (ValueError, AttributeError):
        previous = None
    removed = removals(previous, annotated) if previous else None
    # The record itself may be stale (e.g. replicas the autoscaler changed): not a reason to patch.
    if contains(live, desired) and not removed:
        return None
    patch = json.loads(json.dumps(annotated))
    patch.get("metadata", {}).pop("namespace", None)
    if removed:
        patch = deep_merge(removed, patch)
    return patch


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


async def connect() -> aio_client.ApiClient:
    """An API client for the cluster this process runs in, or the one $KUBECONFIG names."""
    configuration = aio_client.Configuration()
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        aio_config.load_incluster_config(client_configuration=configuration)
    else:
        path = kubeconfig.split(os.pathsep)[0] if kubeconfig else os.path.expanduser("~/.kube/config")
        await aio_config.load_kube_config(config_file=path, client_configuration=configuration)
    return aio_client.ApiClient(configuration)


class Kube:
    """Create / read / patch / delete children through the REST paths (any kind, one code path)."""

    def __init__(self, api: aio_client.ApiClient) -> None:
        self.api = api

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        await self.api.update_params_for_auth(headers, [], ["BearerToken"], path, method, body)
        url = self.api.configuration.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
        response = await self.api.rest_client.request(
            method, url, headers=headers, body=body, _request_timeout=30
        )
        data = await response.read()
        payload: dict[str, Any] = {}
        if data:
            try:
                payload = json.loads(data)
            except ValueError:
                payload = {"message": data.decode(errors="replace")[:500]}
        if not 200 <= response.status < 300:
            raise ApiError(
                response.status,
                str(payload.get("reason") or response.reason),
                str(payload.get("message") or ""),
            )
        return payload

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", kind.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(
        self, kind: Kind, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """The objects of one kind, each with its `apiVersion` and `kind` (an API server leaves them
        out of a built-in kind's list items; without them no listed object would match its
        desired manifest)."""
        query = {"labelSelector": label_selector} if label_selector else None
        try:
            items = (await self.request("GET", kind.path(namespace), query=query)).get("items") or []
        except ApiError as e:
            if e.status == 404 and kind in (SCALED_OBJECT, PDB):
                return []  # the API (KEDA, policy/v1) is not installed
            raise
        return [{**item, "apiVersion": kind.api_version, "kind": kind.kind} for item in items]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind = kind_of(obj)
        return await self.request("POST", kind.path(obj["metadata"].get("namespace")), body=obj)

    async def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: Any, subresource: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH", kind.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH
        )

    async def patch_status(
        self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self.patch(kind, namespace, name, {"status": dict(status)}, subresource="status")

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        try:
            await self.request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def _check_adoption(self, desired: Mapping[str, Any], live: Mapping[str, Any]) -> None:
        """Before a patch takes over an object that holds a child's name but is not the owner's (an
        orphan, e.g. of `kubectl delete --cascade=orphan`): the owner must still exist, not being
        deleted. A reconcile that read its owner just before such a deletion would otherwise hand the
        orphans back to the dying owner, and the garbage collector would delete them with it. Raises
        a 409 (the reconcile starts again from a fresh read of its owner)."""
        ref = next((r for r in desired["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
        if ref is None or ref["uid"] in {r.get("uid") for r in live["metadata"].get("ownerReferences") or []}:
            return
        owner_kind = KINDS.get((ref["apiVersion"], ref["kind"]))
        if owner_kind is None:
            return
        owner = await self.get(owner_kind, desired["metadata"]["namespace"], ref["name"])
        if (
            owner is None
            or owner["metadata"].get("uid") != ref["uid"]
            or owner["metadata"].get("deletionTimestamp")
        ):
            raise ApiError(
                409,
                "OwnerDeleted",
                f"{ref['kind']} {ref['name']} is deleted or being deleted: "
                f"not adopting {desired['kind']} {desired['metadata']['name']}",
            )

    async def apply(
        self, desired: Mapping[str, Any], live: Mapping[str, Any] | Literal["fetch"] | None = "fetch"
    ) -> tuple[ApplyResult, dict[str, Any]]:
        """Create or patch one child so that it contains `desired`. `live`: the object as just
        listed (None: absent), or "fetch" to GET it first."""
        kind = kind_of(desired)
        meta = desired["metadata"]
        if live == "fetch":
            live = await self.get(kind, meta["namespace"], meta["name"])
        if live is None:
            try:
                return "created", await self.create(with_last_applied(desired))
            except ApiError as e:
                if e.status != 409:
                    raise
                live = await self.get(kind, meta["namespace"], meta["name"])
                if live is None:
                    raise
                if kind not in CREATE_ONLY:
                    await self._check_adoption(desired, live)
        assert isinstance(live, Mapping)
        if kind in CREATE_ONLY:
            return "unchanged", dict(live)
        patch = apply_patch(live, desired)
        if patch is None:
            return "unchanged", dict(live)
        # Optimistic concurrency: the patch was computed from `live`; if someone (the autoscaler,
        # a user) changed the object since, the server answers 409 and the owner is reconciled
        # again from fresh state instead of overwriting their change.
        patch["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        return "updated", await self.patch(kind, meta["namespace"], meta["name"], patch)
