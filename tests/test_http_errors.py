"""Every row of the SPEC §3 error table, and the order of the checks, on a real server.

One server (module scope) with an API key and small limits serves all of it; each
error asserts status, JSON content type, `code`, the sentence, `request_id` and the
headers every invocation response carries. Tests here restore what they take (slots,
marker files), so they do not depend on their order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import process_gone, read_pid, wait_until, write_function, write_toml
from .live import LiveServer, invocation_records, raw_request, running

KEY = "s3cret-key"
AUTH = {"X-API-Key": KEY}
MAX_BODY = 1024
MAX_OUTPUT = 1024
CONCURRENCY = 2
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")


@dataclass
class Errors:
    server: LiveServer
    state: Path  # where functions leave marker and pid files

    def path(self, name: str) -> Path:
        return self.state / name

    def post(self, name: str, **kwargs: Any) -> requests.Response:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        return requests.post(self.server.url(f"/function/{name}"), headers=headers, **kwargs)

    def stats(self) -> dict[str, Any]:
        return self.server.stats(headers=AUTH)


def _functions(directory: Path, state: Path) -> None:
    write_function(directory, "echo.py", """
        import hashlib, json, sys
        data = sys.stdin.buffer.read()
        print(json.dumps({"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    """)
    write_function(directory, "marker.py", f"""
        open({str(state / "marker")!r}, "a").close()
        print("{{}}")
    """)
    write_function(directory, "crash.py", """
        import sys
        print("secret detail of the crash", file=sys.stderr)
        sys.exit(3)
    """)
    write_function(directory, "killed.py", """
        import os, signal
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    write_function(directory, "bigout.py", f"""
        import sys
        sys.stdout.write("x" * {4 * MAX_OUTPUT})
    """)
    write_function(directory, "slow.py", "import time; time.sleep(30)\n")
    write_function(directory, "grandchild.py", f"""
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "60"], stdout=sys.stdout)  # holds our stdout
        with open({str(state / "grandchild.pid")!r}, "w") as f:
            f.write(f"{{child.pid}}\\n")
        time.sleep(60)
    """)
    write_function(directory, "hang.py", f"""
        import os, time
        with open({str(state / "hang.pid")!r}, "w") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(30)
    """)
    # holds its slot until the test creates the release file
    write_function(directory, "block.py", f"""
        import os, time
        release = {str(state / "release")!r}
        deadline = time.monotonic() + 20
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        print('{{"released": true}}')
    """)
    write_function(directory, "broken.go", """
        package main

        func main() {
            undefinedThing()
        }
    """)
    write_toml(directory, """
        [functions.slow]
        timeout = "1s"

        [functions.grandchild]
        timeout = "1s"
    """)


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Errors]:
    directory = tmp_path_factory.mktemp("errors-functions")
    state = tmp_path_factory.mktemp("errors-state")
    _functions(directory, state)
    with running(LiveServer(directory, "--api-key", KEY, "--max-body", str(MAX_BODY),
                            "--max-output", str(MAX_OUTPUT), "--concurrency", str(CONCURRENCY),
                            "--timeout", "10s")) as server:
        yield Errors(server, state)


def check_error(status: int, headers: Mapping[str, str], content: bytes, expected: int,
                code: str) -> dict[str, Any]:
    """The SPEC's error shape on an invocation response; header names lower-case."""
    assert status == expected, content
    assert headers["content-type"] == "application/json"
    body: dict[str, Any] = json.loads(content)
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    assert body["request_id"] == headers["x-request-id"]
    assert TRACEPARENT.fullmatch(headers["traceparent"])
    assert float(headers["x-duration-seconds"]) >= 0
    return body


def check(response: requests.Response, expected: int, code: str) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in response.headers.items()}
    return check_error(response.status_code, headers, response.content, expected, code)


# -- 400 ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/vnd.x+json",
                                          "application/json; charset=utf-8"])
