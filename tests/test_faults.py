"""The fault catalogue: functions that misbehave, one test per fault, against a live server.

Each test asserts the answer (status and body), that the server still answers
(/healthz 200 and a normal function 200), and that no process of the faulty
invocation is left. Functions write their pids to files named by the `pids`
query parameter (see _pids.py below), so the test knows whom to look for.
docs/reliability.md is the prose version of this file.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.helpers import process_gone, read_pid, wait_until, write_function, write_toml
from tests.live import LiveServer, assert_serving, running, the_worker

MiB = 1024 * 1024

# imported by every Python fault function: record(role) writes this process's pid
PIDS_HELPER = """
import json, os

_params = json.loads(os.environ["FN_CONTEXT"])["parameters"]


def record(role="main", pid=None):
    prefix = _params.get("pids")
    if prefix:
        with open(f"{prefix}.{role}", "w") as handle:
            handle.write(f"{pid or os.getpid()}\\n")
"""

FUNCTIONS = {
    "ok.py": "print('ok')\n",
    "deaf.py": """
        import array, fcntl, termios, time
        from _pids import record
        record()
        # handshake: wait until the stdin pipe is full, so the server is mid-way through
        # the 6 MiB body, blocked on writing it; then exit without reading a byte
        capacity = fcntl.fcntl(0, 1032)  # F_GETPIPE_SZ
        pending = array.array("i", [0])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            fcntl.ioctl(0, termios.FIONREAD, pending)
            if pending[0] >= capacity:
                break
            time.sleep(0.01)
        print("did not read it" if pending[0] >= capacity else "the pipe never filled")
    """,
    "closes_stdout.py": """
        import os, sys, time
        from _pids import record
        record()
        os.close(1)
        time.sleep(0.3)  # stdout is at EOF already: the answer must wait for the exit
        print("still running after closing stdout", file=sys.stderr)
    """,
    "binary.py": """
        import sys
        from _pids import record
        record()
        tail = b"\\xff\\xfe\\xc3\\x28 not utf-8 \\xed\\xa0\\x80"
        sys.stdout.buffer.write(bytes(range(256)) + tail)
    """,
    "noisy.py": """
        import sys
        from _pids import record
        record()
        block = (b"e" * 1023 + b"\\n") * 1024  # 1 MiB in lines of 1 KiB
        for _ in range(100):
            sys.stderr.buffer.write(block)
        sys.stderr.buffer.flush()
        print("done")
    """,
    "segfault.py": """
        import os, signal
        from _pids import record
        record()
        os.kill(os.getpid(), signal.SIGSEGV)
    """,
    "sigkill.py": """
        import os, signal
        from _pids import record
        record()
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    "stubborn.py": """
        import signal, time
        from _pids import record
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record()
        time.sleep(60)
    """,
    "forker.py": """
        import os, sys, time
        from _pids import record
        record()
        sys.stdout.write("parent done\\n")
        sys.stdout.flush()
        for n in range(3):
            if os.fork() == 0:  # the child keeps stdout and stderr open
                record(f"child{n}")
                time.sleep(60)
                os._exit(0)
        time.sleep(0.1)
    """,
    "escaper.py": """
        import subprocess, sys
        from _pids import record
        record()
        # a new session: out of the function's process group, stdout inherited
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=True)
        record("escaped", child.pid)
        print("main done")
    """,
    "flood.py": """
        import sys
        from _pids import record
        record()
        chunk = "y" * 65536
        while True:
            sys.stdout.write(chunk)
    """,
    "hog.py": """
        from _pids import record
        record()
        hoard = []
        for _ in range(64):
            hoard.append(bytearray(16 * 1024 * 1024))  # 1 GiB in all, far past 64MB
        print(len(hoard))
    """,
    "fdhog.py": """
        import errno, os, resource
        from _pids import record
        record()
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(f"{len(fds)} {soft}")
    """,
    "patricide.py": """
        import os, signal
        from _pids import record
        record()
        os.kill(os.getppid(), signal.SIGKILL)  # the parent is the gunicorn worker
    """,
    "bystander.py": """
        import time
        from _pids import record
        record()
        time.sleep(60)
    """,
    "vanish.py": """
        import time
        from _pids import record
        record()
        time.sleep(0.5)
        print("finished anyway")
    """,
}

