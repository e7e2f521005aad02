"""`tollway router --config FILE`: run the OpenAI-compatible router.

One process, one event loop: uvicorn serves the app from `router_service.proxy.app`, on uvloop's
event loop with httptools' HTTP parser (`SERVER_SPEED`: the pure-Python defaults, asyncio and h11,
cost several times the CPU per request). On SIGTERM /
SIGINT the router drains first (`Runtime.drain`): it keeps listening, so `/readyz` answers 503
(a readiness probe and the endpoints controller see it go) while requests in flight, streams
included, get `server.drainSeconds` to finish; streams still open then end with an SSE error event.
Only then does uvicorn stop accepting connections and exit. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from pydantic import ValidationError

SERVER_SPEED: dict[str, Any] = {"loop": "uvloop", "http": "httptools"}
"""uvicorn's fastest event loop and HTTP parser (both are dependencies of tollway)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollway router", description="Run the OpenAI-compatible, budget- and load-aware router."
    )
    parser.add_argument("--config", required=True, type=Path, help="router config file (YAML or JSON)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--no-reload", action="store_true", help="do not watch the config file for changes")
    parser.add_argument(
        "--state-url",
        default=None,
        metavar="redis://HOST:PORT/DB",
        help=(
            "share budgets, dual prices and learned history with the other replicas through this Redis "
            "(default: $TOLLWAY_STATE_URL, else state.url in the config, else in-process state)"
        ),
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it costs latency)")
    return parser


def configure_logging(level: str) -> None:
    """Log at `level`; httpx's line per request (the routing history download, embedding calls)
    only at debug."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.config.is_file():
        print(f"tollway router: --config {args.config}: no such file", file=sys.stderr)
        return 2
    from router_service.proxy.app import create_app

    try:
        app = create_app(args.config, watch=not args.no_reload, state_url=args.state_url)
    except ValidationError as exc:
        print(f"tollway router: {args.config} is not a valid router config:\n{exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"tollway router: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=AFTER_DRAIN_SECONDS,
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=30,
        **SERVER_SPEED,
    )
    DrainingServer(config, app.state.runtime).run()
    return 0


AFTER_DRAIN_SECONDS = 3
"""uvicorn's own graceful-shutdown limit, once the router's drain has ended every stream."""


class DrainingServer(uvicorn.Server):
    """uvicorn, with the router's drain (`Runtime.drain`) between the first exit signal and
    uvicorn's own shutdown, so the socket keeps answering (503 on /readyz) while requests finish."""

    def __init__(self, config: uvicorn.Config, runtime: Any) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain is not None or self.loop is None:
            super().handle_exit(sig, frame)  # a second signal (or not serving yet): stop now
            return
        self.runtime.draining = True  # /readyz answers 503 at once
        self.loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start draining (on the server's loop); uvicorn exits when the drain ends."""
        if self._drain is None and self.loop is not None:
            self._drain = self.loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.runtime.drain(self.runtime.state.config.server.drain_seconds)
        finally:
            self.should_exit = True


class BackgroundRouter:
    """A router served by uvicorn on a thread of this process (tests, the demo, benchmarks).

    Binds 127.0.0.1 on a free port unless told otherwise; `url` is the base URL without /v1.
    `create_app_kwargs` go to `router_service.proxy.app.create_app`.
    """

    def __init__(
        self,
        config: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        **create_app_kwargs: Any,
    ) -> None:
        from router_service.proxy.app import create_app

        self.app = create_app(config, **create_app_kwargs)
        self.runtime = self.app.state.runtime
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(4096)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._server = DrainingServer(
            uvicorn.Config(
                self.app,
                log_level=log_level,
                lifespan="on",
                access_log=False,
                timeout_graceful_shutdown=AFTER_DRAIN_SECONDS,
                **SERVER_SPEED,
            ),
            self.runtime,
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 30.0) -> BackgroundRouter:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="tollway-router", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"router failed to start on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop, as on SIGTERM: drain (drainSeconds), then stop listening and exit."""
        loop = self._server.loop
        if self._thread is not None and self._thread.is_alive() and loop is not None:
            self.runtime.draining = True
            loop.call_soon_threadsafe(self._server.begin_drain)
        else:
            self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundRouter:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
