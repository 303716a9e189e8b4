"""The one hook (recording.py on Service.listeners): every source reaches the history,
not only the /function route; refusals and unusable files behave."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnserve.config import load_config
from fnserve.context import tracing_from
from fnserve.history import HistoryStore, HistoryWriter
from fnserve.recording import attach_history
from fnserve.service import InvocationRequest, Service

from .helpers import wait_until, write_function


@pytest.fixture
def service(fn_dir: Path, tmp_path: Path) -> Iterator[Service]:
    write_function(fn_dir, "echo.py", "import sys\nprint(sys.stdin.read())\n")
    # holds its slot until the test creates the gate file: a handshake, not a sleep
    gate = tmp_path / "gate"
    write_function(fn_dir, "holds.py", f"""
        import os, time
        with open({str(gate) + '.started'!r}, "a") as started:
            started.write("x\\n")
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
    """)
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    config = load_config(fn_dir, {"history": str(tmp_path / "h.sqlite3"),
                                  "concurrency": "2"}, environ)
    service = Service(config)
    yield service
    service.executor.shutdown()


def request(service: Service, source: str, **extra: object) -> InvocationRequest:
    return InvocationRequest(service.registry.get("echo"), b'{"from": "%s"}' % source.encode(),
                             f"id-{source}", tracing_from(lambda _name: None), source=source,
                             **extra)  # type: ignore[arg-type]


def test_every_source_is_recorded_through_the_listener(service: Service,
                                                       tmp_path: Path) -> None:
    history = attach_history(service)
    assert history.writer is not None
    service.invoke(request(service, "http"))
    service.invoke(request(service, "lambda"))
    service.invoke(request(service, "replay", replay_of="id-http"))
    service.enqueue(request(service, "async"))  # runs in the background
    store = HistoryStore(tmp_path / "h.sqlite3")

    def all_four() -> list[object]:
        history.writer.flush()  # type: ignore[union-attr]
        found, _ = store.list()
        return found if len(found) == 4 else []

    found = wait_until(all_four, timeout=15)
    assert found, store.list()
    by_source = {r.source: r for r in found}  # type: ignore[attr-defined]
    assert set(by_source) == {"http", "lambda", "replay", "async"}
    assert by_source["async"].response.strip() == b'{"from": "async"}'
    assert by_source["replay"].replay_of == "id-http"
    assert all(r.outcome == "ok" and r.status == 200 for r in by_source.values())
    history.writer.close()


def test_a_refusal_for_load_is_not_recorded(service: Service, tmp_path: Path) -> None:
    history = attach_history(service)
    holders = [threading.Thread(target=service.invoke, args=(InvocationRequest(
        service.registry.get("holds"), b"{}", held, tracing_from(lambda _name: None)),))
        for held in ("held-1", "held-2")]
    for holder in holders:
        holder.start()
    started = tmp_path / "gate.started"
    # --concurrency 2: both slots are taken once both functions run
    assert wait_until(lambda: started.exists() and started.read_text().count("x") == 2,
                      timeout=15)
    refused = service.invoke(request(service, "http"))
    assert refused.status == 429 and refused.outcome == "rejected"
    (tmp_path / "gate").touch()
    for holder in holders:
        holder.join(30)
    store = HistoryStore(tmp_path / "h.sqlite3")

    def both_held() -> list[object]:
        history.writer.flush()  # type: ignore[union-attr]
        found, _ = store.list()
        return found if len(found) == 2 else []

    # the 429 was reported before the held runs ended: had it been recorded, it would be here
    found = wait_until(both_held, timeout=15)
    assert {r.request_id for r in found} == {"held-1", "held-2"}  # type: ignore[attr-defined]
    history.writer.close()  # type: ignore[union-attr]


def test_an_unusable_file_serves_without_history(service: Service, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "h.sqlite3").write_bytes(b"this is not a database" * 200)
    history = attach_history(service)
    assert not history.enabled and service.listeners == []
    assert "serving without a history" in caplog.text
    assert service.invoke(request(service, "http")).status == 200


def test_presigned_query_credentials_are_redacted(service: Service, tmp_path: Path) -> None:
    history = attach_history(service)
    signature = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    service.invoke(InvocationRequest(
        service.registry.get("echo"), b'{"sig": "%s"}' % signature.encode(), "signed",
        tracing_from(lambda _name: None),
        parameters={"X-Amz-Signature": signature, "name": "Ada"}))
    history.writer.close()  # type: ignore[union-attr]
    record = HistoryStore(tmp_path / "h.sqlite3").get("signed")
    assert record is not None
    assert record.parameters == {"X-Amz-Signature": "[redacted]", "name": "Ada"}
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.sqlite3*"))
    assert signature.encode() not in raw and b"Ada" in raw


def test_writer_close_is_idempotent(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path / "h.sqlite3", 10)
    writer.close()
    writer.close()
    assert not writer.submit(lambda: ())  # closed: counted as dropped
    assert writer.dropped == 1
