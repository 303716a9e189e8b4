"""The invocation history (SPEC §10): one SQLite file, no Flask.

- `HistoryWriter`: what a server uses. `submit()` never blocks: it puts the record
  on a bounded hand-off queue, or drops it and counts (`dropped`) when the queue is
  full. One background thread takes what is queued, writes it in one transaction
  and prunes to the newest `max_records`.
- `HistoryStore`: the narrow read API (`list`, `get`, `figures`) and `insert` for a
  one-off write (the CLI's replay).

Several processes (gunicorn workers, two servers, the CLI) can share one file: WAL
lets readers run beside the writer, writes start with BEGIN IMMEDIATE (so no reader
has to upgrade its lock, the case SQLite's busy handler cannot retry) and wait up to
BUSY_TIMEOUT for another process's write.

The schema is versioned with PRAGMA user_version: MIGRATIONS[i] takes a file from
version i to i + 1, so a file written by an older FnServe is brought up to date
when it is opened, and one written by a newer FnServe is refused.
"""

from __future__ import annotations

import atexit
import builtins
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("fnserve.history")

BODY_LIMIT = 64 * 1024  # request and response: the first 64 KiB are kept
STDERR_LIMIT = 4 * 1024  # stderr: the last 4 KiB
BUSY_TIMEOUT = 10.0  # seconds a write waits for another process's write
QUEUE_SIZE = 10_000  # records waiting for the writer; one more is dropped
BATCH = 500  # records written in one transaction at most
LINGER = 0.2  # seconds the writer lets records gather after the first: fewer transactions
REDACTED = b"[redacted]"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE invocations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        function TEXT NOT NULL,
        source TEXT NOT NULL,
        method TEXT NOT NULL DEFAULT 'POST',
        started_at TEXT NOT NULL,
        duration_ms REAL NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        exit_code INTEGER,
        signal INTEGER,
        request BLOB NOT NULL,
        request_truncated INTEGER NOT NULL DEFAULT 0,
        parameters TEXT NOT NULL DEFAULT '{}',
        response BLOB NOT NULL,
        response_truncated INTEGER NOT NULL DEFAULT 0,
        content_type TEXT NOT NULL DEFAULT '',
        stderr BLOB NOT NULL,
        trace_id TEXT NOT NULL DEFAULT '',
        replay_of TEXT,
        functions_dir TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX invocations_request_id ON invocations (request_id);
    CREATE INDEX invocations_function ON invocations (function, seq);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ("request_id", "function", "source", "method", "started_at", "duration_ms",
            "status", "outcome", "exit_code", "signal", "request", "request_truncated",
            "parameters", "response", "response_truncated", "content_type", "stderr",
            "trace_id", "replay_of", "functions_dir")
_SUMMARY = ("request_id", "function", "source", "method", "started_at", "duration_ms",
            "status", "outcome", "exit_code", "signal", "trace_id", "replay_of")
_INSERT = (f"INSERT INTO invocations ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


class HistoryError(ConfigError):
    """The history file cannot be opened or read (its path and why)."""


@dataclass(frozen=True)
class Record:
    """One invocation as stored: bodies already cut, secrets already taken out."""

    request_id: str
    function: str
    source: str
    started_at: str
    duration_ms: float
    status: int
    outcome: str
    method: str = "POST"
    exit_code: int | None = None
    signal: int | None = None
    request: bytes = b""
    request_truncated: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)
    response: bytes = b""
    response_truncated: bool = False
    content_type: str = ""
    stderr: bytes = b""
    trace_id: str = ""
    replay_of: str | None = None
    functions_dir: str = ""

    def row(self) -> tuple[Any, ...]:
        """The values in _COLUMNS order (by hand: dataclasses.asdict deep-copies)."""
        return (self.request_id, self.function, self.source, self.method, self.started_at,
                self.duration_ms, self.status, self.outcome, self.exit_code, self.signal,
                self.request, int(self.request_truncated), json.dumps(dict(self.parameters)),
                self.response, int(self.response_truncated), self.content_type, self.stderr,
                self.trace_id, self.replay_of, self.functions_dir)

    def to_json(self) -> dict[str, Any]:
        """The record as /invocations and `fnserve show --json` give it: bodies as text."""
        body = asdict(self)
        for name in ("request", "response", "stderr"):
            body[name] = getattr(self, name).decode("utf-8", "replace")
        body["parameters"] = dict(self.parameters)
        return body


def _redact(data: bytes, secrets: Sequence[bytes]) -> bytes:
    for secret in secrets:
        if secret and secret in data:
            data = data.replace(secret, REDACTED)
    return data


