"""Hardening of the request path (issue 8, defects 3, 4, 6, 8 and 10), on real servers.

- 3: a client that half-closes its connection (SHUT_WR) still gets its answer; one
  that really closes still kills its function;
- 4: a cancel that arrives after the function exited 0 does not discard its result;
- 6: the header that carried the server's --api-key never reaches a function;
- 8: a large upload is admitted (or refused 429) before its body is read;
- 10: the server's own exhaustion (EMFILE when spawning) is 503 unavailable, not the
  function's fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from fnserve import executor as executor_module
from fnserve.credentials import without_server_key
from fnserve.executor import Executor
from fnserve.registry import load_registry

from .helpers import (
    PYTHON,
    invocation,
    process_gone,
    read_pid,
    wait_until,
    write_function,
    write_toml,
)
from .live import LiveServer, invocation_records, running, the_worker

KEY = "server-key-123"


def _environ_echo(directory: Path) -> None:
    write_function(directory, "env.py", """
        import json, os
        print(json.dumps({"context": json.loads(os.environ["FN_CONTEXT"])["env"],
                          "environ": {k: v for k, v in os.environ.items()
                                      if k.startswith("HTTP_")}}))
    """)


# -- 6: the server's key stays the server's ------------------------------------------


@pytest.mark.parametrize("headers, expected", [
    ({"X-API-Key": KEY}, {}),
    ({"Authorization": f"Bearer {KEY}"}, {}),
    ({"Authorization": f"bearer {KEY}"}, {}),
    # the key authenticated; the function's own token goes through untouched
    ({"X-API-Key": KEY, "Authorization": "Bearer function-token"},
     {"HTTP_AUTHORIZATION": "Bearer function-token"}),
    ({"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "10.0.0.7"},
     {"HTTP_X_FORWARDED_FOR": "10.0.0.7"}),
], ids=["x-api-key", "bearer", "bearer-lowercase", "other-authorization", "other-headers"])
def test_the_header_that_carried_the_api_key_never_reaches_the_function(
        tmp_path: Path, headers: dict[str, str], expected: dict[str, str]) -> None:
    directory = tmp_path / "functions"
    _environ_echo(directory)
    with running(LiveServer(directory, "--api-key", KEY)) as server:
        response = server.post("/function/env", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"context": expected, "environ": expected}
        assert KEY not in response.text


def test_without_api_key_the_headers_are_forwarded_unchanged(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    _environ_echo(directory)
    with running(LiveServer(directory)) as server:
        response = server.post("/function/env", headers={
            "X-API-Key": KEY, "Authorization": f"Bearer {KEY}"})
        expected = {"HTTP_X_API_KEY": KEY, "HTTP_AUTHORIZATION": f"Bearer {KEY}"}
        assert response.json() == {"context": expected, "environ": expected}


def test_only_a_value_equal_to_the_key_is_stripped() -> None:
    forwarded = {"HTTP_X_API_KEY": "another-key", "HTTP_AUTHORIZATION": f"Basic {KEY}",
                 "HTTP_X_FORWARDED_FOR": "10.0.0.7"}
    assert without_server_key(forwarded, KEY) == forwarded
    assert without_server_key({"HTTP_X_API_KEY": KEY + "x"}, KEY) == {
        "HTTP_X_API_KEY": KEY + "x"}
    assert without_server_key({"HTTP_X_API_KEY": KEY}, KEY) == {}
    assert without_server_key({"HTTP_X_API_KEY": KEY}, "") == {"HTTP_X_API_KEY": KEY}


# -- 10: the server out of file descriptors ------------------------------------------


def _open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def _limit_leaving(open_fds: set[int], free: int) -> int:
    """The RLIMIT_NOFILE under which exactly `free` descriptor numbers are still free."""
    limit, available = 0, 0
    while available < free or limit in open_fds:
        if limit not in open_fds:
            available += 1
        limit += 1
    return limit


def _request(sock: socket.socket, path: str, body: bytes = b"{}",
             ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open connection; its status, headers and body."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return _response(sock)


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline().decode().strip()):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def _short_of_fds(server: LiveServer, warm_up: str, path: str
                  ) -> tuple[set[int], tuple[int, dict[str, str], bytes]]:
    """POST `path` on a kept-alive connection (warmed up with `warm_up`) while the worker
    may open only two more descriptors; the worker's fds before, and the answer."""
    worker = the_worker(server)
    soft, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _request(sock, warm_up)[0] == 200  # the connection accepted, warm
        before = _open_fds(worker.pid)
        worker.rlimit(psutil.RLIMIT_NOFILE, (_limit_leaving(before, 2), hard))
        try:
            return before, _request(sock, path)
        finally:
            worker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))


