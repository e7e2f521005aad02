"""`tollway router --config FILE`: run the OpenAI-compatible router.

One process, one event loop: uvicorn serves the app from `router_service.app`. On SIGTERM /
SIGINT uvicorn stops accepting connections, `/readyz` turns 503, and in-flight requests (streams
included) get `server.drainSeconds` to finish before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

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

    from router_service.app import create_app

    try:
        app = create_app(args.config, watch=not args.no_reload)
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


if __name__ == "__main__":
    sys.exit(main())
