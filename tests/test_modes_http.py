"""fork and warm modes (SPEC §8) behind a real `fnserve serve` / `fnserve dev`.

LiveServer.stop checks that no process the server started (worker, fork server,
warm process, fork child, grandchild) is left after the stop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from .helpers import process_gone, read_pid, wait_until, write_function, write_toml
from .live import LiveServer, invocation_records, running

SEED = """
    import json, os, sys

    def handler(event, context):
        name = event.get("name") or context.get("parameters", {}).get("name") or "world"
        return {"message": f"{os.environ.get('GREETING', 'Hello')}, {name}!",
                "request_id": context.get("request_id")}

    if __name__ == "__main__":
        event = json.load(sys.stdin)
        ctx = json.loads(os.environ["FN_CONTEXT"])
        print(json.dumps(handler(event, ctx)))
"""

TOML = """
    [defaults]
    env = { GREETING = "Hi" }

    [functions.fhello]
    mode = "fork"

    [functions.whello]
    mode = "warm"
    pool = 2

    [functions.wfail]
    mode = "warm"
    pool = 1

    [functions.broken]
    mode = "fork"

    [functions.wslow]
    mode = "warm"
    pool = 1
    timeout = "1s"

    [functions.whang]
    mode = "warm"
    pool = 1

    [functions.fhang]
    mode = "fork"
