"""Connections to the endpoints: one keep-alive pool per endpoint.

Each endpoint (a pod, a static replica, a Service URL, see `endpoints.py`) gets its own aiohttp
session, made on its first request. Inside a cluster the router talks to the pods themselves, so
no kube-proxy pins a keep-alive connection to one pod: a new endpoint takes requests from the
moment it is picked, and one that leaves its model's set is picked no more; its connections are
closed once its last request in flight has ended (`close_unused`, after every scrape round).

The pools are not capped: admission (`degradation.maxInFlightPerReplica`, `maxNumSeqs`) bounds the
requests in flight to each endpoint, and a cap below that would only add a hidden queue.
aiohttp rather than httpx on this path: per request it costs a tenth of the CPU (~0.1 ms against
~1 ms measured here; see the proxy overhead section of benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import aiohttp

from router_service.config import ServerConfig

READ_BUFFER_BYTES = 1 << 16


def new_session(connect_timeout: float, *, read_bufsize: int = READ_BUFFER_BYTES) -> aiohttp.ClientSession:
    """A session with the router's settings: raw bytes relayed as sent (no decompression), the
    request's own deadlines (set by the caller) instead of a session-wide total."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        auto_decompress=False,
        read_bufsize=read_bufsize,
        skip_auto_headers=("User-Agent",),
    )


class Connections:
    """One aiohttp session per endpoint URL."""

    def __init__(self, server: ServerConfig) -> None:
        self.connect_timeout = server.connect_timeout_seconds
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def configure(self, server: ServerConfig) -> None:
        """New sessions use the new connect timeout; existing ones keep theirs."""
        self.connect_timeout = server.connect_timeout_seconds

    def session(self, endpoint: str) -> aiohttp.ClientSession:
        found = self._sessions.get(endpoint)
        if found is None or found.closed:
            found = self._sessions[endpoint] = new_session(self.connect_timeout)
        return found

    def endpoints(self) -> list[str]:
        return list(self._sessions)

    async def close_unused(self, in_use: Collection[str]) -> None:
        """Close the pools of endpoints no longer in use (removed, and nothing in flight)."""
        gone = [e for e in self._sessions if e not in in_use]
        sessions = [self._sessions.pop(e) for e in gone]
        if sessions:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def close(self) -> None:
        await self.close_unused(())