GO_PANIC = """
package main

import (
\t"encoding/json"
\t"fmt"
\t"os"
)

func main() {
\tvar ctx struct {
\t\tParameters map[string]string `json:"parameters"`
\t}
\t_ = json.Unmarshal([]byte(os.Getenv("FN_CONTEXT")), &ctx)
\tif prefix := ctx.Parameters["pids"]; prefix != "" {
\t\t_ = os.WriteFile(prefix+".main", []byte(fmt.Sprintf("%d\\n", os.Getpid())), 0o644)
\t}
\tpanic("fnserve-fault-test: the function gave up")
}
"""


def _write_all(directory: Path) -> None:
    write_function(directory, "_pids.py", PIDS_HELPER)
    for name, source in FUNCTIONS.items():
        write_function(directory, name, source)
    write_function(directory, "gopanic.go", GO_PANIC, dedent=False)
    write_toml(directory, """
        [functions.stubborn]
        timeout = "1s"

        [functions.hog]
        memory = "64MB"
    """)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("fault-functions")
    _write_all(directory)
    with running(LiveServer(directory, "--timeout", "10s")) as live:
        yield live


@pytest.fixture
def pids(tmp_path: Path) -> Path:
    return tmp_path / "pid"


def invoke(server: LiveServer, name: str, pids: Path, **kwargs: Any) -> requests.Response:
    return server.post(f"/function/{name}", params={"pids": str(pids)}, **kwargs)


def pid_of(pids: Path, role: str = "main") -> int:
    return read_pid(Path(f"{pids}.{role}"))


def assert_gone(*pid_list: int, timeout: float = 5.0) -> None:
    for pid in pid_list:
        assert wait_until(lambda pid=pid: process_gone(pid), timeout), f"pid {pid} is still alive"


def assert_whole(server: LiveServer, *pid_list: int) -> None:
    """The server still answers, and nothing of the faulty invocation runs."""
    assert_serving(server, "ok", b"ok\n")
    assert_gone(*pid_list)
    assert server.function_processes() == []


def records_of(server: LiveServer, request_id: str) -> list[dict[str, object]]:
    return [r for r in server.log_records() if r.get("request_id") == request_id]


# -- the catalogue -----------------------------------------------------------------------


def test_ignores_stdin_while_a_6mib_body_is_sent(server: LiveServer, pids: Path) -> None:
    body = b"x" * (6 * MiB)  # exactly --max-body: admitted
    started = time.monotonic()
    response = invoke(server, "deaf", pids, data=body)
    assert response.status_code == 200, response.text
    assert response.text == "did not read it\n"
    # EPIPE on its stdin is the function's right, not a reason to wait or fail
    assert time.monotonic() - started < 5
    assert_whole(server, pid_of(pids))


def test_closes_stdout_at_once_then_exits_0(server: LiveServer, pids: Path) -> None:
    # SPEC: exit status 0 is a 200 with stdout as the body; stdout was empty
    response = invoke(server, "closes_stdout", pids)
    assert response.status_code == 200, response.text
    assert response.content == b""
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    # stdout's EOF did not end the invocation: the answer waited for the exit
    assert float(response.headers["X-Duration-Seconds"]) >= 0.3
    assert_whole(server, pid_of(pids))


def test_invalid_utf8_and_binary_output_is_returned_unchanged(server: LiveServer,
                                                              pids: Path) -> None:
    response = invoke(server, "binary", pids)
    assert response.status_code == 200
    assert response.content == bytes(range(256)) + b"\xff\xfe\xc3\x28 not utf-8 \xed\xa0\x80"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert_whole(server, pid_of(pids))