def test_spawn_failing_with_emfile_is_503_unavailable_not_the_functions_fault(
        tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "ok.py", 'print(\'{"fine": true}\')\n')
    with running(LiveServer(directory)) as server:
        worker = the_worker(server)
        # room for one pipe, not for the three a function's stdin/stdout/stderr take
        before, (status, headers, body) = _short_of_fds(server, "/function/ok", "/function/ok")
        assert status == 503, body
        assert headers["retry-after"] == "1"
        error = json.loads(body)
        assert error["code"] == "unavailable"
        assert "Too many open files" in error["error"]
        # nothing of the failed spawn is left open in the worker
        assert wait_until(lambda: _open_fds(worker.pid) <= before, 5), (
            _open_fds(worker.pid) - before)
        assert server.post("/function/ok").status_code == 200
        stats = server.stats()["functions"]["ok"]
        assert (stats["success_requests"], stats["failed_requests"]) == (2, 1)

    records = server.log_records()
    errors = [r for r in records if "out of resources" in r.get("message", "")]
    assert len(errors) == 1, records
    assert errors[0].get("levelname", errors[0].get("level")) == "ERROR", errors
    lines = [(r["status"], r["outcome"]) for r in invocation_records(records)]
    assert lines == [(200, "ok"), (503, "unavailable"), (200, "ok")]


@pytest.mark.parametrize("mode, when", [("fork", "start"), ("warm", "start"),
                                        ("fork", "invocation")])
def test_fork_and_warm_out_of_descriptors_is_503_unavailable(tmp_path: Path, mode: str,
                                                              when: str) -> None:
    # the same for a fork server or warm process that cannot be started, and for a
    # forked invocation whose channel and pipes cannot be made
    directory = tmp_path / "functions"
    write_function(directory, "ok.py", 'print(\'{"fine": true}\')\n')
    write_function(directory, "fast.py", "def handler(event, context):\n    return 'fast'\n")
    write_toml(directory, f'[functions.fast]\nmode = "{mode}"\n')
    with running(LiveServer(directory)) as server:
        worker = the_worker(server)
        # room for the socketpair, not for the pipes after it
        warm_up = "/function/fast" if when == "invocation" else "/function/ok"
        before, (status, headers, body) = _short_of_fds(server, warm_up, "/function/fast")
        assert (status, headers["retry-after"]) == (503, "1"), body
        error = json.loads(body)
        assert error["code"] == "unavailable" and "Too many open files" in error["error"]
        assert wait_until(lambda: _open_fds(worker.pid) <= before, 5), (
            _open_fds(worker.pid) - before)
        assert server.post("/function/fast").json() == "fast"
    lines = [(r["status"], r["outcome"]) for r in invocation_records(server.log_records())]
    assert lines[-2:] == [(503, "unavailable"), (200, "ok")]


# -- 4: a cancel after a clean exit ----------------------------------------------------


@pytest.mark.parametrize("code, outcome", [(0, "ok"), (3, "failed")])
def test_a_cancel_after_the_function_exited_keeps_its_result(
        fn_dir: Path, executor: Executor, monkeypatch: pytest.MonkeyPatch,
        code: int, outcome: str) -> None:
    # an escaped grandchild keeps stdout open, so the executor waits out EXIT_GRACE after
    # the exit; made long, so the cancel surely lands inside that window
    monkeypatch.setattr(executor_module, "EXIT_GRACE", 30.0)
    write_function(fn_dir, "leaves.py", f"""
        import os, subprocess, sys
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        print('{{"done": true}}', flush=True)
        with open(sys.argv[0] + ".pids", "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}\\n")
        sys.exit({code})
    """)
    spec = load_registry(fn_dir).get("leaves")
    run = executor.submit(invocation(spec, timeout=60))
    leader, grandchild = (int(p) for p in wait_until(
        lambda: (fn_dir / "leaves.py.pids").read_text().split()
        if (fn_dir / "leaves.py.pids").exists() else None, 10))
    try:
        # exited (a zombie until the executor reaps it): now the cancel comes
        assert wait_until(lambda: psutil.Process(leader).status() == psutil.STATUS_ZOMBIE
                          if psutil.pid_exists(leader) else True, 10)
        run.cancel()
        result = run.result(timeout=10)  # the cancel ends the wait for the grandchild
        assert (result.outcome, result.exit_code) == (outcome, code)
        assert result.stdout == b'{"done": true}\n'
    finally:
        os.kill(grandchild, signal.SIGKILL)


