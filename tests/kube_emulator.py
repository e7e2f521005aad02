"""A Kubernetes API emulator good enough to carry the tollway operator, kopf and kubectl.

This is THE one test helper that adapts `kmock`'s `KubernetesEmulator` (kmock == 0.8, pinned in
pyproject's dev extras: this module overrides private methods of that release) to what a kopf
operator and `kubectl` need. Every deviation from stock kmock is listed here and marked `FIX` or
`EMULATED` in the code:

FIX 1  create stamps `uid`, `resourceVersion`, `creationTimestamp`, `generation` (and `namespace`,
       `apiVersion`, `kind`); every change bumps a cluster-wide `resourceVersion`; a change outside
       `metadata`/`status` bumps `generation`; a patch that changes nothing changes nothing (no new
       resourceVersion, no watch event), as on a real API server.
FIX 2  a failed JSON-patch `test` op answers 422 (kmock: 500, which kopf retries forever); a merge
       patch carrying a stale `metadata.resourceVersion` answers 409.
FIX 3  lists carry `kind`, `apiVersion` and a real `metadata.resourceVersion` (kubectl needs them), and
       honour `labelSelector` and `fieldSelector` (metadata.name / metadata.namespace). As on a real
       API server, the items of a built-in kind's list carry no `kind`/`apiVersion` (custom
       resources' items do).
FIX 4  a watch subscribes to the event bus *before* replaying, replays only events newer than the
       requested `resourceVersion` (from an event log, so DELETED events are replayed too; too old
       answers 410 Gone), honours selectors and `timeoutSeconds`.
FIX 5  `/api/v1/namespaces[/NAME]` works (kmock 0.8's path parser fails on it with 500).
FIX 6  status subresource semantics: `PATCH .../status` changes only `status`; a patch of the main
       resource ignores `status` when the kind has a status subresource; create drops `status`.
       `.../scale` answers an `autoscaling/v1` Scale (Deployments and CRDs declaring scale; a CRD's
       `labelSelectorPath` fills `status.selector`, as an HPA reads it).
FIX 7  creating a CustomResourceDefinition registers its resource for discovery; `preregister_crds`
       does the same from `crds/*.yaml` up front.
FIX 9  discovery of the core group says `groupVersion: v1` (kmock: "/v1") and lists subresources
       (`services/status`) without the parent's short names, so kubectl maps core kinds too
       (`kubectl get svc,cm,ns`).
FIX 11 object requests (list/watch/get/create/patch/delete) are served directly instead of through
       kmock's reaction matching, which costs ~25 ms per request; discovery still goes through it.
FIX 10 request bodies in protobuf answer 415 with a clear message (kmock: 400 "empty body"). kubectl's
       typed generators (`kubectl create namespace X`, `kubectl create configmap`) send protobuf and
       kubectl 1.32 does not fall back, so use `kubectl apply -f` (JSON) against the emulator.
FIX 8  strategic-merge patches (kubectl on built-in kinds) are applied as JSON merge patches with the
       `$`-directives dropped: close enough for the maps kubectl sends; lists are replaced whole.
       Server-side apply is not supported.

EMULATED (what a real cluster's controllers do and the emulator does not, played by `FakeControllers`):
- garbage collection: when an object is deleted, dependents whose `ownerReferences` all point at
  deleted owners are deleted (background propagation), recursively; an object created or changed
  while all its owners are gone is deleted too;
- the Deployment and StatefulSet controllers: their `status` follows its spec at once (`replicas`,
  `readyReplicas` = `availableReplicas` = `updatedReplicas` = spec.replicas, `observedGeneration`,
  Available/Progressing conditions), except for Deployments named in `hold_unready`, which report
  zero ready replicas (to test degraded states);
- the namespace controller: deleting a Namespace deletes everything in it.
No pods, no scheduling, no admission webhooks, no validation against schemas, no server-side apply.

Use it three ways:
- in-process: `with EmulatorThread() as kube: ...` runs the server in its own thread and event loop
  (so `kopf.testing.KopfRunner.__exit__` can block without freezing it); `kube.url`,
  `kube.write_kubeconfig(path)`, `kube.controllers.hold_unready`.
- as a process (e2e, CI): `python tests/kube_emulator.py --port 0 --kubeconfig FILE` writes FILE,
  prints `READY <url>` and serves until killed.
"""

