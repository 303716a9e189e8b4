"""The drain a load balancer can see (SPEC §4, issue 8 defect 5), on real servers.

After SIGTERM (or SIGINT) the worker keeps accepting: a NEW connection gets /healthz
503 and a new invocation 503 `unavailable` with Retry-After, while the run in flight
finishes; then the server exits 0 with nothing left running. The same under a stock
gunicorn with conf/gunicorn.conf.py. A reload (SIGHUP) is not a drain: the old worker
stops accepting at once, so no new connection meets a 503.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import in_background, process_gone, read_pid, wait_until, write_function, write_held
from .live import LiveServer

CLOSE = {"Connection": "close"}  # every request on a new connection
GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "conf/gunicorn.conf.py",
            "fnserve.wsgi:app"]


def _functions(directory: Path, state: Path) -> None:
    write_function(directory, "ok.py", 'print(\'{"fine": true}\')\n')
    write_held(directory, state)


def _in_background(server: LiveServer) -> tuple[threading.Thread, list[Any]]:
    return in_background(lambda: requests.post(server.url("/function/held"), timeout=60,
                                               headers=CLOSE))


def _fresh_get(server: LiveServer, path: str) -> requests.Response:
    return requests.get(server.url(path), timeout=10, headers=CLOSE)


@pytest.mark.parametrize("entry", ["fnserve-serve", "gunicorn-conf"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_new_connections_see_the_drain(tmp_path: Path, entry: str, signum: int) -> None:
    directory, state = tmp_path / "functions", tmp_path
    _functions(directory, state)
    command = GUNICORN if entry == "gunicorn-conf" else None
    server = LiveServer(directory, command=command).start()
    try:
        assert server.proc is not None
        thread, answer = _in_background(server)
        pid = read_pid(state / "held.pid")

        server.proc.send_signal(signum)
        health = wait_until(lambda: (r := _fresh_get(server, "/healthz")).status_code == 503
                            and [r], timeout=10)  # a list: a 503 Response is falsy
        assert health, "/healthz never said draining on a new connection"
        assert health[0].json() == {"status": "draining"}
        # still accepting: a new invocation is refused, not dropped or reset
        for _ in range(3):
            refused = requests.post(server.url("/function/ok"), timeout=10, headers=CLOSE)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["code"] == "unavailable"
        assert _fresh_get(server, "/healthz").status_code == 503
        assert not process_gone(pid)
        assert server.proc.poll() is None

        (state / "release").touch()
        thread.join(30)
        assert len(answer) == 1 and isinstance(answer[0], requests.Response), answer
        assert (answer[0].status_code, answer[0].json()) == (200, {"finished": True})
        assert server.proc.wait(timeout=30) == 0
        assert server.stop() == 0  # and nothing it started is left
    finally:
        server.kill()


def test_the_drain_ends_at_once_when_nothing_runs(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    _functions(directory, tmp_path)
    server = LiveServer(directory, "--graceful-timeout", "60s").start()
    try:
        assert server.post("/function/ok", headers=CLOSE).status_code == 200
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        # far less than the 60 s graceful timeout: nothing to wait for
        assert server.proc.wait(timeout=20) == 0
        assert server.stop() == 0
    finally:
        server.kill()


def test_a_reload_is_not_a_drain(tmp_path: Path) -> None:
    directory, state = tmp_path / "functions", tmp_path
    _functions(directory, state)
    server = LiveServer(directory).start()
    try:
        assert server.proc is not None
        old = {p.pid for p in server.workers()}
        thread, answer = _in_background(server)  # keeps the old worker alive
        read_pid(state / "held.pid")
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: {p.pid for p in server.workers()} - old, timeout=20)
        # the new worker serves; the old one, draining its run, accepts nothing new
        statuses = [requests.post(server.url("/function/ok"), timeout=10,
                                  headers=CLOSE).status_code for _ in range(20)]
        assert statuses == [200] * 20
        assert _fresh_get(server, "/healthz").status_code == 200
        (state / "release").touch()
        thread.join(30)
        assert len(answer) == 1 and isinstance(answer[0], requests.Response), answer
        assert answer[0].status_code == 200
        assert server.stop() == 0
    finally:
        server.kill()