# -- 3: half-closed is not gone ----------------------------------------------------------


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


_SLOW = """
    import json, sys, time

    def handler(event, context):
        time.sleep(1.5)
        return event

    if __name__ == "__main__":
        event = json.load(sys.stdin)
        print(json.dumps(handler(event, None)))
"""


@pytest.mark.parametrize("mode", ["process", "fork", "warm"])
@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/1.0"])
def test_a_half_closed_client_gets_its_answer(tmp_path: Path, protocol: str,
                                              mode: str) -> None:
    directory = tmp_path / "functions"
    # runs across several of the server's looks at the connection (every 0.25 s)
    write_function(directory, "slow.py", _SLOW)
    write_toml(directory, f'[functions.slow]\nmode = "{mode}"\n')
    with running(LiveServer(directory)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(f"POST /function/slow {protocol}\r\nHost: x\r\nConnection: close\r\n"
                         "Content-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                         '{"a": true}'.encode())
            sock.shutdown(socket.SHUT_WR)  # the request is complete: nothing more to send
            answer = _read_all(sock)
        body = answer.rpartition(b"\r\n\r\n")[2]
        if protocol == "HTTP/1.1":  # the interim response that tells half-closed from closed
            assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), answer
        else:
            assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer
            assert b" 100 " not in answer
        assert json.loads(body) == {"a": True}
        assert server.stats()["functions"]["slow"]["success_requests"] == 1
    lines = [(r["status"], r["outcome"]) for r in invocation_records(server.log_records())]
    assert lines == [(200, "ok")]


@pytest.mark.parametrize("mode", ["process", "fork", "warm"])
def test_a_client_that_closes_still_cancels_its_run(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "hangs.py", f"""
        import json, os, sys, time

        def handler(event, context):
            with open({str(tmp_path / "hangs.pid")!r}, "w") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(60)
            return {{}}

        if __name__ == "__main__":
            print(json.dumps(handler(json.load(sys.stdin), None)))
    """)
    write_toml(directory, f'[functions.hangs]\nmode = "{mode}"\n')
    with running(LiveServer(directory)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /function/hangs HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\n\r\n{}")
            pid = read_pid(tmp_path / "hangs.pid", timeout=30)
        # closed (not half-closed): the interim 100 it is sent gets a reset back
        assert wait_until(lambda: process_gone(pid), 10), "the run outlived its client"
        assert wait_until(lambda: server.stats()["active_requests"] == 0, 10)
    lines = [(r["status"], r["outcome"]) for r in invocation_records(server.log_records())]
    assert lines == [(499, "cancelled")]


# -- 8: admission before a large upload is read ------------------------------------------


def _gated(directory: Path, gate: Path) -> None:
    write_function(directory, "echo.py", """
        import hashlib, sys
        data = sys.stdin.buffer.read()
        print(f'{{"size": {len(data)}, "sha": "{hashlib.sha256(data).hexdigest()}"}}')
    """)
    write_function(directory, "holds.py", f"""
        import os, time
        open({str(gate) + '.started'!r}, 'a').close()
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        print('{{}}')
    """)


class _Full:
    """A server with --concurrency 1 whose one slot is held until the context ends."""

    def __init__(self, server: LiveServer, gate: Path) -> None:
        self.server, self.gate = server, gate
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)

    def __enter__(self) -> _Full:
        self.sock.sendall(b"POST /function/holds HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\n\r\n")
        assert wait_until(lambda: self.server.stats()["active_requests"] == 1, 10)
        return self

    def __exit__(self, *_: object) -> None:
        self.gate.touch()
        assert b" 200 " in self.sock.recv(100)
        self.sock.close()


def _head_only(port: int, headers: str) -> tuple[int, dict[str, str], bytes]:
    """Send a request's head and none of its body; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /function/echo HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        return _response(sock)  # times out (fails) if the server waits for the body


@pytest.mark.parametrize("headers", [
    "Content-Length: 5000000\r\n",
    "Transfer-Encoding: chunked\r\n",
], ids=["content-length", "chunked"])
def test_a_large_upload_to_a_full_server_is_refused_before_its_body_is_read(
        tmp_path: Path, headers: str) -> None:
    directory = tmp_path / "functions"
    _gated(directory, tmp_path / "gate")
    with running(LiveServer(directory, "--concurrency", "1")) as server:
        with _Full(server, tmp_path / "gate"):
            status, response_headers, body = _head_only(server.port, headers)
            assert (status, json.loads(body)["code"]) == (429, "too_many_requests")
            assert response_headers["retry-after"] == "1"
            # a client that sends its whole body before reading still gets the 429
            response = server.post("/function/echo", data=b"x" * (2 * 1024 * 1024))
            assert response.status_code == 429
            assert server.stats()["functions"]["echo"]["rejected_requests"] == 2
        assert server.post("/function/echo", data=b"x" * 100_000).json()["size"] == 100_000
    lines = [(r["function"], r["status"]) for r in invocation_records(server.log_records())]
    assert lines == [("echo", 429), ("echo", 429), ("holds", 200), ("echo", 200)]


def test_a_small_body_keeps_the_specs_order_a_large_one_is_admitted_first(
        tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    _gated(directory, tmp_path / "gate")
    json_type = {"Content-Type": "application/json"}
    server = LiveServer(directory, "--concurrency", "1", "--max-body", "1MB")
    with running(server), _Full(server, tmp_path / "gate"):
        small = server.post("/function/echo", data=b"{", headers=json_type)
        assert (small.status_code, small.json()["code"]) == (400, "invalid_json")
        large = server.post("/function/echo", data=b"{" * 100_000, headers=json_type)
        assert (large.status_code, large.json()["code"]) == (429, "too_many_requests")
        # a Content-Length over --max-body is still a 413 first: it costs nothing
        huge = server.post("/function/echo", data=b"x" * (2 * 1024 * 1024))
        assert (huge.status_code, huge.json()["code"]) == (413, "payload_too_large")


def _endless_chunked(port: int) -> bytes:
    """A chunked upload sent until the server answers (it stops reading at --max-body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /function/echo HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        stop = threading.Event()

        def send() -> None:
            chunk = b"4000\r\n" + b"c" * 0x4000 + b"\r\n"
            try:
                while not stop.is_set():
                    sock.sendall(chunk)
            except OSError:
                pass  # the server closed on us: expected

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return sock.recv(65536)
        finally:
            stop.set()
            sender.join(10)


def test_a_slot_taken_for_an_upload_that_is_then_refused_is_given_back(
        tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    _gated(directory, tmp_path / "gate")
    with running(LiveServer(directory, "--concurrency", "1", "--max-body", "1MB")) as server:
        def chunks(size: int) -> Any:
            for _ in range(size // 65536):
                yield b"x" * 65536

        # chunked: admitted first, then found too large (413) or not JSON (400)
        assert _endless_chunked(server.port).startswith(b"HTTP/1.1 413 ")
        not_json = server.post("/function/echo", data=chunks(256 * 1024),
                               headers={"Content-Type": "application/json"})
        assert (not_json.status_code, not_json.json()["code"]) == (400, "invalid_json")
        # the one slot is free again, and the large body arrives whole
        body = os.urandom(900_000)
        echoed = server.post("/function/echo", data=body)
        assert echoed.status_code == 200, echoed.text
        assert echoed.json() == {"size": len(body), "sha": hashlib.sha256(body).hexdigest()}
        stats = server.stats()
        assert (stats["active_requests"], stats["total_requests"],
                stats["success_requests"]) == (0, 1, 1)


def test_fnserve_run_out_of_fds_is_one_line_and_exit_1(tmp_path: Path) -> None:
    write_function(tmp_path, "ok.py", 'print("{}")\n')
    # 8 descriptors: enough for the interpreter, not for the function's three pipes
    result = subprocess.run(
        ["prlimit", "--nofile=8:8", "--", PYTHON, "-m", "fnserve", "run",
         str(tmp_path / "ok.py")], capture_output=True, timeout=60, cwd=tmp_path,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert result.stderr.decode() == "fnserve: cannot start ok: Too many open files\n"
    assert result.stdout == b""


def test_an_async_job_does_not_get_the_server_key_either(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    _environ_echo(directory)
    with running(LiveServer(directory, "--api-key", KEY)) as server:
        headers = {"X-API-Key": KEY, "Authorization": "Bearer function-token"}
        response = server.post("/async-function/env", headers={**headers,
                                                                "X-Request-Id": "job-key"})
        assert response.status_code == 202, response.text

        def finished() -> dict[str, Any] | None:
            job: dict[str, Any] = server.get("/jobs/job-key", headers=headers).json()
            return job if job["status"] in ("finished", "failed") else None

        job = wait_until(finished, 30, interval=0.05)
        assert job and job["status"] == "finished", job
        expected = {"HTTP_AUTHORIZATION": "Bearer function-token"}
        assert json.loads(job["result"]) == {"context": expected, "environ": expected}
