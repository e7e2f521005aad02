"""Inside a cluster: each model's ready pods, from a watch on its Service's EndpointSlices.

The operator writes `endpointSlices: {service, namespace, port}` into the router config for every
model it deploys, and grants the router's own ServiceAccount `get`/`list`/`watch` on
`discovery.k8s.io/endpointslices` in that namespace, nothing else. `KubeAccess.in_cluster()` is
that ServiceAccount (its token is read again at every connection: bound tokens rotate).

One `SliceWatch` per namespace lists the slices of the Services it is asked about (label
`kubernetes.io/service-name in (...)`), then watches from the list's resourceVersion; when the
server ends the watch it watches again from the last version seen, and when that version has
expired (410 Gone) or the connection breaks it lists again, with backoff. Every change hands the
Service's current slices to `Discovery`, which turns them into each model's endpoints
(`endpoints.endpoints_from_slices`: ready and not terminating) and gives them to the load
tracker at once: a pod that becomes ready takes requests as soon as its slice says so (it is
scraped at once), and one that starts terminating takes no new request from then on.

Until a Service's first list arrives (no API access, RBAC missing, API server down), its model is
served through the Service URL in the config, and the error is logged and shown in
`/v1/tollway/status`; after that, the last list seen stays in force through watch errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from router_service.config import EndpointSliceSource
from router_service.proxy.endpoints import SERVICE_NAME_LABEL, Endpoint, endpoints_from_slices

log = logging.getLogger("tollway.discovery")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 300  # the server ends a watch after this; the router watches again from where it was
READ_BUFFER_BYTES = 1 << 22  # one watch event is one line: an EndpointSlice with 100 endpoints fits


class KubeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class KubeAccess:
    """How to reach the Kubernetes API: its URL and a bearer token (a file read at every connect)."""

    url: str
    token_file: Path | None = None
    token: str | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] | None = None, account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeAccess | None:
        """The pod's own ServiceAccount, or None outside a cluster."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        token = account_dir / "token"
        if not host or not port or not token.is_file():
            return None
        if ":" in host:
            host = f"[{host}]"
        ca = account_dir / "ca.crt"
        return cls(f"https://{host}:{port}", token_file=token, ca_file=ca if ca.is_file() else None)

    def headers(self) -> dict[str, str]:
        token = self.token
        if token is None and self.token_file is not None:
            token = self.token_file.read_text().strip()
        headers = {"accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

    def ssl_context(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file is not None else True


def service_of(obj: Mapping[str, Any]) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(SERVICE_NAME_LABEL)


class SliceWatch:
    """The EndpointSlices of some Services of one namespace, kept current by list + watch."""

    def __init__(
        self,
        access: KubeAccess,
        namespace: str,
        services: frozenset[str],
        on_change: Callable[[str, list[dict[str, Any]]], None],
        *,
        backoff: tuple[float, float] = (0.5, 10.0),
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.access = access
        self.namespace = namespace
        self.services = services
        self.on_change = on_change
        self.backoff = backoff
        self.watch_seconds = watch_seconds
        self.slices: dict[str, dict[str, Any]] = {}  # by slice name
        self.synced = False  # a list has arrived
        self.last_error: str | None = None
        self.lists = 0  # how many times it listed (the first, and once per expired watch or error)

    @property
    def path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{quote(self.namespace)}/endpointslices"

    @property
    def selector(self) -> str:
        return f"{SERVICE_NAME_LABEL} in ({','.join(sorted(self.services))})"

    def slices_of(self, service: str) -> list[dict[str, Any]]:
        return [s for s in self.slices.values() if service_of(s) == service]

    async def run(self, session: aiohttp.ClientSession) -> None:
        """List and watch until cancelled; errors are logged and retried with backoff."""
        delay = self.backoff[0]
        while True:
            try:
                version: str | None = await self._list(session)
                delay = self.backoff[0]
                while version is not None:
                    version = await self._watch(session, version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = self._describe(exc)
                if message != self.last_error:
                    log.warning("EndpointSlices in %s: %s (retrying)", self.namespace, message)
                self.last_error = message
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, KubeApiError) and exc.status in (401, 403):
            return (
                f"the router may not list EndpointSlices in namespace {self.namespace!r} ({exc}); the operator "
                "grants its ServiceAccount get/list/watch on discovery.k8s.io/endpointslices"
            )
        return f"{type(exc).__name__}: {exc}"

    async def _list(self, session: aiohttp.ClientSession) -> str:
        async with session.get(
            self.access.url + self.path,
            params={"labelSelector": self.selector},
            headers=self.access.headers(),
            ssl=self.access.ssl_context(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            if response.status != 200:
                raise KubeApiError(response.status, (await response.text())[:300])
            data = await response.json(content_type=None)
        self.lists += 1
        self.slices = {item["metadata"]["name"]: item for item in data.get("items") or []}
        self.synced, self.last_error = True, None
        for service in self.services:
            self.on_change(service, self.slices_of(service))
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> str | None:
        """Apply watch events from `version`; the version to watch from next, or None to list again."""
        params = {
            "labelSelector": self.selector,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds),
        }
        async with session.get(
            self.access.url + self.path,
            params=params,
            headers=self.access.headers(),
            ssl=self.access.ssl_context(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.watch_seconds + 30),
        ) as response:
            if response.status == 410:
                return None
            if response.status != 200:
                raise KubeApiError(response.status, (await response.text())[:300])
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise KubeApiError(int(obj.get("code") or 500), str(obj.get("message")))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(kind, obj)
        return version

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        old = self.slices.pop(name, None)
        if kind != "DELETED":
            self.slices[name] = obj
        for service in {service_of(old) if old else None, service_of(obj)}:
            if service in self.services:
                self.on_change(service, self.slices_of(service))


class Discovery:
    """Endpoints of the models whose config names EndpointSlices; one `SliceWatch` per namespace."""

    def __init__(
        self,
        access: KubeAccess | None,
        on_endpoints: Callable[[str, tuple[Endpoint, ...]], None],
        *,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self.access = access
        self.on_endpoints = on_endpoints
        self.backoff = backoff
        self.sources: dict[str, EndpointSliceSource] = {}  # by model
        self.watches: dict[str, SliceWatch] = {}  # by namespace
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._warned = False

    def configure(self, sources: Mapping[str, EndpointSliceSource]) -> None:
        """The models to discover (a config load); watches start, stop or change to match."""
        self.sources = dict(sources)
        if sources and self.access is None and not self._warned:
            log.warning(
                "the config names EndpointSlices but the router is not in a cluster (no ServiceAccount): "
                "models are served through their Service URLs"
            )
            self._warned = True
        wanted: dict[str, frozenset[str]] = {}
        for source in self.sources.values():
            wanted[source.namespace] = wanted.get(source.namespace, frozenset()) | {source.service}
        for namespace in list(self.watches):
            if self.watches[namespace].services != wanted.get(namespace):
                self._stop(namespace)
        for namespace, services in wanted.items():
            if namespace in self.watches:
                # Same Services: hand what is known to the models (a model may be new in this config).
                watch = self.watches[namespace]
                for service in services if watch.synced else ():
                    self._changed(namespace, service, watch.slices_of(service))
            elif self.access is not None:
                self.watches[namespace] = SliceWatch(
                    self.access,
                    namespace,
                    services,
                    lambda service, slices, ns=namespace: self._changed(ns, service, slices),
                    backoff=self.backoff,
                )
                self._launch(namespace)

    def _changed(self, namespace: str, service: str, slices: list[dict[str, Any]]) -> None:
        for model, source in self.sources.items():
            if source.namespace == namespace and source.service == service:
                self.on_endpoints(model, endpoints_from_slices(slices, source))

    def _launch(self, namespace: str) -> None:
        if self._session is not None and namespace not in self._tasks:
            self._tasks[namespace] = asyncio.get_running_loop().create_task(
                self.watches[namespace].run(self._session), name=f"tollway-endpointslices-{namespace}"
            )

    def _stop(self, namespace: str) -> None:
        self.watches.pop(namespace, None)
        task = self._tasks.pop(namespace, None)
        if task is not None:
            task.cancel()

    def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(read_bufsize=READ_BUFFER_BYTES)
        for namespace in self.watches:
            self._launch(namespace)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def status(self) -> dict[str, Any]:
        return {
            "in_cluster": self.access is not None,
            "watches": {
                ns: {
                    "services": sorted(w.services),
                    "synced": w.synced,
                    "slices": len(w.slices),
                    "lists": w.lists,
                    "last_error": w.last_error,
                }
                for ns, w in self.watches.items()
            },
        }
