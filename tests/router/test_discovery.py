"""The EndpointSlice watch: against the Kubernetes emulator (list, then watch events) and a scripted
fake API (an expired watch, missing RBAC)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kube_emulator import EmulatorThread
from router_helpers import async_wait_until

from router_service.config import EndpointSliceSource
from router_service.proxy.discovery import Discovery, KubeAccess, SliceWatch
from router_service.proxy.endpoints import Endpoint

NS = "team-a"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"


def eps_slice(name: str, service: str, port: int, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def ready(address: str = "127.0.0.1") -> dict[str, Any]:
    return {"addresses": [address], "conditions": {"ready": True, "serving": True, "terminating": False}}


def draining(address: str = "127.0.0.1") -> dict[str, Any]:
    return {"addresses": [address], "conditions": {"ready": False, "serving": True, "terminating": True}}


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorThread]:
    with EmulatorThread(crds=False) as emulator:
        yield emulator


class Api:
    """Create, patch and delete EndpointSlices in the emulator (what the EndpointSlice controller does)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def create(self, obj: dict[str, Any]) -> None:
        httpx.post(self.url + SLICES, json=obj).raise_for_status()
        self.created.append(obj["metadata"]["name"])

    def set_endpoints(self, name: str, *endpoints: dict[str, Any]) -> None:
        headers = {"content-type": "application/merge-patch+json"}
        httpx.patch(
            f"{self.url}{SLICES}/{name}", json={"endpoints": list(endpoints)}, headers=headers
        ).raise_for_status()

    def delete(self, name: str) -> None:
        httpx.delete(f"{self.url}{SLICES}/{name}").raise_for_status()
        self.created.remove(name)

    def clean(self) -> None:
        for name in list(self.created):
            self.delete(name)


@pytest.fixture
def api(kube: EmulatorThread) -> Iterator[Api]:
    client = Api(kube.url)
    yield client
    client.clean()


async def test_the_watch_lists_then_follows_its_services_slices(kube: EmulatorThread, api: Api) -> None:
    api.create(eps_slice("large-a", "chat-large", 9001, ready()))
    api.create(eps_slice("other-a", "chat-other", 9009, ready()))
    seen: dict[str, list[list[str]]] = {}

    def on_change(service: str, slices: list[dict[str, Any]]) -> None:
        seen.setdefault(service, []).append(sorted(s["metadata"]["name"] for s in slices))

    watch = SliceWatch(
        KubeAccess(kube.url, token="t"), NS, frozenset({"chat-large", "chat-small"}), on_change
    )
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(watch.run(session))
        try:
            await async_wait_until(lambda: watch.synced)
            assert seen == {"chat-large": [["large-a"]], "chat-small": [[]]}  # not chat-other
            api.create(eps_slice("large-b", "chat-large", 9002, ready()))
            await async_wait_until(lambda: seen["chat-large"][-1] == ["large-a", "large-b"])
            api.set_endpoints("large-b", draining())
            await async_wait_until(lambda: len(seen["chat-large"]) == 3)
            (b,) = (s for s in watch.slices_of("chat-large") if s["metadata"]["name"] == "large-b")
            assert b["endpoints"][0]["conditions"]["terminating"] is True
            api.delete("large-a")
            await async_wait_until(lambda: seen["chat-large"][-1] == ["large-b"])
            assert "chat-other" not in seen and watch.lists == 1 and watch.last_error is None
        finally:
            task.cancel()


async def test_discovery_turns_slices_into_each_models_ready_endpoints(
    kube: EmulatorThread, api: Api
) -> None:
    api.create(eps_slice("large-a", "chat-large", 9001, ready()))
    found: dict[str, tuple[Endpoint, ...]] = {}
    discovery = Discovery(KubeAccess(kube.url, token="t"), lambda m, eps: found.__setitem__(m, eps))
    discovery.configure({"large": EndpointSliceSource(service="chat-large", namespace=NS)})
    discovery.start()
    try:
        await async_wait_until(lambda: "large" in found)
        assert [e.url for e in found["large"]] == ["http://127.0.0.1:9001"]
        api.create(eps_slice("large-b", "chat-large", 9002, ready()))
        await async_wait_until(lambda: len(found["large"]) == 2)
        api.set_endpoints("large-a", draining())
        await async_wait_until(lambda: [e.url for e in found["large"]] == ["http://127.0.0.1:9002"])
        # A second model on the same Service (a new config) gets what is known at once.
        discovery.configure(
            {
                "large": EndpointSliceSource(service="chat-large", namespace=NS),
                "large-copy": EndpointSliceSource(service="chat-large", namespace=NS),
            }
        )
        assert [e.url for e in found["large-copy"]] == ["http://127.0.0.1:9002"]
        status = discovery.status()["watches"][NS]
        assert status["synced"] and status["services"] == ["chat-large"]
    finally:
        await discovery.stop()


