"""`fnserve history`, `fnserve show`, `fnserve replay` (SPEC §10): thin click commands
over fnserve.history and fnserve.replay, reading the same file the server writes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .config import history_path
from .errors import FnServeError
from .history import HistoryError, HistoryStore, Record

_HISTORY_HELP = "The history file (default: FNSERVE_HISTORY, else ~/.local/share/fnserve/...)."


def _store(path: str | None) -> HistoryStore:
    from .cli import CliError

    where = history_path(os.environ, path or os.environ.get("FNSERVE_HISTORY"))
    if where is None:
        raise CliError("the history is off: give --history PATH")
    if not where.is_file():
        raise CliError(f"no history at {where} (nothing was served with it yet?)")
    return HistoryStore(where)


def _record(store: HistoryStore, request_id: str) -> Record:
    from .cli import CliError

    try:
        record = store.get(request_id)
    except HistoryError as exc:
        raise CliError(str(exc)) from None
    if record is None:
        raise CliError(f"no invocation {request_id!r} in {store.path}")
    return record


def _duration(ms: float) -> str:
    return f"{ms:.0f}ms" if ms >= 10 else f"{ms:.1f}ms"


@click.command()
@click.option("--function", "function", metavar="NAME", help="Only this function's.")
@click.option("--outcome", metavar="OUTCOME", help="Only this outcome (ok, failed, ...).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000),
              metavar="N", help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="The records as JSON, as /invocations.")
@click.option("--history", "path", metavar="PATH", help=_HISTORY_HELP)
def history(function: str | None, outcome: str | None, limit: int, as_json: bool,
            path: str | None) -> None:
    """List recorded invocations, newest first."""
    from .cli import CliError

    try:
        records, following = _store(path).list(function=function, outcome=outcome, limit=limit)
    except HistoryError as exc:
        raise CliError(str(exc)) from None
    rows = records
    if as_json:
        click.echo(json.dumps({"invocations": [r.to_json() for r in rows], "next": following},
                              indent=2))
        return
    if not rows:
        click.echo("no invocations recorded")
        return
    table = [("STARTED", "FUNCTION", "SOURCE", "STATUS", "OUTCOME", "DURATION", "REQUEST ID")]
    table += [(r.started_at[:23].replace("T", " "), r.function, r.source, str(r.status),
               r.outcome, _duration(r.duration_ms), r.request_id) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  ".join([cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
                             + [row[-1]]))


def _section(title: str, data: bytes, note: str = "") -> None:
    click.echo(f"--- {title}{note} ---")
    text = data.decode("utf-8", "replace")
    click.echo(text if text.endswith("\n") or not text else text + "\n", nl=False)


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@click.option("--history", "path", metavar="PATH", help=_HISTORY_HELP)
def show(request_id: str, as_json: bool, path: str | None) -> None:
    """Show one recorded invocation: input, output, stderr, status, duration."""
    record = _record(_store(path), request_id)
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    fields: list[tuple[str, Any]] = [
        ("request id", record.request_id), ("function", record.function),
        ("source", record.source), ("method", record.method),
        ("started", record.started_at), ("duration", _duration(record.duration_ms)),
        ("status", record.status), ("outcome", record.outcome),
        ("exit code", record.exit_code), ("signal", record.signal),
        ("trace id", record.trace_id), ("replay of", record.replay_of),
        ("parameters", json.dumps(dict(record.parameters)) if record.parameters else None),
        ("directory", record.functions_dir),
    ]
    for name, value in fields:
        if value not in (None, ""):
            click.echo(f"{name + ':':<12} {value}")
    _section("request", record.request, " (first 64 KiB)" if record.request_truncated else "")
    _section("response", record.response,
             " (first 64 KiB)" if record.response_truncated else "")
    _section("stderr", record.stderr, " (last 4 KiB)")


@click.command()
@click.argument("request_id")
@click.option("--dir", "directory", metavar="DIR",
              help="The functions directory (default: the one recorded with it).")
@click.option("--history", "path", metavar="PATH", help=_HISTORY_HELP)
def replay(request_id: str, directory: str | None, path: str | None) -> None:
    """Run a recorded invocation again (same event and parameters), like `fnserve run`."""
    from .cli import CliError, exit_with_result
    from .replay import record_local_replay, replay_locally

    store = _store(path)
    record = _record(store, request_id)

    def echo_stderr(_invocation: object, line: str) -> None:
        click.echo(line, err=True)

    try:
        result = replay_locally(record, directory, os.environ, stderr_sink=echo_stderr)
    except FnServeError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        record_local_replay(store, record, result,
                            Path(directory) if directory else None)
    except HistoryError as exc:  # the replay ran: its answer matters more than its record
        click.echo(f"fnserve: not recorded: {exc}", err=True)
    exit_with_result(record.function, result)
