"""`tollway calibrate`: score the pool's own models on a calibration set and write a routing history.

    tollway calibrate --dataset builtin --backend small=http://127.0.0.1:8001 \\
        --backend large=http://127.0.0.1:8003 --out history.jsonl [--concurrency 8] \\
        [--judge judge=https://api.example.com/v1] [--price large=0.9,0.9] [--json summary.json]

Every line of the set goes to every backend (OpenAI chat completions, one user message,
``x-tollway-priority: sheddable``), the answer is graded, and ``--out`` becomes a history the
router (``history.path``) and ``tollway eval`` load. ``--out.answers.jsonl`` journals every graded
answer: rerunning with the same ``--out`` skips what is done (per model and ``--revision``) and
retries what failed. ``--push NAME=ROUTER_URL`` hands each model's calibration to a running tollway
router (``POST /v1/tollway/calibration``), which routes with it at once. ``--summary-file`` writes
a compact JSON summary of at most 4 KiB (a Kubernetes termination message). Exit status: 0 all
graded (and pushed); 1 some pairs failed or were not sent, or a push failed (the history holds the
complete lines; rerun to retry); 2 bad arguments or calibration set (nothing sent).

API keys: ``--api-key-env NAME=VAR`` reads backend (or judge) NAME's key from $VAR; otherwise
$OPENAI_API_KEY, otherwise none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from router_service.calibration.client import ChatClient, Endpoint, Judge, normalise_base_url
from router_service.calibration.dataset import BUILTIN_SETS, Dataset, DatasetError, load_dataset
from router_service.calibration.graders import JUDGE_PROMPT_PATH, load_judge_template
from router_service.calibration.journal import Journal, JournalError, journal_path
from router_service.calibration.push import PushResult, PushTarget, calibration_payload, push, read_token
from router_service.calibration.report import (
    Price,
    assemble_history,
    compact_summary,
    render_table,
    summarise,
    write_history_atomically,
    write_summary_file,
)
from router_service.calibration.runner import Backend, RunReport, RunSettings, count_pending, run_calibration


class UsageError(ValueError):
    pass


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` strings -> dict, rejecting malformed and repeated names."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = (part.strip() for part in value.partition("="))
        if not sep or not name or not rest:
            raise UsageError(f"{flag} {value!r}: expected NAME=VALUE")
        if name in out:
            raise UsageError(f"{flag}: {name!r} given twice")
        out[name] = rest
    return out


def _price(text: str, name: str) -> Price:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(p < 0 for p in parts):
        raise UsageError(f"--price {name}={text!r}: expected INPUT[,OUTPUT] USD per million tokens, >= 0")
    return Price(parts[0], parts[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollway calibrate",
        description="Score the pool's models on a calibration set; write a routing history.",
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help=f"calibration set (JSONL or .jsonl.gz; repeatable), or a built-in one: {', '.join(BUILTIN_SETS)}",
    )
    parser.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="NAME=BASE_URL",
        help="a model to calibrate: its name (the history column, sent as `model`) and its OpenAI base URL",
    )
    parser.add_argument(
        "--out", required=True, metavar="HISTORY.jsonl", help="the history to write (.jsonl[.gz])"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight per backend (default 8)"
    )
    parser.add_argument("--judge", metavar="NAME=BASE_URL", help="the model grading 'judge' lines")
    parser.add_argument("--judge-prompt", default=str(JUDGE_PROMPT_PATH), help="the judge's rubric template")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the summary as JSON")
    parser.add_argument(
        "--price",
        action="append",
        metavar="NAME=IN[,OUT]",
        help="USD per million prompt (and completion) tokens, for the history's costs (default 1,1)",
    )
    parser.add_argument(
        "--revision",
        action="append",
        metavar="NAME=TEXT",
        help="what NAME serves (e.g. its weights); answers journaled under another revision are redone",
    )
    parser.add_argument(
        "--upstream-model", action="append", metavar="NAME=MODEL", help="send `model: MODEL` for NAME"
    )
    parser.add_argument(
        "--api-key-env", action="append", metavar="NAME=VAR", help="NAME's API key is in $VAR"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="answer length cap (default 512; 0: none)"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries per request, with backoff (default 3)"
    )
    parser.add_argument(
        "--give-up-after",
        type=int,
        default=5,
        help="declare a backend down after this many failed requests in a row (default 5)",
    )
    parser.add_argument(
        "--push",
        action="append",
        metavar="NAME=ROUTER_URL",
        help="after the run, hand each model's calibration to this tollway router (repeatable)",
    )
    parser.add_argument(
        "--push-token-file",
        action="append",
        metavar="NAME=FILE",
        help="router NAME's bearer token: the first token in FILE (the router's tokens file format)",
    )
    parser.add_argument(
        "--summary-file",
        metavar="FILE",
        help="write a compact JSON summary (<= 4 KiB), e.g. /dev/termination-log in a Kubernetes Job",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _endpoints(args: argparse.Namespace) -> tuple[list[Endpoint], Endpoint | None]:
    backends = _pairs(args.backend, "--backend")
    judge = _pairs([args.judge] if args.judge else [], "--judge")
    upstream = _pairs(args.upstream_model, "--upstream-model")
    key_env = _pairs(args.api_key_env, "--api-key-env")
    known = set(backends) | set(judge)
    for flag, names in [("--upstream-model", upstream), ("--api-key-env", key_env)]:
        unknown = sorted(set(names) - known)
        if unknown:
            raise UsageError(f"{flag} names {unknown}, which is no --backend or --judge")

    def endpoint(name: str, url: str) -> Endpoint:
        try:
            base_url = normalise_base_url(url)
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from None
        key = os.environ.get(key_env[name], "") if name in key_env else os.environ.get("OPENAI_API_KEY", "")
        return Endpoint(name, base_url, upstream.get(name, name), key or "EMPTY")

    eps = [endpoint(name, url) for name, url in backends.items()]
    judge_ep = endpoint(*next(iter(judge.items()))) if judge else None
    return eps, judge_ep


def _push_targets(args: argparse.Namespace) -> list[PushTarget]:
    routers = _pairs(args.push, "--push")
    token_files = _pairs(args.push_token_file, "--push-token-file")
    unknown = sorted(set(token_files) - set(routers))
    if unknown:
        raise UsageError(f"--push-token-file names {unknown}, which is no --push")
    targets = []
    for name, url in routers.items():
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--push {name}={url!r}: expected an http(s) URL")
        try:
            token = read_token(token_files[name]) if name in token_files else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        targets.append(PushTarget(name, url, token))
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.give_up_after < 1 or args.max_tokens < 0:
        parser.error("--concurrency and --give-up-after must be >= 1, --retries and --max-tokens >= 0")
    try:
        targets = _push_targets(args)
        endpoints, judge_endpoint = _endpoints(args)
        names = {e.name for e in endpoints}
        prices = {name: _price(text, name) for name, text in _pairs(args.price, "--price").items()}
        revisions = _pairs(args.revision, "--revision")
        for flag, given in [("--price", prices), ("--revision", revisions)]:
            if set(given) - names:
                raise UsageError(f"{flag} names {sorted(set(given) - names)}, which is no --backend")
        dataset = load_dataset(args.dataset)
        needs_judge = any(item.grader == "judge" for item in dataset.items)
        if needs_judge and judge_endpoint is None:
            count = sum(item.grader == "judge" for item in dataset.items)
            raise UsageError(f"{count} line(s) are graded by 'judge': give --judge NAME=BASE_URL")
        template = load_judge_template(args.judge_prompt) if needs_judge else ""
        out = Path(args.out)
        if out.exists() and not journal_path(out).exists():
            raise UsageError(
                f"{out} exists but has no journal {journal_path(out).name} next to it, so it was not written "
                "by `tollway calibrate`; choose another --out or remove it"
            )
        journal = Journal.open(journal_path(out))
    except (UsageError, DatasetError, JournalError, OSError) as exc:
        print(f"tollway calibrate: {exc}", file=sys.stderr)
        if args.summary_file:
            write_summary_file(args.summary_file, {"exit": 2, "error": str(exc)})
        return 2

    settings = RunSettings(
        concurrency=args.concurrency,
        max_tokens=args.max_tokens or None,
        temperature=args.temperature,
        give_up_after=args.give_up_after,
    )
    models = [(e.name, revisions.get(e.name, "")) for e in endpoints]
    with journal:
        if journal.dropped_torn_line:
            print(
                f"tollway calibrate: {journal.path}: dropped a line cut short by an earlier crash",
                file=sys.stderr,
            )
        try:
            report = asyncio.run(
                _run(dataset, endpoints, judge_endpoint, template, revisions, journal, settings, args)
            )
        except KeyboardInterrupt:
            print(
                f"\ntollway calibrate: interrupted; every graded answer is in {journal.path}: "
                "rerun the same command to continue",
                file=sys.stderr,
            )
            return 130
        assembly = assemble_history(dataset, models, journal, prices)
        summary = summarise(dataset, models, journal, report)
        pushes = _push_all(targets, dataset, models, journal, report, ",".join(args.dataset))
    status = _finish(args, assembly, summary, report, pushes)
    if args.summary_file:
        write_summary_file(args.summary_file, compact_summary(summary, pushes, status))
    return status


def _push_all(
    targets: list[PushTarget],
    dataset: Dataset,
    models: list[tuple[str, str]],
    journal: Journal,
    report: RunReport,
    label: str,
) -> list[PushResult]:
    """Every model with graded lines (and not declared down in this run) to every router."""
    if not targets:
        return []
    import httpx

    results = []
    with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        for name, revision in models:
            if name in report.down:
                results += [
                    PushResult(t.name, name, False, detail="not pushed: the model is down") for t in targets
                ]
                continue
            payload = calibration_payload(dataset, name, revision, journal, label)
            if payload is None:
                continue
            for target in targets:
                result = push(target, payload, client=client)
                results.append(result)
                what = "in use" if result.in_use else (result.detail or "stored, not in use yet")
                message = f"pushed {name} ({len(payload['rows'])} lines) to {target.name}: " + (
                    what if result.ok else f"FAILED: {result.detail}"
                )
                print(f"tollway calibrate: {message}", file=sys.stderr)
    return results


async def _run(
    dataset: Dataset,
    endpoints: list[Endpoint],
    judge_endpoint: Endpoint | None,
    template: str,
    revisions: dict[str, str],
    journal: Journal,
    settings: RunSettings,
    args: argparse.Namespace,
) -> RunReport:
    from tqdm import tqdm

    clients = [ChatClient(e, timeout=args.timeout, max_retries=args.retries) for e in endpoints]
    judge_client = (
        ChatClient(judge_endpoint, timeout=args.timeout, max_retries=args.retries) if judge_endpoint else None
    )
    backends = [Backend(c, revisions.get(c.endpoint.name, "")) for c in clients]
    judge = Judge(judge_client, template) if judge_client else None
    pending = count_pending(dataset, backends, journal)
    try:
        with tqdm(
            total=pending, desc="calibrating", unit="answer", disable=args.no_progress, file=sys.stderr
        ) as bar:
            return await run_calibration(
                dataset,
                backends,
                journal,
                judge=judge,
                settings=settings,
                on_pair=lambda: bar.update(),
                say=lambda message: tqdm.write(f"tollway calibrate: {message}", file=sys.stderr),
            )
    finally:
        for client in [*clients, *([judge_client] if judge_client else [])]:
            await client.aclose()


def _finish(
    args: argparse.Namespace,
    assembly: Any,
    summary: dict[str, Any],
    report: RunReport,
    pushes: list[PushResult],
) -> int:
    from rich.console import Console

    console = Console(width=140)
    console.print(render_table(summary))
    run = summary["run"]
    console.print(
        f"{run['pairs_answered']} answers graded in {run['seconds']:.1f}s "
        f"({run['pairs_already_done']} already done); model tokens {summary['totals']['model_tokens']:,}, "
        f"judge tokens {summary['totals']['judge_tokens']:,}",
        highlight=False,
    )
    if assembly.history is not None:
        write_history_atomically(assembly.history, args.out)
        summary["history"] = {
            "path": str(args.out),
            "lines": len(assembly.history),
            "models": assembly.history.models,
            "lines_left_out": assembly.lines_left_out,
            "models_left_out": assembly.models_left_out,
        }
        console.print(
            f"wrote {args.out}: {len(assembly.history)} lines x {len(assembly.history.models)} models",
            highlight=False,
        )
    else:
        summary["history"] = None
        print("tollway calibrate: no line was graded for every model; no history written", file=sys.stderr)
    if assembly.models_left_out:
        print(
            f"tollway calibrate: left out of the history (no graded answer): {', '.join(assembly.models_left_out)}",
            file=sys.stderr,
        )
    if assembly.lines_left_out and assembly.history is not None:
        print(
            f"tollway calibrate: {assembly.lines_left_out} line(s) lack a graded answer from some model and are "
            "not in the history yet",
            file=sys.stderr,
        )
    summary["pushes"] = [
        {"router": p.target, "model": p.model, "ok": p.ok, "inUse": p.in_use, "detail": p.detail}
        for p in pushes
    ]
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    failed_pushes = [p for p in pushes if not p.ok]
    if failed_pushes:
        print(
            f"tollway calibrate: {len(failed_pushes)} push(es) failed; rerun the same command to push again "
            "(nothing is sent to the models twice)",
            file=sys.stderr,
        )
        return 1
    if not report.complete:
        print(
            f"tollway calibrate: {len(report.failures)} failed, {sum(report.not_sent.values())} not sent; "
            "rerun the same command to retry them (graded answers are kept)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
