"""`tollway router --config FILE`: run the OpenAI-compatible router.

One process, one event loop: uvicorn serves the app from `router_service.proxy.app`. On SIGTERM /
SIGINT uvicorn stops accepting connections, `/readyz` turns 503, and in-flight requests (streams
included) get `server.drainSeconds` to finish before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import ValidationError


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.config.is_file():
        print(f"tollway router: --config {args.config}: no such file", file=sys.stderr)
        return 2
    import uvicorn

    from router_service.proxy.app import create_app

    try:
        app = create_app(args.config, watch=not args.no_reload, state_url=args.state_url)
    except ValidationError as exc:
        print(f"tollway router: {args.config} is not a valid router config:\n{exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"tollway router: {exc}", file=sys.stderr)
        return 2
    drain = app.state.runtime.state.config.server.drain_seconds
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=max(1, math.ceil(drain)) if drain else None,
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=30,
    )
    runtime = app.state.runtime

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            runtime.draining = True  # /readyz answers 503 at once while in-flight requests finish
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    _DrainingServer(config).run()
    return 0


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
        import uvicorn

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
        drain = self.runtime.state.config.server.drain_seconds
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level=log_level,
                lifespan="on",
                access_log=False,
                timeout_graceful_shutdown=max(1, math.ceil(drain)) if drain else None,
            )
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
        """Graceful stop: stop accepting, let in-flight requests finish (drainSeconds), exit."""
        self.runtime.draining = True
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