def secrets_of(values: Iterable[str]) -> tuple[bytes, ...]:
    """What must never be stored, from credential header values: each whole value, and
    the token of `Scheme token` and an AWS `Signature=...` (a function may echo either)."""
    found: set[bytes] = set()
    for value in values:
        value = value.strip()
        if len(value) < 4:  # too short to be a secret, and would redact common bytes
            continue
        found.add(value.encode("utf-8", "surrogateescape"))
        _scheme, _, token = value.partition(" ")
        if len(token.strip()) >= 4:
            found.add(token.strip().encode("utf-8", "surrogateescape"))
        for part in value.replace(",", " ").split():
            if part.startswith("Signature=") and len(part) > 14:
                found.add(part[len("Signature="):].encode())
    return tuple(sorted(found, key=len, reverse=True))  # longest first: no partial leftovers


def make_record(
    *,
    request_id: str,
    function: str,
    source: str,
    started_at: str,
    duration_ms: float,
    status: int,
    outcome: str,
    request: bytes,
    response: bytes,
    stderr: bytes = b"",
    secrets: Sequence[bytes] = (),
    **rest: Any,
) -> Record:
    """A Record with the bodies cut to their limits and every secret replaced.

    Secrets are replaced before cutting, so a secret across the cut is not half kept.
    """
    request = _redact(request, secrets)
    response = _redact(response, secrets)
    stderr = _redact(stderr, secrets)
    return Record(
        request_id=request_id, function=function, source=source, started_at=started_at,
        duration_ms=round(duration_ms, 3), status=status, outcome=outcome,
        request=request[:BODY_LIMIT], request_truncated=len(request) > BODY_LIMIT,
        response=response[:BODY_LIMIT], response_truncated=len(response) > BODY_LIMIT,
        stderr=stderr[-STDERR_LIMIT:], **rest)


def record_row(
    request_id: str, function: str, source: str, method: str, started_at: str,
    duration_ms: float, status: int, outcome: str, exit_code: int | None,
    signal: int | None, request: bytes, parameters: Mapping[str, str], response: bytes,
    content_type: str, stderr: bytes, trace_id: str, replay_of: str | None,
    functions_dir: str, secrets: Sequence[bytes],
) -> tuple[Any, ...]:
    """make_record's row, without building a Record: the writer's fast path (measured:
    a frozen 20-field dataclass costs it a third of its time per record)."""
    if secrets:
        request = _redact(request, secrets)
        response = _redact(response, secrets)
        stderr = _redact(stderr, secrets)
    return (request_id, function, source, method, started_at, round(duration_ms, 3), status,
            outcome, exit_code, signal, request[:BODY_LIMIT], int(len(request) > BODY_LIMIT),
            json.dumps(dict(parameters)) if parameters else "{}", response[:BODY_LIMIT],
            int(len(response) > BODY_LIMIT), content_type, stderr[-STDERR_LIMIT:], trace_id,
            replay_of, functions_dir)


def head(data: bytes, secrets: Sequence[bytes]) -> bytes:
    """What the request path hands over of a body: enough to cut and redact, no more
    (so a queue of records never holds megabytes of bodies)."""
    margin = max((len(secret) for secret in secrets), default=0)
    return data[:BODY_LIMIT + 1 + margin]


def tail(data: bytes, secrets: Sequence[bytes]) -> bytes:
    margin = max((len(secret) for secret in secrets), default=0)
    return data[-(STDERR_LIMIT + margin):]


# -- the file -------------------------------------------------------------------------


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating it and its directory) and migrate the history file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise HistoryError(f"{path}: cannot open the history: {exc}") from None
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints
        _migrate(connection, path)
    except sqlite3.Error as exc:
        connection.close()
        raise HistoryError(f"{path}: not a usable history file: {exc}") from None
    except HistoryError:
        connection.close()
        raise
    return connection


def check_history(path: Path | None) -> None:
    """Raise HistoryError (a FnServeError: exit 2) unless `path` is off or usable."""
    if path is not None:
        connect(path).close()


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{path}: written by a newer FnServe (schema {version}, "
                               f"this one knows {SCHEMA_VERSION})")
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number + 1}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _from_row(row: sqlite3.Row) -> Record:
    values = dict(zip(row.keys(), row, strict=True))  # a Row iterates over its values
    values.pop("seq", None)
    values["parameters"] = json.loads(values.get("parameters") or "{}")
    values["request_truncated"] = bool(values.get("request_truncated"))
    values["response_truncated"] = bool(values.get("response_truncated"))
    return Record(**values)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