"""


def write_functions(directory: Path) -> None:
    for name in ("hello", "fhello", "whello"):
        write_function(directory, f"{name}.py", SEED)
    write_function(directory, "wfail.py", """
        import os, sys

        def handler(event, context):
            print("handling", event.get("n"))
            if event.get("fail"):
                raise RuntimeError("it broke")
            return {"pid": os.getpid()}
    """)
    write_function(directory, "broken.py", "import not_a_module_anywhere\n")
    write_function(directory, "wslow.py", """
        import os, time

        def handler(event, context):
            if event.get("sleep"):
                time.sleep(30)
            return os.getpid()
    """)
    hang = """
        import os, subprocess, time

        def handler(event, context):
            child = subprocess.Popen(["sleep", "60"])
            with open(event["pidfile"], "w") as f:
                f.write(f"{child.pid}\\n")
            time.sleep(60)
    """
    write_function(directory, "whang.py", hang)
    write_function(directory, "fhang.py", hang)
    write_toml(directory, TOML)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("modes") / "functions"
    directory.mkdir()
    write_functions(directory)
    with running(LiveServer(directory, "--timeout", "10s")) as live:
        yield live


def test_the_same_json_in_every_mode(server: LiveServer) -> None:
    bodies = []
    for name in ("hello", "fhello", "whello"):
        response = server.post(f"/function/{name}", json={"name": "Ada"},
                               headers={"X-Request-Id": "same-id"})
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["X-Request-Id"] == "same-id"
        bodies.append(response.json())
    assert bodies[0] == bodies[1] == bodies[2] == {"message": "Hi, Ada!",
                                                   "request_id": "same-id"}


def test_functions_lists_the_mode(server: LiveServer) -> None:
    rows = {row["name"]: row for row in server.get("/functions").json()["functions"]}
    assert {name: rows[name]["mode"] for name in ("hello", "fhello", "whello")} == \
        {"hello": "process", "fhello": "fork", "whello": "warm"}


def test_exception_is_a_502_with_its_type_and_the_process_survives(server: LiveServer) -> None:
    first = server.post("/function/wfail", json={"n": 1})
    failed = server.post("/function/wfail", json={"n": 2, "fail": True},
                         headers={"X-Request-Id": "fail-1"})
    assert failed.status_code == 502
    body = failed.json()
    assert body["code"] == "function_failed"
    assert (body["error_type"], body["error_message"]) == ("RuntimeError", "it broke")
    assert "stderr" not in body  # serve mode: the traceback goes to the log only
    assert server.post("/function/wfail", json={"n": 3}).json() == first.json()

    def logged() -> list[dict[str, Any]]:
        return [r for r in server.log_records()
                if r.get("logger") == "fnserve.function" and r.get("request_id") == "fail-1"]

    assert wait_until(lambda: any("RuntimeError: it broke" in r["message"] for r in logged()))
    streams = {(r["stream"], r["message"]) for r in logged()}
    assert ("stdout", "handling 2") in streams
    line = [r for r in invocation_records(server.log_records()) if r["request_id"] == "fail-1"]
    assert line and line[0]["status"] == 502 and line[0]["outcome"] == "failed"


def test_init_failure_is_a_502_and_listed(server: LiveServer) -> None:
    response = server.post("/function/broken")
    assert response.status_code == 502
    body = response.json()
    assert body["code"] == "init_failed"
    assert body["error_type"] == "ModuleNotFoundError"
    assert "not_a_module_anywhere" in body["error_message"]
    rows = {row["name"]: row for row in server.get("/functions").json()["functions"]}
    assert rows["broken"]["status"] == "error" and rows["broken"]["mode"] == "fork"
    assert "ModuleNotFoundError" in rows["broken"]["error"]


def test_deadline_is_a_504_and_the_warm_process_is_replaced(server: LiveServer) -> None:
    before = server.post("/function/wslow").json()
    timed_out = server.post("/function/wslow", json={"sleep": True})
    assert timed_out.status_code == 504 and timed_out.json()["code"] == "timeout"
    assert wait_until(lambda: process_gone(before), timeout=5)
    after = server.post("/function/wslow")
    assert after.status_code == 200 and after.json() != before


def test_statistics_count_fork_and_warm_like_process(server: LiveServer) -> None:
    before = server.stats()["functions"].get("fhello", {}).get("success_requests", 0)
    for _ in range(3):
        assert server.post("/function/fhello").status_code == 200
    stats = server.stats()["functions"]["fhello"]
    assert stats["success_requests"] == before + 3
    metrics = server.get("/metrics").text
    assert 'fnserve_requests_total{function="fhello",outcome="ok"}' in metrics


def test_a_hup_retires_the_old_pool(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_functions(directory)
    with running(LiveServer(directory)) as live:
        old = live.post("/function/wslow").json()
        assert live.proc is not None
        live.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: process_gone(old), timeout=30)

        def answered() -> Any:
            try:
                return requests.post(live.url("/function/wslow"), timeout=10,
                                     headers={"Connection": "close"}).json()
            except requests.RequestException:
                return None

        new = wait_until(answered, timeout=30)
        assert new and new != old


def test_stop_during_a_warm_and_a_fork_invocation_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "nap.py", """
        import os, subprocess, time

        def handler(event, context):
            subprocess.Popen(["sleep", "60"])
            open(event["marker"], "w").write("x")
            time.sleep(60)
    """)
    write_function(directory, "fnap.py", (directory / "nap.py").read_text(), dedent=False)
    write_toml(directory, '[functions.nap]\nmode = "warm"\n[functions.fnap]\nmode = "fork"\n')
    live = LiveServer(directory, "--graceful-timeout", "1s").start()
    try:
        markers = [tmp_path / "warm-started", tmp_path / "fork-started"]
        answers: list[int] = []
        calls = [threading.Thread(target=lambda n=name, m=marker: answers.append(
                    requests.post(live.url(f"/function/{n}"), json={"marker": str(m)},
                                  timeout=60).status_code))
                 for name, marker in zip(("nap", "fnap"), markers, strict=True)]
        for call in calls:
            call.start()
        assert wait_until(lambda: all(m.exists() for m in markers), timeout=30)
        assert len(live.function_processes()) >= 4  # fork server, child, warm, sleeps
        assert live.stop() == 0  # asserts that none of them is left
        for call in calls:
            call.join(timeout=30)
        assert answers == [503, 503]
    finally:
        live.kill()


def test_dev_edit_of_a_warm_function_is_served(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    path = write_function(directory, "greet.py", """
        def handler(event, context):
            return "v1"
    """)
    write_toml(directory, '[functions.greet]\nmode = "warm"\npool = 1\n')
    with running(LiveServer(directory, mode="dev")) as live:
        def version() -> Any:
            try:
                return requests.post(live.url("/function/greet"), timeout=10,
                                     headers={"Connection": "close"}).json()
            except (requests.RequestException, ValueError):
                return None

        assert version() == "v1"
        pool_pids = [p.pid for p in live.function_processes()]
        path.write_text('def handler(event, context):\n    return "v2"\n')
        assert wait_until(lambda: version() == "v2", timeout=15)
        assert wait_until(lambda: all(process_gone(pid) for pid in pool_pids), timeout=15)


def test_fork_children_are_not_left_as_zombies(server: LiveServer) -> None:
    for _ in range(5):
        assert server.post("/function/fhello").status_code == 200
    servers = [p for p in server.function_processes() if "fork" in p.cmdline()]
    assert servers

    def zombies() -> list[psutil.Process]:
        found = []
        for fork_server in servers:
            for child in fork_server.children():
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        found.append(child)
                except psutil.NoSuchProcess:
                    pass
        return found

    assert wait_until(lambda: not zombies(), timeout=5), zombies()
    assert os.path.exists(f"/proc/{servers[0].pid}")


@pytest.mark.parametrize("name", ["whang", "fhang"])
def test_client_disconnect_kills_the_invocation(server: LiveServer, tmp_path: Path,
                                                name: str) -> None:
    """The run executes in the request thread, which watches the client's socket."""
    pidfile = tmp_path / "grandchild"
    request_id = f"gone-{name}"
    event = json.dumps({"pidfile": str(pidfile)})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(
            f"POST /function/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(event)}\r\n\r\n{event}".encode())
        grandchild = read_pid(pidfile, timeout=20)
    assert wait_until(lambda: process_gone(grandchild), timeout=10)

    def line() -> list[dict[str, Any]]:
        return [r for r in invocation_records(server.log_records())
                if r.get("request_id") == request_id]

    records = wait_until(line, 10)
    assert len(records) == 1 and (records[0]["status"], records[0]["outcome"]) == \
        (499, "cancelled")
    if name == "whang":  # the pool's only process was replaced and serves again
        again = server.post("/function/whang", json={"pidfile": "/nonexistent/x"})
        assert again.status_code == 502 and again.json()["error_type"] == "FileNotFoundError"