def test_100mb_of_stderr_keeps_the_server_small(server: LiveServer, pids: Path) -> None:
    worker = the_worker(server)
    assert_serving(server, "ok")  # warm: the first requests grow the heap once
    before = worker.memory_info().rss
    response = invoke(server, "noisy", pids)
    assert response.status_code == 200, response.text
    assert response.text == "done\n"
    after = worker.memory_info().rss
    assert after - before < 40 * MiB, f"worker RSS grew by {(after - before) / MiB:.1f} MiB"
    request_id = response.headers["X-Request-Id"]
    lines = [r for r in records_of(server, request_id) if r.get("stream") == "stderr"]
    logged = sum(len(str(r["message"])) + 1 for r in lines[:-1])
    assert logged <= MiB + 16 * 1024, "more than 1 MiB of one invocation's stderr was logged"
    last = str(lines[-1]["message"])
    assert last.startswith("[fnserve] ") and last.endswith(" more bytes of stderr not logged")
    dropped = int(last.split()[1])
    assert dropped + logged == 100 * MiB
    assert_whole(server, pid_of(pids))


@pytest.mark.parametrize(("name", "signum"), [("segfault", signal.SIGSEGV),
                                              ("sigkill", signal.SIGKILL)])
def test_killed_by_a_signal_is_502_with_the_signal(server: LiveServer, pids: Path, name: str,
                                                   signum: int) -> None:
    response = invoke(server, name, pids)
    assert response.status_code == 502
    body = response.json()
    assert body["code"] == "function_failed"
    assert body["signal"] == signum
    assert "exit_code" not in body
    assert body["error"] == f"function was killed by signal {signum}"
    assert body["request_id"] == response.headers["X-Request-Id"]
    assert_whole(server, pid_of(pids))


def test_ignores_sigterm_and_sleeps_past_its_deadline(server: LiveServer, pids: Path) -> None:
    started = time.monotonic()
    response = invoke(server, "stubborn", pids)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"
    assert response.json()["error"] == "function timed out after 1s"
    assert 1.0 <= elapsed < 4.0  # SIGKILL, not a polite SIGTERM it could ignore
    assert_whole(server, pid_of(pids))


def test_children_holding_the_pipes_do_not_hold_the_answer(server: LiveServer,
                                                           pids: Path) -> None:
    started = time.monotonic()
    response = invoke(server, "forker", pids)
    assert response.status_code == 200, response.text
    assert response.text == "parent done\n"
    assert time.monotonic() - started < 3.0  # not the children's 60 s
    children = [pid_of(pids, f"child{n}") for n in range(3)]
    assert_whole(server, pid_of(pids), *children)