# kmock==0.8 (pinned): the overrides below depend on its private structure.

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import datetime
import json
import re
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import apps, enums, rendering

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = REPO_ROOT / "crds"

NAMESPACES = kmock.resource("", "v1", "namespaces")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
STATEFULSETS = kmock.resource("apps", "v1", "statefulsets")
WORKLOADS = (DEPLOYMENTS, STATEFULSETS)
NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/(?P<name>[^/]+))?/?$")
SCALE_PATHS: dict[str, tuple[str, str, str | None]] = {
    "deployments": ("spec.replicas", "status.replicas", None),
    "statefulsets": ("spec.replicas", "status.replicas", None),
    "replicasets": ("spec.replicas", "status.replicas", None),
}
EVENT_LOG_SIZE = 100_000


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get_path(obj: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.strip(".").split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.strip(".").split(".")
    cur = obj
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _strip_directives(patch: Any) -> Any:
    """Drop strategic-merge `$...` directive keys (FIX 8)."""
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [_strip_directives(v) for v in patch]
    return patch


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------------------------
# Selectors (FIX 3)
# ---------------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label selector syntax: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`."""
    labels = labels or {}
    for term in _split_selector(selector or ""):
        if m := _SET_RE.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str | None, obj: Mapping[str, Any]) -> bool:
    for term in _split_selector(selector or ""):
        negate = "!=" in term
        key, value = (s.strip() for s in term.replace("==", "=").replace("!=", "=").split("=", 1))
        actual = _get_path(obj, key)
        if (str(actual) == value) == negate:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


class TollwayKubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the fixes listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resource_version = 0
        self.event_log: collections.deque[tuple[int, kmock.resource, dict[str, Any]]] = collections.deque(
            maxlen=EVENT_LOG_SIZE
        )
        self._results: dict[int, dict[str, Any]] = {}
        self.change_listeners: list[asyncio.Queue[tuple[kmock.resource, str, dict[str, Any]]]] = []
        self.custom_resources: set[kmock.resource] = set()
        self.resources.load_bundled()

    # --- registration ------------------------------------------------------------------------

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Make a CRD's resource discoverable (FIX 7)."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec.get("versions", []):
            subresources = set((version.get("subresources") or {}).keys())
            self.custom_resources.add(kmock.resource(spec["group"], version["name"], names["plural"]))
            self.resources[kmock.resource(spec["group"], version["name"], names["plural"])] = (
                kmock.ResourceInfo(
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    kind=names["kind"],
                    singular=names.get("singular", names["kind"].lower()),
                    verbs={"create", "delete", "get", "list", "patch", "update", "watch", "deletecollection"},
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=subresources,
                )
            )

    def preregister_crds(self, directory: Path = CRD_DIR) -> None:
        for path in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    self.register_crd(doc)
                    name = doc["metadata"]["name"]
                    obj = copy.deepcopy(doc)
                    self._stamp_new(CRDS, None, obj)
                    self._objects[CRDS, None, name] = obj

    # --- helpers -------------------------------------------------------------------------------

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        return self.resources.get(resource, None)

    def _has_subresource(self, resource: kmock.resource, sub: str) -> bool:
        info = self._info(resource)
        return bool(info and sub in info.subresources)

    def _scale_paths(self, resource: kmock.resource) -> tuple[str, str, str | None] | None:
        """(specReplicasPath, statusReplicasPath, labelSelectorPath or None)."""
        if resource.plural in SCALE_PATHS and resource.group == "apps":
            return SCALE_PATHS[resource.plural]
        for key, crd in self._objects.items():
            if key[0] != CRDS or crd.deleted:
                continue
            spec = crd.get("spec", {})
            if spec.get("group") != resource.group or spec.get("names", {}).get("plural") != resource.plural:
                continue
            for version in spec.get("versions", []):
                scale = (version.get("subresources") or {}).get("scale")
                if version.get("name") == resource.version and scale:
                    return (
                        scale["specReplicasPath"],
                        scale["statusReplicasPath"],
                        scale.get("labelSelectorPath"),
                    )
        return None

    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _stamp_new(self, resource: kmock.resource, namespace: str | None, obj: dict[str, Any]) -> None:
        """FIX 1: what the API server sets on create."""
        info = self._info(resource)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if info is not None and info.namespaced and namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if info is not None and info.kind:
            obj.setdefault("kind", info.kind)
            obj.setdefault(
                "apiVersion", f"{resource.group}/{resource.version}" if resource.group else resource.version
            )

    async def _publish(self, resource: kmock.resource, kind: str, raw: Mapping[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(dict(raw))}
        rv = int(event["object"].get("metadata", {}).get("resourceVersion") or self.resource_version)
        self.event_log.append((rv, resource, event))
        await self._buses[resource].put(event)
        for queue in self.change_listeners:
            queue.put_nowait((resource, kind, event["object"]))

    def _live(self, resource: kmock.resource, namespace: str | None, name: str) -> kmock.Object | None:
        key = (resource, namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key]
        return None

    def live_objects(
        self, resource: kmock.resource | None = None
    ) -> list[tuple[kmock.resource, dict[str, Any]]]:
        return [
            (key[0], obj.raw)
            for key, obj in list(self._objects.items())
            if not obj.deleted and (resource is None or key[0] == resource)
        ]

    # --- mutations (called under the lock) ------------------------------------------------------

    async def create_object(
        self, resource: kmock.resource, namespace: str | None, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        obj = copy.deepcopy(dict(data))
        info = self._info(resource)
        namespace = namespace or obj.get("metadata", {}).get("namespace")
        if info is not None and not info.namespaced:
            namespace = None
        if resource == NAMESPACES:
            obj.setdefault("status", {"phase": "Active"})
        elif self._has_subresource(resource, "status"):
            obj.pop("status", None)  # FIX 6
        name = obj.get("metadata", {}).get("name") or ""
        if not name and not obj.get("metadata", {}).get("generateName"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name: Required value")
        existing = self._live(resource, namespace, name) if name else None
        if existing is not None:
            raise kmock.KubernetesError(
                status=409, reason="AlreadyExists", message=f'{resource.plural} "{name}" already exists'
            )
        self._stamp_new(resource, namespace, obj)
        name = obj["metadata"]["name"]
        key = (resource, namespace, name)
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        if resource == CRDS:
            self.register_crd(obj)
        await self._publish(resource, "ADDED", obj)
        return obj

    async def patch_object(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        current = self._live(resource, namespace, name)
        if current is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'{resource.plural} "{name}" not found')
        old = copy.deepcopy(current.raw)
        if subresource == "scale":
            paths = self._scale_paths(resource)
            if paths is None:
                raise kmock.KubernetesNotFoundError(message=f"{resource.plural} has no scale subresource")
            if isinstance(patch, list):
                scale = jsonpatch.apply_patch(self._scale_of(resource, old), patch)
            else:
                scale = _merge_patch(self._scale_of(resource, old), _strip_directives(patch))
            patch = {}
            _set_path(patch, paths[0], scale.get("spec", {}).get("replicas"))
            subresource = None
        if isinstance(patch, list):
            try:
                new = jsonpatch.apply_patch(old, patch)
            except jsonpatch.JsonPatchTestFailed as e:  # FIX 2
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=f"the server rejected our request: {e}"
                ) from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        else:
            if not isinstance(patch, dict):
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message="patch body must be a JSON object or list"
                )
            if "strategic" in content_type:
                patch = _strip_directives(patch)
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and str(wanted_rv) != str(old["metadata"].get("resourceVersion")):
                raise kmock.KubernetesError(  # FIX 2
                    status=409,
                    reason="Conflict",
                    message=f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified',
                )
            new = _merge_patch(old, patch)
        # FIX 6: status subresource semantics.
        if subresource == "status":
            new = (
                dict(old, status=new.get("status"))
                if new.get("status") is not None
                else {k: v for k, v in old.items() if k != "status"}
            )
        elif self._has_subresource(resource, "status"):
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in old:
                new["status"] = old["status"]
        # Identity is immutable.
        for field in (
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "resourceVersion",
            "generation",
            "deletionTimestamp",
        ):
            if field in old.get("metadata", {}):
                new.setdefault("metadata", {})[field] = old["metadata"][field]
        if new == old:
            return old  # FIX 1: a no-op patch changes nothing
        outside = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if outside(new) != outside(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        current.patch({})  # start a new history version, then replace its content
        current.history[-1] = new
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            current.delete()
            await self._publish(resource, "DELETED", new)
        else:
            await self._publish(resource, "MODIFIED", new)
        if resource == CRDS:
            self.register_crd(new)
        return new

    async def delete_object(
        self, resource: kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any]:
        current = self._live(resource, namespace, name)
        if current is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'{resource.plural} "{name}" not found')
        obj = copy.deepcopy(current.raw)
        meta = obj.setdefault("metadata", {})
        if meta.get("deletionTimestamp"):
            return obj
        if meta.get("finalizers"):
            meta["deletionTimestamp"] = _now()
            meta["resourceVersion"] = self._next_rv()
            current.patch({})
            current.history[-1] = obj
            await self._publish(resource, "MODIFIED", obj)
            return obj
        meta["resourceVersion"] = self._next_rv()
        current.history[-1] = obj
        current.delete()
        await self._publish(resource, "DELETED", obj)
        return obj

    def _scale_of(self, resource: kmock.resource, obj: Mapping[str, Any]) -> dict[str, Any]:
        paths = self._scale_paths(resource)
        assert paths is not None
        meta = obj.get("metadata", {})
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _get_path(obj, paths[0]) or 0},
            "status": {"replicas": _get_path(obj, paths[1]) or 0}
            | ({"selector": _get_path(obj, paths[2])} if paths[2] and _get_path(obj, paths[2]) else {}),
        }

    # --- request dispatch ------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if "protobuf" in raw_request.headers.get("Content-Type", ""):
            # FIX 10: JSON only.
            await raw_request.read()
            return await self._render_error(
                kmock.KubernetesError(
                    status=415, reason="UnsupportedMediaType", message="the emulator speaks JSON only"
                )
            )
        match = NAMESPACE_PATH.match(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        # FIX 5: kmock 0.8 cannot parse /api/v1/namespaces[/name]; build the request ourselves.
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        method = enums.method(raw_request.method)
        name = match.group("name")
        params = dict(raw_request.query)
        if method == enums.method.GET and params.get("watch") in ("true", "1"):
            action = enums.action.WATCH
        elif name is None:
            action = enums.action.LIST if method == enums.method.GET else enums.action.CREATE
        else:
            action = {
                enums.method.GET: enums.action.FETCH,
                enums.method.PATCH: enums.action.UPDATE,
                enums.method.DELETE: enums.action.DELETE,
            }.get(method)
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=params,
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            data=data,
            body=body,
            text=body.decode(errors="replace"),
            action=action,
            resource=NAMESPACES,
            namespace=None,
            name=name,
            subresource=None,
        )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as e:
            return await self._render_error(e)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Apply creates/patches/deletes with the fixes, then serve through kmock's reactions."""
        if request.resource is not None:
            content_type = request.headers.get("Content-Type", "application/json")
            async with self._lock:
                if request.action == enums.action.CREATE:
                    if request.data is None:
                        raise kmock.KubernetesError(status=400, reason="BadRequest", message="empty body")
                    self._results[request.id] = await self.create_object(
                        request.resource, request.namespace, request.data
                    )
                elif request.action == enums.action.UPDATE and request.name is not None:
                    self._results[request.id] = await self.patch_object(
                        request.resource,
                        request.namespace,
                        request.name,
                        request.data,
                        subresource=request.subresource,
                        content_type=content_type,
                    )
                elif request.action == enums.action.DELETE and request.name is not None:
                    obj = await self.delete_object(request.resource, request.namespace, request.name)
                    if request.resource == NAMESPACES:
                        await self._delete_namespace_contents(request.name)
                    self._results[request.id] = obj
        resource = request.resource
        if resource is not None and resource.plural and request.action in self._FAST_ACTIONS:
            # FIX 11: serve object requests directly. kmock matches every request against every
            # reaction's filters (~25 ms per request), which makes a busy operator crawl.
            if request.action == enums.action.WATCH:
                return await self._stream(request)
            payload = await getattr(self, self._FAST_ACTIONS[request.action])(request)
            return aiohttp.web.json_response(payload)
        # Discovery and anything else: through kmock's reactions (skipping
        # KubernetesEmulator._handle, whose state changes are what we replaced above).
        return await apps.RawHandler._handle(self, request)

    _FAST_ACTIONS = {
        enums.action.LIST: "_serve_list",
        enums.action.FETCH: "_serve_fetch",
        enums.action.CREATE: "_serve_create",
        enums.action.UPDATE: "_serve_update",
        enums.action.DELETE: "_serve_delete",
        enums.action.WATCH: "_serve_watch",
    }

    async def _stream(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """A watch as newline-delimited JSON events; ends on timeoutSeconds or a gone client."""
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        events = self._serve_watch(request).__aiter__()
        try:
            while True:
                pending = asyncio.ensure_future(events.__anext__())
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=1.0)
                    if done:
                        break
                    if raw.transport is None or raw.transport.is_closing():
                        pending.cancel()
                        return response
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    break
                if event != b"":
                    await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
        return response

    async def _delete_namespace_contents(self, namespace: str) -> None:
        """EMULATED: the namespace controller."""
        for (resource, ns, name), obj in list(self._objects.items()):
            if ns == namespace and not obj.deleted:
                await self.delete_object(resource, ns, name)

    # --- fallback responders -----------------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        """FIX 9: subresources (`services/status`) carry no short names or categories, as on a real
        server; kmock 0.8 repeats the parent's, which makes kubectl refuse core kinds (`svc`, `cm`)."""
        payload = await super()._serve_version(request)
        if payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]  # core: "v1", not "/v1"
        for entry in payload.get("resources", []):
            if "/" in entry["name"]:
                entry["shortNames"] = []
                entry["categories"] = []
                entry["singularName"] = ""
                entry["verbs"] = ["get", "patch", "update"]
        return payload

    def _matching(self, request: rendering.Request) -> list[dict[str, Any]]:
        label_sel = request.params.get("labelSelector")
        field_sel = request.params.get("fieldSelector")
        out = []
        for (resource, namespace, name), obj in self._objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            if request.name is not None and name != request.name:
                continue
            raw = obj.raw
            if label_selector_matches(
                label_sel, raw.get("metadata", {}).get("labels")
            ) and field_selector_matches(field_sel, raw):
                out.append(raw)
        return out

    def _event_matches(self, request: rendering.Request, event: Mapping[str, Any]) -> bool:
        obj = event.get("object", {})
        meta = obj.get("metadata", {})
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        return label_selector_matches(
            request.params.get("labelSelector"), meta.get("labels")
        ) and field_selector_matches(request.params.get("fieldSelector"), obj)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = copy.deepcopy(self._matching(request))
            rv = str(self.resource_version)
        if request.resource not in self.custom_resources:
            for item in items:  # a real API server lists built-in kinds' items without them
                item.pop("kind", None)
                item.pop("apiVersion", None)
        info = self._info(request.resource)
        kind = (info.kind if info and info.kind else request.resource.plural.capitalize()) + "List"
        api_version = (
            f"{request.resource.group}/{request.resource.version}"
            if request.resource.group
            else request.resource.version
        )
        return {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        async with self._lock:
            obj = self._live(request.resource, request.namespace, request.name or "")
            if obj is None:
                raise kmock.KubernetesObjectNotFoundError(
                    message=f'{request.resource.plural} "{request.name}" not found'
                )
            raw = copy.deepcopy(obj.raw)
        if request.subresource == "scale" and self._scale_paths(request.resource):
            return self._scale_of(request.resource, raw)
        return raw

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        return self._results.pop(request.id)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        result = self._results.pop(request.id)
        if (
            request.subresource == "scale"
            and request.resource is not None
            and self._scale_paths(request.resource)
        ):
            return self._scale_of(request.resource, result)
        return result

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._results.pop(request.id)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        marker = await bus.mark()  # FIX 4: subscribe before replaying
        try:
            since = request.params.get("resourceVersion")
            async with self._lock:
                if since in (None, "", "0"):
                    replay = [
                        {"type": "ADDED", "object": copy.deepcopy(raw)} for raw in self._matching(request)
                    ]
                else:
                    try:
                        int(since)
                    except ValueError:
                        since = "0"
                    oldest = self.event_log[0][0] if self.event_log else self.resource_version + 1
                    if int(since) < oldest - 1 and len(self.event_log) == self.event_log.maxlen:
                        replay = [
                            {
                                "type": "ERROR",
                                "object": {
                                    "kind": "Status",
                                    "apiVersion": "v1",
                                    "code": 410,
                                    "reason": "Expired",
                                    "status": "Failure",
                                    "message": f"too old resource version: {since}",
                                },
                            }
                        ]
                    else:
                        replay = [
                            copy.deepcopy(event)
                            for rv, resource, event in self.event_log
                            if resource == request.resource
                            and rv > int(since)
                            and self._event_matches(request, event)
                        ]
                last = self.resource_version
            for event in replay:
                yield event
            timeout = float(request.params.get("timeoutSeconds") or 0) or None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    async for event in bus.stream(since=marker):
                        rv = int(event.get("object", {}).get("metadata", {}).get("resourceVersion") or 0)
                        if rv > last and self._event_matches(request, event):
                            yield event
        finally:
            await bus.unmark(marker)


# ---------------------------------------------------------------------------------------------
# EMULATED controllers
# ---------------------------------------------------------------------------------------------


class FakeControllers:
    """What kube-controller-manager would do, reduced to what tollway's tests need.

    - garbage collection by ownerReferences (background propagation);
    - Deployment and StatefulSet status: ready = spec.replicas at once, unless the name is in
      `hold_unready`.
    """

    def __init__(self, emulator: TollwayKubeEmulator) -> None:
        self.emulator = emulator
        self.hold_unready: set[tuple[str, str]] = set()
        self.queue: asyncio.Queue[tuple[kmock.resource, str, dict[str, Any]]] = asyncio.Queue()
        self.collected: list[tuple[str, str, str]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.emulator.change_listeners.append(self.queue)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            resource, kind, obj = await self.queue.get()
            try:
                if kind == "DELETED":
                    await self._collect_garbage(obj)
                else:
                    await self._collect_orphan(resource, obj)
                    if resource in WORKLOADS:
                        await self._workload_status(resource, obj)
            except kmock.KubernetesError:
                pass  # the object went away meanwhile

    async def refresh(self) -> None:
        """Re-evaluate every Deployment and StatefulSet (after `hold_unready` changed)."""
        for resource in WORKLOADS:
            for _resource, raw in self.emulator.live_objects(resource):
                await self._workload_status(resource, raw)

    async def _collect_garbage(self, owner: Mapping[str, Any]) -> None:
        uid = owner.get("metadata", {}).get("uid")
        if not uid:
            return
        live_uids = {raw.get("metadata", {}).get("uid") for _, raw in self.emulator.live_objects()}
        async with self.emulator._lock:
            for resource, raw in self.emulator.live_objects():
                refs = raw.get("metadata", {}).get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs) and not any(
                    r.get("uid") in live_uids for r in refs
                ):
                    meta = raw["metadata"]
                    self.collected.append((resource.plural, meta.get("namespace"), meta["name"]))
                    await self.emulator.delete_object(resource, meta.get("namespace"), meta["name"])

    async def _collect_orphan(self, resource: kmock.resource, raw: Mapping[str, Any]) -> None:
        """An object created (or edited) with owners that are all gone is collected too, as the
        real garbage collector does (e.g. a child re-created by a reconcile that raced the owner's
        deletion)."""
        refs = raw.get("metadata", {}).get("ownerReferences") or []
        if not refs:
            return
        live_uids = {o.get("metadata", {}).get("uid") for _, o in self.emulator.live_objects()}
        if any(r.get("uid") in live_uids for r in refs):
            return
        meta = raw["metadata"]
        async with self.emulator._lock:
            if self.emulator._live(resource, meta.get("namespace"), meta["name"]) is not None:
                self.collected.append((resource.plural, meta.get("namespace"), meta["name"]))
                await self.emulator.delete_object(resource, meta.get("namespace"), meta["name"])

    async def _workload_status(self, resource: kmock.resource, raw: Mapping[str, Any]) -> None:
        meta = raw.get("metadata", {})
        replicas = int(raw.get("spec", {}).get("replicas", 1))
        held = (meta.get("namespace"), meta.get("name")) in self.hold_unready
        ready = 0 if held else replicas
        status: dict[str, Any] = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": replicas,
            "updatedReplicas": replicas,
        }
        if ready:
            status["readyReplicas"] = ready
            status["availableReplicas"] = ready
        else:
            status["unavailableReplicas"] = replicas
        available = "True" if ready > 0 or replicas == 0 else "False"
        if resource == STATEFULSETS:
            status["currentReplicas"] = replicas
            status.pop("unavailableReplicas", None)
        status["conditions"] = (
            []
            if resource == STATEFULSETS
            else [
                {
                    "type": "Available",
                    "status": available,
                    "reason": "MinimumReplicasAvailable"
                    if available == "True"
                    else "MinimumReplicasUnavailable",
                },
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "NewReplicaSetAvailable" if ready == replicas else "ReplicaSetUpdated",
                },
            ]
        )
        old = dict(raw.get("status") or {})
        comparable = lambda s: {k: v for k, v in s.items() if k != "conditions"}  # noqa: E731
        if comparable(old) == comparable(status) and [c.get("status") for c in old.get("conditions", [])] == [
            c["status"] for c in status["conditions"]
        ]:
            return
        patch = {"status": {**{k: None for k in old if k not in status}, **status}}
        async with self.emulator._lock:
            if self.emulator._live(resource, meta.get("namespace"), meta["name"]) is not None:
                await self.emulator.patch_object(
                    resource, meta.get("namespace"), meta["name"], patch, subresource="status"
                )


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def kubeconfig_for(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
    }


