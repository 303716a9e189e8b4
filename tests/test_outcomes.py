"""One invocation, one outcome: status, /stats, /metrics and the log line always agree.

outcome.py is the one place that maps a run to (status, outcome, body); these tests
drive a real server through every outcome and check the three views of each
invocation against each other (issue 8, defect 2), and that input or output nested
too deeply for Python's JSON parser is bad input or text, never a 500 (defects 1, 2).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import fnserve_cli, wait_until, write_function, write_toml
from .live import LiveServer, invocation_records, running

DEEP = 100_000  # far past Python's recursion limit


def _functions(directory: Path, gate: Path) -> None:
    write_function(directory, "ok.py", 'print(\'{"fine": true}\')\n')
    write_function(directory, "fails.py", "import sys\nsys.exit(3)\n")
    write_function(directory, "sleeps.py", "import time\ntime.sleep(30)\n")
    write_function(directory, "floods.py", "import sys\nsys.stdout.write('x' * 4096)\n")
    write_function(directory, "deep.py",
                   f"import sys\nsys.stdout.write('[' * {DEEP} + ']' * {DEEP})\n")
    # holds its slot until the test creates the gate file: a handshake, not a sleep
    write_function(directory, "holds.py", f"""
        import os, time
        open({str(gate) + '.started'!r}, 'a').close()
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        print('{{}}')
    """)
    write_toml(directory, '[functions.sleeps]\ntimeout = "300ms"\n')


def _metric(text: str, function: str, outcome: str) -> float:
    prefix = f'fnserve_requests_total{{function="{function}",outcome="{outcome}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def _log_line(server: LiveServer, request_id: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [r for r in invocation_records(server.log_records())
                if r.get("request_id") == request_id]

    lines = wait_until(found, timeout=10)
    assert len(lines) == 1, lines
    line: dict[str, Any] = lines[0]
    return line


def _agree(server: LiveServer, response: requests.Response, function: str, outcome: str,
           counter: str) -> None:
    """Status, the log line, /stats and /metrics tell the same story of one invocation."""
    line = _log_line(server, response.headers["X-Request-Id"])
    assert (line["status"], line["outcome"], line["function"]) == \
        (response.status_code, outcome, function)
    stats = server.stats()["functions"][function]
    expected = {"success_requests": 0, "failed_requests": 0, "rejected_requests": 0}
    expected[counter] = 1
    assert {key: stats[key] for key in expected} == expected, stats
    assert stats["total_requests"] == 1
    assert _metric(server.get("/metrics").text, function, outcome) == 1.0


def test_every_outcome_agrees_across_status_stats_metrics_and_log(fn_dir: Path,
                                                                  tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    _functions(fn_dir, gate)
    with running(LiveServer(fn_dir, "--concurrency", "1", "--max-output", "1KB")) as server:
        cases = [("ok", 200, "ok", "success_requests"),
                 ("fails", 502, "failed", "failed_requests"),
                 ("sleeps", 504, "timeout", "failed_requests"),
                 ("floods", 502, "output_too_large", "failed_requests")]
        for function, status, outcome, counter in cases:
            response = server.post(f"/function/{function}")
            assert response.status_code == status, response.text
            if status != 200:
                assert response.json()["code"] == {"failed": "function_failed"}.get(
                    outcome, outcome)
            _agree(server, response, function, outcome, counter)

        # rejected: the one slot is held by another function
        holder = _background_post(server, "/function/holds")
        assert wait_until(lambda: Path(str(gate) + ".started").exists(), timeout=10)
        refused = server.post("/function/fails")
        assert refused.status_code == 429
        line = _log_line(server, refused.headers["X-Request-Id"])
        assert (line["status"], line["outcome"]) == (429, "rejected")
        assert server.stats()["functions"]["fails"]["rejected_requests"] == 1
        assert _metric(server.get("/metrics").text, "fails", "rejected") == 1.0
        gate.touch()
        assert holder.result().status_code == 200


def _background_post(server: LiveServer, path: str) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(requests.post, server.url(path), timeout=60)
    pool.shutdown(wait=False)
    return future


def test_output_too_deep_for_the_json_parser_is_text_counted_once(fn_dir: Path,
                                                                    tmp_path: Path) -> None:
    _functions(fn_dir, tmp_path / "gate")
    with running(LiveServer(fn_dir)) as server:
        response = server.post("/function/deep")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert len(response.content) == 2 * DEEP
        _agree(server, response, "deep", "ok", "success_requests")
        assert "Traceback" not in server.stderr()


def test_body_too_deep_for_the_json_parser_is_invalid_json(fn_dir: Path,
                                                           tmp_path: Path) -> None:
    _functions(fn_dir, tmp_path / "gate")
    body = b"[" * DEEP + b"]" * DEEP
    with running(LiveServer(fn_dir)) as server:
        response = server.post("/function/ok", data=body,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["code"] == "invalid_json"
        line = _log_line(server, response.headers["X-Request-Id"])
        assert (line["status"], line["outcome"]) == (400, "invalid_json")
        assert "ok" not in server.stats()["functions"]  # refused before admission
        assert "Traceback" not in server.stderr()


def test_run_data_too_deep_is_a_one_line_usage_error(fn_dir: Path, tmp_path: Path,
                                                     environ: dict[str, str]) -> None:
    _functions(fn_dir, tmp_path / "gate")
    data = tmp_path / "deep.json"  # @FILE: one argument may not exceed 128 KiB
    data.write_text("[" * DEEP + "]" * DEEP)
    done = fnserve_cli("run", "ok", "--dir", str(fn_dir), "--data", f"@{data}", env=environ)
    assert done.returncode == 2
    message = done.stderr.decode().strip()
    assert len(message.splitlines()) == 1 and "not valid JSON" in message
    assert b"Traceback" not in done.stderr


def test_a_client_that_disconnects_is_logged_499_cancelled_and_counted_failed(
        fn_dir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    _functions(fn_dir, gate)
    with running(LiveServer(fn_dir)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /function/holds HTTP/1.1\r\nHost: x\r\n"
                         b"X-Request-Id: gone-1\r\nContent-Length: 0\r\n\r\n")
            assert wait_until(lambda: Path(str(gate) + ".started").exists(), timeout=10)
            # linger 0: close() resets the connection, the client is really gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        line = _log_line(server, "gone-1")
        assert (line["status"], line["outcome"]) == (499, "cancelled")
        assert wait_until(
            lambda: server.stats()["functions"]["holds"]["failed_requests"] == 1, timeout=10)
        assert _metric(server.get("/metrics").text, "holds", "cancelled") == 1.0


@pytest.mark.go
def test_build_failed_agrees(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "broken.go", "package main\nfunc main() { nope }\n")
    with running(LiveServer(fn_dir)) as server:
        response = server.post("/function/broken")
        assert response.status_code == 502
        assert response.json()["code"] == "build_failed"
        _agree(server, response, "broken", "build_failed", "failed_requests")
