"""Running a recorded invocation again: the same function, event and parameters.

The server replays through `Service.invoke` (api/history.py); the CLI, without a
server, through the executor like `fnserve run` (here), in the functions directory
recorded with the invocation unless told another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .errors import NotFound, NotReplayable, UsageError
from .executor import Result, StderrSink
from .history import HistoryStore, Record, make_record
from .invoke import run_function
from .registry import load_registry


def check_replayable(record: Record) -> None:
    if record.request_truncated:
        raise NotReplayable()


def replay_locally(record: Record, directory: str | Path | None, environ: Mapping[str, str],
                   stderr_sink: StderrSink | None = None) -> Result:
    check_replayable(record)
    where = Path(directory) if directory is not None else Path(record.functions_dir or ".")
    if not where.is_dir():
        raise UsageError(f"{where}: not a directory (give the functions directory with --dir)")
    try:
        spec = load_registry(where).get(record.function)
    except NotFound:
        raise UsageError(f"no function named {record.function!r} in {where}") from None
    return run_function(spec, record.request or b"{}", parameters=record.parameters,
                        environ=environ, stderr_sink=stderr_sink)


_STATUS = {"ok": 200, "timeout": 504, "cancelled": 499, "unavailable": 503}


def record_local_replay(store: HistoryStore, original: Record, result: Result,
                        directory: str | Path | None, max_records: int | None = None) -> None:
    """Keep the CLI's replay in the history too, as a `replay` of the original."""
    store.insert([make_record(
        request_id=result.context.request_id, function=original.function, source="replay",
        method=original.method, started_at=result.context.timestamp,
        duration_ms=result.duration * 1000,
        status=_STATUS.get(result.outcome, 502), outcome=result.outcome,
        exit_code=result.exit_code, signal=result.signal, request=original.request,
        parameters=original.parameters, response=result.stdout,
        stderr=result.stderr_tail, trace_id=result.context.tracing.trace_id,
        replay_of=original.request_id,
        functions_dir=str(Path(directory).resolve()) if directory else original.functions_dir,
    )], max_records)
