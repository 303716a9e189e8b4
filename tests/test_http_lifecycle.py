"""Shutdown (SPEC §4) and the public-bind warning (SPEC §6) on real servers.

Each test owns its server: stopping it is what is tested.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import in_background, process_gone, read_pid, wait_until, write_function, write_held
from .live import LiveServer, non_loopback_ipv4, running

CLOSE = {"Connection": "close"}


def _healthz(connection: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    return response.status, json.loads(response.read())


GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "conf/gunicorn.conf.py",
            "fnserve.wsgi:app"]


@pytest.mark.parametrize("entry", ["fnserve-serve", "gunicorn-conf"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests(tmp_path: Path, signum: int, entry: str) -> None:
    directory, state = tmp_path / "functions", tmp_path
    write_held(directory, state, limit=30)
    command = GUNICORN if entry == "gunicorn-conf" else None
    server = LiveServer(directory, command=command).start()
    try:
        assert server.proc is not None
        # a kept-alive connection, open before the signal
        kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert _healthz(kept) == (200, {"status": "ok"})
        thread, answer = in_background(lambda: requests.post(
            server.url("/function/held"), timeout=30, headers=CLOSE))
        pid = read_pid(state / "held.pid")

        server.proc.send_signal(signum)
        # the kept-alive connection is still answered while the worker drains
        deadline = time.monotonic() + 5
        while True:
            status, body = _healthz(kept)
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert (status, body) == (503, {"status": "draining"})
        kept.close()
        # a new connection is no longer served (one racing the stop may still see a 503)
        try:
            late = requests.get(server.url("/healthz"), timeout=0.5, headers=CLOSE)
        except requests.RequestException:
            pass
        else:
            assert late.status_code == 503

        assert not process_gone(pid)
        (state / "release").touch()
        thread.join(30)
        assert len(answer) == 1 and isinstance(answer[0], requests.Response), answer
        assert answer[0].status_code == 200
        assert answer[0].json() == {"finished": True}
        assert server.stop(timeout=30) == 0  # also checks that no process is left
    finally:
        server.kill()


def test_run_longer_than_graceful_timeout_is_killed_at_shutdown(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "forever.py", f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        with open({str(tmp_path / "forever.pid")!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}\\n")
        time.sleep(60)
    """)
    server = LiveServer(directory, "--graceful-timeout", "2s").start()
    try:
        assert server.proc is not None
        thread, answer = in_background(lambda: requests.post(
            server.url("/function/forever"), timeout=30, headers=CLOSE))
        pids = [int(p) for p in wait_until(
            lambda: (tmp_path / "forever.pid").read_text().split()
            if (tmp_path / "forever.pid").exists() else None, 10)]
        assert len(pids) == 2
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # killed at the graceful timeout (2 s of slack for a busy machine)
        assert wait_until(lambda: all(process_gone(pid) for pid in pids), 15)
        assert time.monotonic() - signalled < 2 + 2
        assert server.proc.wait(timeout=15) == 0
        # the exit: the worker stops accepting only after the kill, then keeps its idle
        # kept-alive connections up to 2 s (drain.py)
        assert time.monotonic() - signalled < 2 + 2 + 2
        thread.join(10)
        # the client still got an answer: the server killed it, not the function's fault
        assert len(answer) == 1 and isinstance(answer[0], requests.Response), answer
        assert answer[0].status_code == 503
        assert answer[0].headers["Content-Type"] == "application/json"
        assert server.stop() == 0
    finally:
        server.kill()


def test_public_bind_without_api_key_warns_loudly(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "hello.py", 'print(\'{"hello": 1}\')\n')
    with running(LiveServer(directory, "--host", "0.0.0.0")) as server:
        warnings = [r for r in server.log_records()
                    if r["level"] == "WARNING" and "0.0.0.0" in r["message"]]
        assert len(warnings) == 1, server.stderr()
        assert "--api-key" in warnings[0]["message"]
        assert warnings[0]["logger"].startswith("fnserve")
        assert any(r["message"].startswith(f"Listening at: http://0.0.0.0:{server.port}")
                   for r in server.log_records())
        assert server.post("/function/hello").json() == {"hello": 1}


def test_public_bind_is_reachable_on_another_interface(tmp_path: Path) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    directory = tmp_path / "functions"
    write_function(directory, "hello.py", 'print(\'{"hello": 1}\')\n')
    with running(LiveServer(directory, "--host", "0.0.0.0")) as server:
        response = requests.post(f"http://{address}:{server.port}/function/hello",
                                 timeout=10, headers=CLOSE)
        assert response.json() == {"hello": 1}


def test_public_bind_with_api_key_does_not_warn(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "hello.py", 'print("{}")\n')
    with running(LiveServer(directory, "--host", "0.0.0.0", "--api-key", "k")) as server:
        assert not [r for r in server.log_records() if r["level"] == "WARNING"]
        refused = requests.post(server.url("/function/hello"), timeout=10, headers=CLOSE)
        assert refused.status_code == 401

