"""`tollway operator`: run the operator (wraps `kopf run`).

    tollway operator --namespace ml --namespace team-b      # watch these namespaces
    tollway operator --all-namespaces                        # the default
    tollway operator --standalone                            # one replica, no peering
    tollway operator --peering tollway                       # two+ replicas: one active, others standby

Peering (leader election): every replica registers in the KopfPeering (per watched namespace) or
ClusterKopfPeering object named by `--peering`, which the operator creates at start-up when it is
missing (kopf's `kopf.dev` CRDs must be installed: the Helm chart does); kopf pauses every replica
that sees a peer with a higher priority, so exactly one replica works. The priority is
random per process unless `--priority` is given (equal priorities would pause all replicas).

Loads `tollway_operator.handlers` and, when present, `tollway_operator.autoscaler`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys

HANDLER_MODULES = ("tollway_operator.handlers", "tollway_operator.autoscaler")


def handler_modules() -> list[str]:
    """The modules kopf loads: the handlers, and the autoscaler if it is installed."""
    return [m for m in HANDLER_MODULES if importlib.util.find_spec(m) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollway operator", description="Run the tollway operator (kopf).")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="no peering: for a single replica")
    peering.add_argument(
        "--peering",
        default=os.environ.get("TOLLWAY_OPERATOR_PEERING", "tollway"),
        help="peering object name (default: %(default)s)",
    )
    parser.add_argument(
        "--priority", type=int, default=None, help="peering priority (default: random, so one replica leads)"
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL ('' to disable; default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("TOLLWAY_OPERATOR_METRICS_PORT", "8090")),
        help="Prometheus /metrics port (0: off; default: %(default)s)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(os.environ.get("TOLLWAY_OPERATOR_RESYNC_SECONDS", "60")),
        help="drift-repair interval (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-seconds",
        type=float,
        default=float(os.environ.get("TOLLWAY_OPERATOR_RETRY_SECONDS", "15")),
        help="recheck interval while waiting, e.g. for a pool (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


def kopf_args(args: argparse.Namespace) -> list[str]:
    """The `kopf` command line for the parsed options."""
    argv = ["run"]
    for module in handler_modules():
        argv += ["-m", module]
    if args.namespace:
        for ns in args.namespace:
            argv += ["--namespace", ns]
    else:
        argv.append("--all-namespaces")
    if args.standalone:
        argv.append("--standalone")
    else:
        argv += [
            "--peering",
            args.peering,
            "--priority",
            str(args.priority if args.priority is not None else random.randint(1, 2**31 - 1)),
        ]
    if args.liveness:
        argv += ["--liveness", args.liveness]
    if args.verbose:
        argv.append("--verbose")
    if args.debug:
        argv.append("--debug")
    return argv


def configure_environment(args: argparse.Namespace) -> None:
    """Settings the handler module reads when kopf imports it."""
    os.environ["TOLLWAY_OPERATOR_RESYNC_SECONDS"] = str(args.resync_seconds)
    os.environ["TOLLWAY_OPERATOR_RETRY_SECONDS"] = str(args.retry_seconds)
    os.environ["TOLLWAY_OPERATOR_NAMESPACES"] = ",".join(args.namespace)  # peering objects go there
    if args.metrics_port:
        os.environ["TOLLWAY_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    else:
        os.environ.pop("TOLLWAY_OPERATOR_METRICS_PORT", None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resync_seconds <= 0 or args.retry_seconds <= 0:
        print("tollway operator: --resync-seconds and --retry-seconds must be > 0", file=sys.stderr)
        return 2
    configure_environment(args)
    import kopf.cli

    try:
        kopf.cli.main(args=kopf_args(args), prog_name="tollway operator", standalone_mode=False)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