def test_invalid_json_is_refused_before_any_process(errors: Errors, content_type: str) -> None:
    marker = errors.path("marker")
    marker.unlink(missing_ok=True)
    response = errors.post("marker", data=b'{"not": json', headers={"Content-Type": content_type})
    body = check(response, 400, "invalid_json")
    assert "JSON" in body["error"]
    assert not marker.exists(), "the function ran for a body that was refused"
    # the same bytes under a non-JSON type are not checked: the function runs
    response = errors.post("marker", data=b'{"not": json', headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    assert marker.exists()


@pytest.mark.parametrize("body", [b'{"a": NaN}', b"[Infinity]", b"-Infinity"])
def test_json_with_nan_or_infinity_is_invalid_json(errors: Errors, body: bytes) -> None:
    # Python's json.loads takes these; JSON (RFC 8259) and the function's parser may not
    response = errors.post("echo", data=body, headers={"Content-Type": "application/json"})
    check(response, 400, "invalid_json")


# -- 401 ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}, {"X-API-Key": ""},
    {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
], ids=["none", "wrong", "longer", "empty", "bearer-wrong", "basic", "no-scheme"])
def test_wrong_or_missing_key_is_401(errors: Errors, headers: dict[str, str]) -> None:
    response = requests.post(errors.server.url("/function/echo"), headers=headers, timeout=30)
    body = check(response, 401, "unauthorized")
    assert "key" in body["error"].lower()


