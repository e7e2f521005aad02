"""The `tollway` command: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the concept and exposes `main(argv) -> int`;
this file only dispatches, importing the module lazily so that `tollway router` never loads
the operator's dependencies and `tollway operator` never loads the routing engine.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("tollway_operator.crdgen", "write the CustomResourceDefinitions generated from the API models"),
    "operator": ("tollway_operator.run", "run the operator (wraps `kopf run`)"),
    "router": ("router_service.proxy.server", "run the OpenAI-compatible router from a config file"),
    "simulate": ("router_service.simulator.cli", "run a vLLM-compatible simulator for one model"),
    "eval": ("router_service.evaluation.cli", "replay a query stream through routing algorithms"),
    "calibrate": ("router_service.calibration.cli", "score the pool's models on a labelled set -> a history"),
    "demo": ("router_service.demo", "run simulators + router locally and replay real prompts"),
}


def usage() -> str:
    lines = ["usage: tollway <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`tollway <command> --help` shows each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tollway: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
