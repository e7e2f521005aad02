"""Helpers shared by the router tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from router_service.config import RouterConfig
from router_service.routing.engine import Ranking
from router_service.routing.policy import Candidate

PROFILES = {
    "small": "mistralai/mistral-7b-chat",
    "medium": "mistralai/mixtral-8x7b-chat",
    "large": "gpt-4-1106-preview",
}
PRICES = {"small": (0.2, 0.2), "medium": (0.6, 0.6), "large": (10.0, 30.0)}


class FixedEngine:
    """A routing engine whose ranking is fixed, so a test knows which model is best."""

    def __init__(self, order: list[str], est_tokens: float = 60.0) -> None:
        self.order = order
        self.est_tokens = est_tokens
        self.gamma = {m: 0.001 * (i + 1) for i, m in enumerate(order)}
        self.prompts: list[str] = []

    def rank(self, prompt: str, priority: str | None = None) -> Ranking:
        self.prompts.append(prompt)
        n = len(self.order)
        candidates = [Candidate(m, float(n - i), 0.5, self.est_tokens) for i, m in enumerate(self.order)]
        return Ranking(candidates=candidates, phase="routed", decision_seconds=0.0)


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_config(urls: dict[str, str], **overrides: Any) -> RouterConfig:
    """Three backends (small / medium / large) at `urls`; `overrides` are top-level config keys
    (camelCase wire form), `replicas` a {name: n} map."""
    replicas = overrides.pop("replicas", {})
    backends = [
        {
            "name": name,
            "url": url,
            "profile": PROFILES[name],
            "price": {"inputPerMillionTokens": PRICES[name][0], "outputPerMillionTokens": PRICES[name][1]},
            "replicas": replicas.get(name, 1),
        }
        for name, url in urls.items()
    ]
    data = {"backends": backends, "degradation": {"scrapeIntervalSeconds": 0.1}, **overrides}
    return RouterConfig.model_validate(data)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