@pytest.mark.parametrize("headers", [
    {"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
], ids=["x-api-key", "bearer", "bearer-lower"])
def test_right_key_is_accepted(errors: Errors, headers: dict[str, str]) -> None:
    response = requests.post(errors.server.url("/function/echo"), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["len"] == 2  # the empty body went in as {}


def test_an_empty_x_api_key_does_not_hide_a_good_bearer_token(errors: Errors) -> None:
    headers = {"X-API-Key": "", "Authorization": f"Bearer {KEY}"}
    response = requests.post(errors.server.url("/function/echo"), headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_admin_routes_need_the_key_healthz_does_not(errors: Errors) -> None:
    assert requests.get(errors.server.url("/healthz"), timeout=10).json() == {"status": "ok"}
    for path in ("/functions", "/stats", "/metrics"):
        refused = requests.get(errors.server.url(path), timeout=10)
        assert refused.status_code == 401, path
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.json()["code"] == "unauthorized"
        allowed = requests.get(errors.server.url(path), headers=AUTH, timeout=10)
        assert allowed.status_code == 200, path
        allowed = requests.get(errors.server.url(path), timeout=10,
                               headers={"Authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200, path


# -- 404 ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/function/nope", "/function/..", "/function/%2e%2e", "/function/%2E%2E",
    "/function/%2e%2e%2fecho", "/function/../echo", "/function/a/b", "/function/echo/x",
    "/function/a%00b", "/function/echo%00", "/function/" + "a" * 65, "/function/.echo",
    "/function/_echo", "/function/fnserve.toml", "/function/",
], ids=lambda p: p.removeprefix("/function/")[:20])
def test_unknown_or_invalid_name_is_404(errors: Errors, path: str) -> None:
    # http.client sends the path as is: requests would resolve `..` before sending
    status, headers, content = raw_request(errors.server, "POST", path, body=b"{}", headers=AUTH)
    body = check_error(status, headers, content, 404, "not_found")
    assert "no function" in body["error"]


def test_head_does_not_invoke_a_function(errors: Errors) -> None:
    # Flask answers HEAD on GET routes: a function must not run for a discarded body
    marker = errors.path("marker")
    marker.unlink(missing_ok=True)
    response = requests.head(errors.server.url("/function/marker"), headers=AUTH, timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST, PUT, PATCH, DELETE"
    assert response.headers["X-Request-Id"]
    assert not marker.exists()


# -- 413 ---------------------------------------------------------------------------


def _chunks(size: int, piece: int = 100) -> Iterator[bytes]:
    """A body requests sends with Transfer-Encoding: chunked (it has no length)."""
    sent = 0
    while sent < size:
        part = min(piece, size - sent)
        sent += part
        yield b"a" * part


def test_body_over_max_body_is_413(errors: Errors) -> None:
    marker = errors.path("marker")
    marker.unlink(missing_ok=True)
    body = check(errors.post("marker", data=b"a" * (MAX_BODY + 1)), 413, "payload_too_large")
    assert str(MAX_BODY) in body["error"]
    assert not marker.exists()


def test_body_at_max_body_passes(errors: Errors) -> None:
    response = errors.post("echo", data=b"a" * MAX_BODY)
    assert response.status_code == 200
    assert response.json()["len"] == MAX_BODY


@pytest.mark.parametrize("size", [MAX_BODY + 1, 100 * MAX_BODY])
def test_chunked_body_over_max_body_is_413_not_truncated(errors: Errors, size: int) -> None:
    response = errors.post("echo", data=_chunks(size))
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    check(response, 413, "payload_too_large")


def test_chunked_body_at_max_body_passes_whole(errors: Errors) -> None:
    response = errors.post("echo", data=_chunks(MAX_BODY))
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200
    assert response.json()["len"] == MAX_BODY


# -- 429, and the order of the checks while every slot is taken ---------------------


def _start(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_over_concurrency_is_429_and_cheaper_refusals_come_first(errors: Errors) -> None:
    release = errors.path("release")
    release.unlink(missing_ok=True)
    answers: list[requests.Response] = []
    blockers = [_start(lambda: answers.append(errors.post("block"))) for _ in range(CONCURRENCY)]
    try:
        assert wait_until(lambda: errors.stats()["active_requests"] == CONCURRENCY, 10)
        response = errors.post("echo", json={"a": 1})
        body = check(response, 429, "too_many_requests")
        assert body["error"] == "too many requests"
        assert int(response.headers["Retry-After"]) >= 1
        # refusals that need no slot are answered as such, not as 429
        check(errors.post("nope"), 404, "not_found")
        check(errors.post("echo", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        check(errors.post("echo", data=b"a" * (MAX_BODY + 1)), 413, "payload_too_large")
        check(errors.post("echo", data=b"{", headers={"Content-Type": "application/json"}),
              400, "invalid_json")
    finally:
        release.touch()
        for thread in blockers:
            thread.join(30)
    assert [a.status_code for a in answers] == [200] * CONCURRENCY
    assert errors.post("echo").status_code == 200  # the slots came back


# -- 502 ---------------------------------------------------------------------------


def test_nonzero_exit_is_502_with_exit_code_and_no_stderr(errors: Errors) -> None:
    response = errors.post("crash")
    body = check(response, 502, "function_failed")
    assert body["exit_code"] == 3
    assert "signal" not in body
    assert "stderr" not in body  # serve mode: stderr goes to the logs only
    assert b"secret detail" not in response.content


def test_killed_by_signal_is_502_with_signal(errors: Errors) -> None:
    body = check(errors.post("killed"), 502, "function_failed")
    assert body["signal"] == 15
    assert "exit_code" not in body
    assert "15" in body["error"]


def test_output_over_max_output_is_502(errors: Errors) -> None:
    response = errors.post("bigout")
    body = check(response, 502, "output_too_large")
    assert str(MAX_OUTPUT) in body["error"]
    assert b"xxxx" not in response.content  # no partial output leaks out


@pytest.mark.go
def test_go_compile_error_is_502_build_failed(errors: Errors) -> None:
    body = check(errors.post("broken"), 502, "build_failed")
    assert "undefinedThing" in body["error"]  # the compiler's own words
    assert "undefined" in body["error"]
    assert errors.post("echo").status_code == 200  # the others keep working


# -- 504 ---------------------------------------------------------------------------


def test_deadline_is_504_timeout(errors: Errors) -> None:
    started = time.monotonic()
    response = errors.post("slow")
    elapsed = time.monotonic() - started
    body = check(response, 504, "timeout")
    assert body["error"] == "function timed out after 1s"
    assert 1.0 <= elapsed < 4.0
    assert float(response.headers["X-Duration-Seconds"]) >= 1.0


def test_timeout_kills_the_grandchild_holding_stdout(errors: Errors) -> None:
    pid_file = errors.path("grandchild.pid")
    pid_file.unlink(missing_ok=True)
    started = time.monotonic()
    response = errors.post("grandchild")
    elapsed = time.monotonic() - started
    check(response, 504, "timeout")
    assert elapsed < 1.0 + 3.0
    grandchild = read_pid(pid_file)
    assert wait_until(lambda: process_gone(grandchild), 2), "the grandchild survived"


# -- 499: the client went away ------------------------------------------------------


def test_client_disconnect_kills_the_function(errors: Errors) -> None:
    pid_file = errors.path("hang.pid")
    pid_file.unlink(missing_ok=True)
    failed_before = errors.stats()["failed_requests"]
    request_id = f"disconnect-{time.time_ns()}"
    with socket.create_connection(("127.0.0.1", errors.server.port), timeout=10) as client:
        client.sendall(
            f"POST /function/hang HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\n\r\n{{}}".encode())
        pid = read_pid(pid_file)
        assert not process_gone(pid)
    closed = time.monotonic()
    assert wait_until(lambda: process_gone(pid), 2.5), "the function outlived its client"
    assert time.monotonic() - closed < 2.5

    def line() -> list[dict[str, Any]]:
        return [r for r in invocation_records(errors.server.log_records())
                if r.get("request_id") == request_id]

    records = wait_until(line, 5)
    assert len(records) == 1, records
    assert records[0]["status"] == 499
    assert records[0]["outcome"] == "cancelled"
    assert records[0]["function"] == "hang"
    assert wait_until(lambda: errors.stats()["failed_requests"] == failed_before + 1, 5)
    assert errors.stats()["functions"]["hang"]["failed_requests"] >= 1


# -- the order of the checks ---------------------------------------------------------


def test_auth_comes_before_the_name(errors: Errors) -> None:
    status, headers, content = raw_request(errors.server, "POST", "/function/..", body=b"{}",
                                           headers={"X-API-Key": "wrong"})
    check_error(status, headers, content, 401, "unauthorized")
    check(errors.post("nope", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    check(errors.post("nope", headers={"X-API-Key": "wrong"}, data=b"a" * (10 * MAX_BODY)),
          401, "unauthorized")


def test_name_comes_before_the_size(errors: Errors) -> None:
    check(errors.post("nope", data=b"a" * (10 * MAX_BODY)), 404, "not_found")
    check(errors.post("nope", data=_chunks(10 * MAX_BODY)), 404, "not_found")
    check(errors.post("nope", data=b"{", headers={"Content-Type": "application/json"}),
          404, "not_found")


def test_size_comes_before_json(errors: Errors) -> None:
    too_big_and_broken = b"{" * (MAX_BODY + 1)
    check(errors.post("echo", data=too_big_and_broken,
                      headers={"Content-Type": "application/json"}), 413, "payload_too_large")
    check(errors.post("echo", data=_chunks(MAX_BODY + 1),
                      headers={"Content-Type": "application/json"}), 413, "payload_too_large")


def test_refusals_before_admission_are_not_counted(errors: Errors) -> None:
    before = errors.stats()
    errors.post("nope")
    errors.post("echo", headers={"X-API-Key": "wrong"})
    errors.post("echo", data=b"a" * (MAX_BODY + 1))
    errors.post("echo", data=b"{", headers={"Content-Type": "application/json"})
    after = errors.stats()
    assert after["total_requests"] == before["total_requests"]
    assert "nope" not in after["functions"]


# -- 500 -----------------------------------------------------------------------------


@pytest.mark.go
def test_fault_of_fnserve_itself_is_500_internal(tmp_path: Path) -> None:
    """FnServe cannot create its own Go binary cache: not the function's fault, a 500."""
    directory = tmp_path / "functions"
    write_function(directory, "hello.go", """
        package main

        import "fmt"

        func main() { fmt.Println("{}") }
    """)
    not_a_directory = tmp_path / "cache-is-a-file"
    not_a_directory.write_text("")
    env = {**os.environ, "XDG_CACHE_HOME": str(not_a_directory)}
    with running(LiveServer(directory, env=env)) as server:
        response = server.post("/function/hello", headers={"Connection": "close"})
        body = check(response, 500, "internal")
        assert body["error"] == "internal error"
        assert "cache-is-a-file" not in response.text  # the details go to the log only
        records = server.log_records()
        logged = [r for r in records if r.get("level") == "ERROR"]
        assert logged and "Traceback" in logged[0].get("exc_info", ""), records
        line = [r for r in invocation_records(records) if r["request_id"] == body["request_id"]]
        assert [(r["status"], r["outcome"]) for r in line] == [(500, "internal")]
        stats = server.stats()
        assert stats["failed_requests"] == 1
        assert stats["total_requests"] == 1
