"""`tollway operator` options become the right `kopf run` command line."""

from __future__ import annotations

import pytest

from tollway_operator import run


def kopf_argv(*argv: str) -> list[str]:
    return run.kopf_args(run.build_parser().parse_args(list(argv)))


def test_loads_handlers_and_autoscaler() -> None:
    argv = kopf_argv("--standalone")
    modules = [argv[i + 1] for i, a in enumerate(argv) if a == "-m"]
    assert modules[0] == "tollway_operator.handlers"
    assert modules == run.handler_modules()
    assert "tollway_operator.autoscaler" in modules  # present in this checkout


def test_namespaces_or_all() -> None:
    argv = kopf_argv("-n", "a", "--namespace", "b", "--standalone")
    assert argv.count("--namespace") == 2 and "a" in argv and "b" in argv and "--all-namespaces" not in argv
    assert "--all-namespaces" in kopf_argv("--standalone")
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["-n", "a", "-A"])


def test_peering_with_priority() -> None:
    argv = kopf_argv("--peering", "ours", "--priority", "7")
    assert argv[argv.index("--peering") + 1] == "ours" and argv[argv.index("--priority") + 1] == "7"
    assert "--standalone" not in argv
    random_priority = kopf_argv()
    assert int(random_priority[random_priority.index("--priority") + 1]) > 0
    assert "--peering" not in kopf_argv("--standalone")


def test_liveness_and_verbosity() -> None:
    argv = kopf_argv("--liveness", "http://0.0.0.0:9999/healthz", "-v", "--standalone")
    assert argv[argv.index("--liveness") + 1] == "http://0.0.0.0:9999/healthz" and "--verbose" in argv
    assert "--liveness" not in kopf_argv("--liveness", "", "--standalone")


def test_environment_for_the_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "TOLLWAY_OPERATOR_RESYNC_SECONDS",
        "TOLLWAY_OPERATOR_RETRY_SECONDS",
        "TOLLWAY_OPERATOR_METRICS_PORT",
    ):
        monkeypatch.delenv(var, raising=False)
    run.configure_environment(
        run.build_parser().parse_args(
            ["--resync-seconds", "5", "--retry-seconds", "2", "--metrics-port", "0"]
        )
    )
    import os

    assert os.environ["TOLLWAY_OPERATOR_RESYNC_SECONDS"] == "5.0"
    assert os.environ["TOLLWAY_OPERATOR_RETRY_SECONDS"] == "2.0"
    assert "TOLLWAY_OPERATOR_METRICS_PORT" not in os.environ


def test_bad_intervals_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--resync-seconds", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err