class ScriptedApi:
    """A fake API server: lists answer `lists` in turn, watches answer `watches` in turn."""

    def __init__(self, lists: list[tuple[int, Any]], watches: list[list[dict[str, Any]]]) -> None:
        self.lists, self.watches = lists, watches
        self.requests: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({**request.query, "authorization": request.headers.get("authorization", "")})
        if request.query.get("watch") == "true":
            events = self.watches.pop(0) if self.watches else []
            response = web.StreamResponse()
            await response.prepare(request)
            for event in events:
                await response.write(json.dumps(event).encode() + b"\n")
            if not self.watches and not events:
                await asyncio.sleep(3600)
            return response
        status, body = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        return web.json_response(body, status=status)


async def run_against(api: ScriptedApi, watch: SliceWatch, until: Any) -> None:
    app = web.Application()
    app.router.add_get(SLICES, api.handle)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        watch.access = KubeAccess(str(server.make_url("")).rstrip("/"), token="secret")
        task = asyncio.create_task(watch.run(session))
        try:
            await async_wait_until(until)
        finally:
            task.cancel()


def listing(version: str, *slices: dict[str, Any]) -> tuple[int, Any]:
    return 200, {"kind": "EndpointSliceList", "metadata": {"resourceVersion": version}, "items": list(slices)}


async def test_an_expired_watch_lists_again() -> None:
    a = eps_slice("large-a", "chat-large", 9001, ready())
    b = eps_slice("large-b", "chat-large", 9002, ready())
    api = ScriptedApi(
        lists=[listing("10", a), listing("20", a, b)],
        watches=[[{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}], []],
    )
    seen: list[int] = []
    watch = SliceWatch(
        KubeAccess("http://unused"), NS, frozenset({"chat-large"}), lambda _, s: seen.append(len(s))
    )
    await run_against(api, watch, lambda: watch.lists == 2)
    assert seen == [1, 2]
    watches = [r for r in api.requests if r.get("watch") == "true"]
    assert watches[0]["resourceVersion"] == "10" and watches[0]["allowWatchBookmarks"] == "true"
    assert api.requests[0]["labelSelector"] == "kubernetes.io/service-name in (chat-large)"
    assert all(r["authorization"] == "Bearer secret" for r in api.requests)


async def test_a_watch_the_server_ends_resumes_from_the_last_version_seen() -> None:
    a = eps_slice("large-a", "chat-large", 9001, ready())
    bookmark = {
        "type": "BOOKMARK",
        "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": "42"}},
    }
    api = ScriptedApi(lists=[listing("10", a)], watches=[[bookmark], []])
    watch = SliceWatch(KubeAccess("http://unused"), NS, frozenset({"chat-large"}), lambda *_: None)
    await run_against(api, watch, lambda: len([r for r in api.requests if r.get("watch")]) == 2)
    assert [r["resourceVersion"] for r in api.requests if r.get("watch")] == ["10", "42"] and watch.lists == 1


async def test_missing_rbac_is_reported_and_retried() -> None:
    forbidden = (403, {"kind": "Status", "code": 403, "message": "endpointslices is forbidden"})
    api = ScriptedApi(lists=[forbidden], watches=[])
    watch = SliceWatch(
        KubeAccess("http://unused"), NS, frozenset({"chat-large"}), lambda *_: None, backoff=(0.01, 0.02)
    )
    await run_against(api, watch, lambda: len(api.requests) >= 3)
    assert not watch.synced
    assert watch.last_error is not None and "may not list EndpointSlices" in watch.last_error
    assert "get/list/watch" in watch.last_error


def test_in_cluster_access_is_the_pods_service_account(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert KubeAccess.in_cluster(env, tmp_path) is None  # no token mounted
    (tmp_path / "token").write_text("one\n")
    (tmp_path / "ca.crt").write_text("")
    access = KubeAccess.in_cluster(env, tmp_path)
    assert (
        access is not None and access.url == "https://10.96.0.1:443" and access.ca_file == tmp_path / "ca.crt"
    )
    assert access.headers()["authorization"] == "Bearer one"
    (tmp_path / "token").write_text("rotated\n")  # bound tokens rotate: read at every connection
    assert access.headers()["authorization"] == "Bearer rotated"
    assert KubeAccess.in_cluster({}, tmp_path) is None
    v6 = KubeAccess.in_cluster({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path)
    assert v6 is not None and v6.url == "https://[fd00::1]:443"