class HistoryStore:
    """Reads (and one-off writes) of one history file; a connection per call, so any
    thread may use it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = connect(self.path)
        connection.row_factory = sqlite3.Row
        try:
            yield connection
        finally:
            connection.close()

    def insert(self, records: Sequence[Record], max_records: int | None = None) -> None:
        with self._connection() as connection:
            write_batch(connection, records, max_records)

    def list(self, *, function: str | None = None, outcome: str | None = None,
             limit: int = DEFAULT_LIMIT, before: str | None = None,
             ) -> tuple[list[Record], str | None]:
        """Newest first; `next` is the request id to pass as `before` for the next page."""
        rows, following = self._page("*", function, outcome, limit, before)
        return [_from_row(row) for row in rows], following

    def summaries(self, limit: int = DEFAULT_LIMIT) -> builtins.list[dict[str, Any]]:
        """The newest invocations without their bodies (the dashboard's live list)."""
        rows, _ = self._page(", ".join(_SUMMARY), None, None, limit, None)
        return [{name: row[name] for name in _SUMMARY} for row in rows]

    def _page(self, columns: str, function: str | None, outcome: str | None, limit: int,
              before: str | None) -> tuple[builtins.list[sqlite3.Row], str | None]:
        limit = max(1, min(limit, MAX_LIMIT))
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if function:
            where.append("function = ?")
            args.append(function)
        if outcome:
            where.append("outcome = ?")
            args.append(outcome)
        with self._connection() as connection:
            if before:
                row = connection.execute("SELECT MAX(seq) FROM invocations WHERE request_id = ?",
                                         (before,)).fetchone()
                if row[0] is None:
                    return [], None
                where.append("seq < ?")
                args.append(row[0])
            sql = (f"SELECT {columns} FROM invocations"
                   f"{' WHERE ' + ' AND '.join(where) if where else ''}"
                   " ORDER BY seq DESC LIMIT ?")
            rows = connection.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["request_id"] if more else None)

    def get(self, request_id: str) -> Record | None:
        with self._connection() as connection:
            row = connection.execute(
                "SELECT * FROM invocations WHERE request_id = ? ORDER BY seq DESC LIMIT 1",
                (request_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per function, over the stored invocations: count, error rate, p50/p95 (ms)."""
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT function, outcome, duration_ms FROM invocations").fetchall()
        durations: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        for function, outcome, duration in rows:
            durations.setdefault(function, []).append(duration)
            errors[function] = errors.get(function, 0) + (outcome != "ok")
        figures = {}
        for function, values in durations.items():
            values.sort()
            figures[function] = {
                "invocations": len(values),
                "errors": errors[function],
                "error_rate": round(errors[function] / len(values), 4),
                "p50_ms": round(_percentile(values, 0.50), 3),
                "p95_ms": round(_percentile(values, 0.95), 3),
            }
        return figures


Row = tuple[Any, ...]  # a record's values in _COLUMNS order (Record.row(), record_row())


def write_batch(connection: sqlite3.Connection, records: Sequence[Record | Row],
                max_records: int | None) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.executemany(_INSERT, [record.row() if isinstance(record, Record)
                                         else record for record in records])
        if max_records is not None:
            # seq only grows (AUTOINCREMENT), so the newest N are those above MAX - N:
            # two index look-ups, where ORDER BY ... OFFSET N would step over N rows
            newest = connection.execute("SELECT MAX(seq) FROM invocations").fetchone()[0]
            connection.execute("DELETE FROM invocations WHERE seq <= ?",
                               (newest - max_records,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


# -- the background writer ------------------------------------------------------------


_STOP = object()


class HistoryWriter:
    """Records in, batched writes out, on one daemon thread; never blocks a caller."""

    def __init__(self, path: Path, max_records: int, queue_size: int = QUEUE_SIZE) -> None:
        self.path = path
        self.max_records = max_records
        self.dropped = 0  # records the disk could not keep up with (or could not take)
        self.written = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        # opened here, so a bad path is an error at startup, not a silent thread death
        self._connection = connect(path)
        self._thread = threading.Thread(target=self._loop, name="fnserve-history", daemon=True)
        self._closed = False
        self._thread.start()
        atexit.register(self.close)  # a worker's sys.exit: what is queued is written

    def submit(self, record: Record | Callable[[], Record | Row]) -> bool:
        """Queue a record, or a callable that makes one on the writer's thread (so the
        caller does not pay for redacting and cutting); False, and counted, when the
        writer is behind or closed."""
        if not self._closed:
            try:
                self._queue.put_nowait(record)
                return True
            except queue.Full:
                pass
        with self._lock:
            self.dropped += 1
        return False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        atexit.unregister(self.close)

    def _loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if not isinstance(item, threading.Event) and item is not _STOP:
                    time.sleep(LINGER)
                batch: list[Record | Callable[[], Record | Row]] = []
                events: list[threading.Event] = []
                stop = False
                while True:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, threading.Event):
                        events.append(item)
                    else:
                        batch.append(item)
                    if len(batch) >= BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._write(batch)
                for event in events:
                    event.set()
                if stop:
                    return
        finally:
            self._connection.close()

    def _write(self, batch: list[Record | Callable[[], Record | Row]]) -> None:
        records: list[Record | Row] = []
        for item in batch:
            try:
                records.append(item() if callable(item) else item)
            except Exception:  # one bad record must not cost the others
                log.exception("history: cannot make a record")
                with self._lock:
                    self.dropped += 1
        try:
            write_batch(self._connection, records, self.max_records)
            self.written += len(records)
        except sqlite3.Error as exc:  # a full disk, a file removed: drop, say so, go on
            with self._lock:
                self.dropped += len(records)
            log.warning("history: %d records dropped: %s", len(records), exc)