def test_grandchild_in_a_new_session_is_killed_after_the_function(server: LiveServer,
                                                                 pids: Path) -> None:
    """A process that called setsid() is out of reach of the group kill.

    When the main process exits, the executor kills its process group (the
    escapee is not in it), reads for EXIT_GRACE (0.2 s) more, then closes its ends
    of the pipes and answers. The worker is a child subreaper, so the escapee,
    orphaned, becomes its child: the reaper kills and reaps it (tests/test_reaper.py).
    """
    started = time.monotonic()
    response = invoke(server, "escaper", pids)
    elapsed = time.monotonic() - started
    escaped = pid_of(pids, "escaped")
    try:
        assert response.status_code == 200, response.text
        assert response.text == "main done\n"
        assert elapsed < 3.0  # answered ~0.2 s after the main process exited
        assert_whole(server, pid_of(pids), escaped)
        assert not psutil.pid_exists(escaped)  # reaped, not a zombie
    finally:
        try:
            os.kill(escaped, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_endless_stdout_is_502_output_too_large(server: LiveServer, pids: Path) -> None:
    response = invoke(server, "flood", pids)
    assert response.status_code == 502
    assert response.json()["code"] == "output_too_large"
    assert response.json()["error"] == f"function output is larger than {6 * MiB} bytes"
    assert_whole(server, pid_of(pids))


def test_allocating_past_the_memory_limit_fails_the_function(server: LiveServer,
                                                             pids: Path) -> None:
    response = invoke(server, "hog", pids)
    assert response.status_code == 502
    body = response.json()
    assert body["code"] == "function_failed"
    assert body["exit_code"] == 1  # Python's MemoryError; never reaches 1 GiB
    assert "MemoryError" not in response.text  # stderr goes to the logs, not the client
    logged = " ".join(str(r["message"]) for r in records_of(server, body["request_id"]))
    assert "MemoryError" in logged
    assert_whole(server, pid_of(pids))


def test_opening_files_until_it_fails_is_contained(server: LiveServer, pids: Path) -> None:
    worker = the_worker(server)
    fds_before = worker.num_fds()
    response = invoke(server, "fdhog", pids)
    assert response.status_code == 200, response.text
    opened, soft = map(int, response.text.split())
    assert opened >= soft - 16  # it ran into its own RLIMIT_NOFILE ...
    assert_whole(server, pid_of(pids))
    assert worker.num_fds() <= fds_before + 2  # ... and none of that is the server's


@pytest.mark.go
def test_go_panic_is_502_exit_code_2_and_the_panic_is_logged(server: LiveServer,
                                                             pids: Path) -> None:
    response = invoke(server, "gopanic", pids, timeout=300)  # the first call builds it
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["code"] == "function_failed"
    assert body["exit_code"] == 2
    assert "panic" not in response.text
    messages = [str(r["message"]) for r in records_of(server, body["request_id"])
                if r.get("stream") == "stderr"]
    assert "panic: fnserve-fault-test: the function gave up" in messages
    assert any(line.startswith("goroutine 1 [running]") for line in messages)
    assert_whole(server, pid_of(pids))


# -- faults of the functions directory: each on its own server -----------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LiveServer]:
    directory = tmp_path / "functions"
    directory.mkdir()
    _write_all(directory)
    with running(LiveServer(directory)) as live:
        yield live


def test_function_file_deleted_while_it_runs(own_server: LiveServer, pids: Path) -> None:
    """The running invocation completes; the next call is a 502 that says what happened.

    Serve scans DIR once per worker (dev reloads), so the name is still known: the
    interpreter starts and cannot open the script (exit 2). 502, not 404: the
    function exists as far as this worker knows, and failed to run.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        running_call = pool.submit(invoke, own_server, "vanish", pids)
        main = pid_of(pids)
        (own_server.directory / "vanish.py").unlink()
        response = running_call.result(timeout=30)
    assert response.status_code == 200
    assert response.text == "finished anyway\n"
    after = own_server.post("/function/vanish")
    assert after.status_code == 502
    body = after.json()
    assert body["code"] == "function_failed"
    assert body["exit_code"] == 2  # python: can't open file
    assert body["error"] == ("function exited with status 2 (its file was removed from the "
                             "functions directory)")
    assert str(own_server.directory) not in after.text
    assert_whole(own_server, main)


def test_function_that_kills_its_worker(own_server: LiveServer, tmp_path: Path) -> None:
    """Same uid: a function can SIGKILL the gunicorn worker that runs it.

    The arbiter boots a new worker and the server answers again, but whatever
    was in flight is lost: its clients get no answer. The functions that were
    running are adopted by the master (a child subreaper), which kills them and
    their groups when the worker is reaped (child_exit), and reaps them.
    Counters start again from zero in the new worker.
    """
    from concurrent.futures import ThreadPoolExecutor

    old_worker = the_worker(own_server)
    bystander_pids, killer_pids = tmp_path / "bystander", tmp_path / "killer"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(invoke, own_server, "bystander", bystander_pids)
        orphan = pid_of(bystander_pids)
        try:
            with pytest.raises(requests.ConnectionError):
                requests.post(own_server.url("/function/patricide"),
                              params={"pids": str(killer_pids)}, timeout=30)
            with pytest.raises(requests.ConnectionError):
                waiting.result(timeout=30)
            assert wait_until(lambda: process_gone(old_worker.pid), timeout=10)
            assert wait_until(lambda: [w.pid for w in own_server.workers()
                                       if w.pid != old_worker.pid], timeout=30)
            assert wait_until(lambda: _answers(own_server), timeout=30)
            assert_serving(own_server, "ok", b"ok\n")
            # killed by the master, and reaped: not left to init, not a zombie
            assert wait_until(lambda: not psutil.pid_exists(orphan), timeout=10)
            assert own_server.stats()["total_requests"] == 1  # the new worker's ok call
            killed = [r for r in own_server.log_records()
                      if "processes left running by worker" in str(r.get("message", ""))]
            assert killed, "the master did not say it killed the orphan"
        finally:
            try:
                os.killpg(orphan, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert_gone(orphan, pid_of(killer_pids))


def _answers(server: LiveServer) -> bool:
    try:
        return requests.get(server.url("/healthz"), timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.mark.parametrize("how", ["renamed", "deleted"])
def test_functions_directory_gone_while_serving(own_server: LiveServer, how: str) -> None:
    directory = own_server.directory
    if how == "renamed":
        directory.rename(directory.with_name("functions-away"))
    else:
        shutil.rmtree(directory)
    health = own_server.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    response = own_server.post("/function/ok")
    assert response.status_code == 502
    body = response.json()
    # its working directory is gone too: the process cannot even start
    assert body["code"] == "function_failed" and body["exit_code"] == 127
    assert body["error"] == ("cannot start ok: No such file or directory (its file was "
                             "removed from the functions directory)")
    listing = own_server.get("/functions")
    assert listing.status_code == 200
    assert "ok" in {row["name"] for row in listing.json()["functions"]}
    assert own_server.get("/stats").status_code == 200
    if how == "renamed":  # put back: the same scanned table works again
        directory.with_name("functions-away").rename(directory)
        assert_serving(own_server, "ok", b"ok\n")
    assert own_server.function_processes() == []


# root ignores permission bits through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; a root
# server started without them in its bounding set meets the bits like any other user
WITHOUT_ROOTS_FILE_ACCESS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_functions_directory(tmp_path: Path) -> None:
    """chmod 000 on DIR: the function cannot start, 502; the server answers on.

    Run as root (CI is root), the server runs without root's file-access capabilities,
    so this case is exercised there too, not only on a developer's machine."""
    directory = tmp_path / "functions"
    directory.mkdir()
    _write_all(directory)
    prefix = WITHOUT_ROOTS_FILE_ACCESS if os.geteuid() == 0 else []
    server = LiveServer(directory, command=[*prefix, sys.executable, "-m", "fnserve", "serve",
                                            str(directory)])
    with running(server):
        assert_serving(server, "ok", b"ok\n")
        directory.chmod(0o000)
        try:
            response = server.post("/function/ok")
            # the start fails (cwd) or python cannot open DIR/ok.py
            assert response.status_code == 502, response.text
            assert response.json()["code"] == "function_failed"
            assert server.get("/healthz").status_code == 200
        finally:
            directory.chmod(0o755)
        assert_serving(server, "ok", b"ok\n")


def test_root_runs_a_function_in_an_unreadable_directory_anyway(own_server: LiveServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root ignores permission bits; the 502 case is tested above")
    directory = own_server.directory
    directory.chmod(0o000)
    try:
        assert own_server.post("/function/ok").status_code == 200
    finally:
        directory.chmod(0o755)
    assert_serving(own_server, "ok", b"ok\n")
