"""fnserve/history.py on real SQLite files: writer, pruning, migration, several writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from fnserve.config import history_path, load_config
from fnserve.history import (
    BODY_LIMIT,
    SCHEMA_VERSION,
    STDERR_LIMIT,
    HistoryError,
    HistoryStore,
    HistoryWriter,
    Record,
    connect,
    make_record,
    secrets_of,
)


def record(n: int, function: str = "hello", outcome: str = "ok", **extra: object) -> Record:
    fields: dict[str, object] = dict(
        request_id=f"req-{n}", function=function, source="http",
        started_at="2026-12-01T00:00:00.000000Z", duration_ms=float(n), status=200,
        outcome=outcome, request=b'{"n": %d}' % n, response=b"ok", stderr=b"")
    fields.update(extra)
    return make_record(**fields)  # type: ignore[arg-type]


def test_forty_records_from_eight_threads(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    writer = HistoryWriter(path, max_records=1000)
    barrier = threading.Barrier(8)

    def submit(thread: int) -> None:
        barrier.wait()
        for i in range(5):
            assert writer.submit(record(thread * 5 + i))

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    records, following = HistoryStore(path).list(limit=100)
    assert following is None
    assert sorted(r.request_id for r in records) == sorted(f"req-{n}" for n in range(40))
    assert writer.dropped == 0


def test_newest_first_filters_and_pages(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    store.insert([record(n, function="a" if n % 2 else "b",
                         outcome="failed" if n % 3 == 0 else "ok") for n in range(10)])
    page, following = store.list(limit=4)
    assert [r.request_id for r in page] == ["req-9", "req-8", "req-7", "req-6"]
    assert following == "req-6"
    page, following = store.list(limit=4, before=following)
    assert [r.request_id for r in page] == ["req-5", "req-4", "req-3", "req-2"]
    page, following = store.list(limit=4, before=following)
    assert [r.request_id for r in page] == ["req-1", "req-0"]
    assert following is None
    page, _ = store.list(function="a", outcome="failed")
    assert [r.request_id for r in page] == ["req-9", "req-3"]
    assert store.list(before="no-such-id") == ([], None)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    writer = HistoryWriter(path, max_records=5)
    for n in range(12):
        writer.submit(record(n))
        if n % 4 == 3:
            assert writer.flush()
    writer.close()
    records, _ = HistoryStore(path).list()
    assert [r.request_id for r in records] == [f"req-{n}" for n in range(11, 6, -1)]


def test_persists_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = HistoryWriter(path, max_records=100)
    first.submit(record(1, parameters={"name": "Ada"}, trace_id="t" * 32, replay_of="x"))
    first.close()
    second = HistoryWriter(path, max_records=100)
    second.submit(record(2))
    second.close()
    store = HistoryStore(path)
    old = store.get("req-1")
    assert old is not None
    assert old.parameters == {"name": "Ada"}
    assert old.trace_id == "t" * 32 and old.replay_of == "x"
    assert store.get("req-2") is not None
    assert store.get("req-3") is None


def test_bodies_are_cut_and_flagged(tmp_path: Path) -> None:
    big = b"x" * (BODY_LIMIT + 10)
    cut = record(1, request=big, response=big, stderr=b"a" * 100 + b"b" * STDERR_LIMIT)
    assert len(cut.request) == BODY_LIMIT and cut.request_truncated
    assert len(cut.response) == BODY_LIMIT and cut.response_truncated
    assert cut.stderr == b"b" * STDERR_LIMIT  # the last 4 KiB
    small = record(2)
    assert not small.request_truncated and not small.response_truncated


def test_secrets_are_replaced_everywhere(tmp_path: Path) -> None:
    secrets = secrets_of(["k-secret-123", "Bearer tok-456789",
                          "AWS4-HMAC-SHA256 Credential=AKID/x, SignedHeaders=host, "
                          "Signature=abcdef0123456789"])
    kept = record(1, request=b'{"echo": "k-secret-123"}',
                  response=b"tok-456789 and abcdef0123456789", stderr=b"k-secret-123\n",
                  secrets=secrets)
    blob = kept.request + kept.response + kept.stderr
    for secret in (b"k-secret-123", b"tok-456789", b"abcdef0123456789"):
        assert secret not in blob
    assert b"[redacted]" in kept.response


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    # hold the write lock from another connection: the writer waits, the queue fills
    blocker = connect(path)
    blocker.execute("BEGIN IMMEDIATE")
    writer = HistoryWriter(path, max_records=100, queue_size=3)
    try:
        accepted = [writer.submit(record(n)) for n in range(20)]
        assert accepted.count(False) >= 16  # one batch taken by the thread, three queued
        assert writer.dropped == accepted.count(False)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    writer.close()
    records, _ = HistoryStore(path).list(limit=100)
    assert len(records) == 20 - writer.dropped


def test_migration_from_an_empty_file_and_newer_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    sqlite3.connect(path).close()  # version 0: an empty database
    connect(path).close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(HistoryError, match="newer FnServe"):
        connect(path)
    (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
    with pytest.raises(HistoryError, match="not a usable history file"):
        connect(tmp_path / "junk")


def _write_many(path: str, prefix: str, count: int) -> None:
    writer = HistoryWriter(Path(path), max_records=100_000)
    for n in range(count):
        writer.submit(record(n, request_id=f"{prefix}-{n}"))
    writer.close()
    assert writer.dropped == 0, writer.dropped


def test_several_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_write_many, args=(str(path), f"p{i}", 400))
                 for i in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    records, _ = HistoryStore(path).list(limit=1000)
    assert len(records) == 1000
    assert HistoryStore(path).figures()["hello"]["invocations"] == 1600


def test_figures(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite3")
    store.insert([record(n, duration_ms=float(n), outcome="failed" if n <= 10 else "ok",
                         function="f") for n in range(1, 101)])
    figures = store.figures()["f"]
    assert figures == {"invocations": 100, "errors": 10, "error_rate": 0.1,
                       "p50_ms": 50.0, "p95_ms": 95.0}


def test_default_path_and_off(tmp_path: Path) -> None:
    assert history_path({"HOME": "/home/ada"}) == \
        Path("/home/ada/.local/share/fnserve/history.sqlite3")
    assert history_path({"XDG_DATA_HOME": "/x"}) == Path("/x/fnserve/history.sqlite3")
    assert history_path({}, "off") is None
    assert history_path({}, str(tmp_path / "h.db")) == tmp_path / "h.db"
    fn_dir = tmp_path / "fns"
    fn_dir.mkdir()
    config = load_config(fn_dir, {"history": "off"}, {"HOME": str(tmp_path)})
    assert config.history is None
    config = load_config(fn_dir, {}, {"HOME": str(tmp_path), "FNSERVE_HISTORY_MAX": "7"})
    assert config.history == tmp_path / ".local/share/fnserve/history.sqlite3"
    assert config.history_max == 7