class EmulatorThread:
    """Runs the emulator + FakeControllers on 127.0.0.1 in a thread with its own event loop."""

    def __init__(
        self, *, port: int = 0, crds: bool = True, extra_crds: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        self.port = port
        self.crds = crds
        self.extra_crds = list(extra_crds)
        self.url = ""
        self.emulator: TollwayKubeEmulator | None = None
        self.controllers: FakeControllers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._target, name="kube-emulator", daemon=True)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the Kubernetes emulator did not start in 30 s")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine in the emulator's loop (e.g. `controllers.refresh()`)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def hold_unready(self, namespace: str, name: str, held: bool = True) -> None:
        assert self.controllers is not None
        (self.controllers.hold_unready.add if held else self.controllers.hold_unready.discard)(
            (namespace, name)
        )
        self.call(self.controllers.refresh())

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(kubeconfig_for(self.url, namespace)))
        return path

    def _target(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to __enter__
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = TollwayKubeEmulator()
        if self.crds:
            emulator.preregister_crds()
        for crd in self.extra_crds:
            emulator.register_crd(crd)
        async with emulator, kmock.Server(emulator, host="127.0.0.1", port=self.port) as server:
            self.emulator = emulator
            self.controllers = FakeControllers(emulator)
            self.controllers.start()
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.controllers.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the Kubernetes API emulator until killed.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig pointing at the emulator here")
    parser.add_argument("--namespace", default="default", help="the kubeconfig context's namespace")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmulatorThread(port=args.port) as kube:
        if args.kubeconfig:
            kube.write_kubeconfig(args.kubeconfig, args.namespace)
        print(f"READY {kube.url}", flush=True)
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
