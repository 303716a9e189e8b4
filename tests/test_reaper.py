"""Escaped processes (reaper.py): a descendant that leaves its function's process group
is killed and reaped once its invocation has ended, never before, and at worker exit.

"Gone" here means reaped, not only dead: a zombie left behind is a failure too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.helpers import (
    fnserve_cli,
    process_gone,
    read_pid,
    wait_until,
    write_function,
    write_toml,
)
from tests.live import LiveServer, running, the_worker

# record(role, pid) writes a pid to "<pids>.<role>"; the parameters say what to do
ESCAPE = """
import json, os, sys, time

params = json.loads(os.environ["FN_CONTEXT"])["parameters"]


def record(role, pid):
    # written whole, then renamed: the leader waits for the name to exist
    path = f"{params['pids']}.{role}"
    with open(path + ".tmp", "w") as handle:
        handle.write(f"{pid}\\n")
    os.rename(path + ".tmp", path)


def escape(role, environ):
    # fork, setsid (out of the function's group and session), fork again: the
    # grandchild's parent exits at once, so it is re-parented to the subreaper
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            record(role, os.getpid())
            os.execve("/bin/sleep", ["sleep", "60"], environ)
        os._exit(0)


roles = ["escaped"]
escape("escaped", dict(os.environ))
if params.get("clean_env"):  # one that cannot be attributed: no FN_REQUEST_ID
    escape("anonymous", {"PATH": "/usr/bin:/bin"})
    roles.append("anonymous")
# handshake: the escapees have written their pids before this invocation can end
while not all(os.path.exists(f"{params['pids']}.{role}") for role in roles):
    time.sleep(0.01)
if params.get("wait_for"):  # still running until the test creates this file
    while not os.path.exists(params["wait_for"]):
        time.sleep(0.01)
if params.get("sleep"):
    time.sleep(float(params["sleep"]))
print("main done")
"""


def reaped(pid: int) -> bool:
    """Gone from the process table: killed and waited for (a zombie is not reaped)."""
    return not psutil.pid_exists(pid)


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("reaper-functions")
    write_function(directory, "escape.py", ESCAPE)
    write_function(directory, "ok.py", "print('ok')\n")
    write_toml(directory, """
        [functions.escape]
        timeout = "3s"
    """)
    with running(LiveServer(directory)) as live:
        yield live


def no_zombie_children(server: LiveServer) -> bool:
    return not [child for child in the_worker(server).children()
                if child.status() == psutil.STATUS_ZOMBIE]


def test_an_escaped_grandchild_is_killed_and_reaped_after_its_function_exits(
        server: LiveServer, tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    response = server.post("/function/escape", params={"pids": str(pids)})
    escaped = read_pid(Path(f"{pids}.escaped"))
    try:
        assert response.status_code == 200, response.text
        assert response.text == "main done\n"
        assert wait_until(lambda: reaped(escaped), timeout=10), "the escapee is still there"
        assert wait_until(lambda: no_zombie_children(server), timeout=10)
    finally:
        kill_quietly(escaped)
    killed = [r for r in server.log_records() if r.get("logger") == "fnserve.reaper"]
    assert any(str(escaped) in str(r["message"]) for r in killed)


def test_an_escapee_of_a_timed_out_function_is_killed(server: LiveServer,
                                                      tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    response = server.post("/function/escape", params={"pids": str(pids), "sleep": "30"})
    escaped = read_pid(Path(f"{pids}.escaped"))
    try:
        assert response.status_code == 504, response.text
        assert wait_until(lambda: reaped(escaped), timeout=10)
    finally:
        kill_quietly(escaped)


def test_an_escapee_that_cannot_be_attributed_is_killed(server: LiveServer,
                                                        tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    response = server.post("/function/escape", params={"pids": str(pids), "clean_env": "1"})
    escaped, anonymous = (read_pid(Path(f"{pids}.{role}")) for role in ("escaped", "anonymous"))
    try:
        assert response.status_code == 200, response.text
        assert wait_until(lambda: reaped(escaped) and reaped(anonymous), timeout=10)
    finally:
        kill_quietly(escaped, anonymous)


def test_an_escapee_lives_as_long_as_its_invocation(server: LiveServer,
                                                    tmp_path: Path) -> None:
    """A sweep that runs while invocation A is still running leaves A's escapee alone."""
    release = tmp_path / "release"
    a_pids, b_pids = tmp_path / "a", tmp_path / "b"
    with ThreadPoolExecutor(1) as pool:
        call_a = pool.submit(server.post, "/function/escape",
                             params={"pids": str(a_pids), "wait_for": str(release)})
        a_escaped = read_pid(Path(f"{a_pids}.escaped"))
        try:
            # B ends while A runs: the sweep after B kills B's escapee ...
            b = server.post("/function/escape", params={"pids": str(b_pids)})
            assert b.status_code == 200, b.text
            b_escaped = read_pid(Path(f"{b_pids}.escaped"))
            assert wait_until(lambda: reaped(b_escaped), timeout=10)
            # ... and that same sweep left A's, whose invocation is still running
            assert psutil.Process(a_escaped).status() != psutil.STATUS_ZOMBIE
            assert psutil.Process(a_escaped).ppid() == the_worker(server).pid
            release.touch()
            assert call_a.result(timeout=30).status_code == 200
            assert wait_until(lambda: reaped(a_escaped), timeout=10)
        finally:
            release.touch()
            kill_quietly(a_escaped)


def test_escapees_of_running_functions_are_killed_when_the_server_stops(
        tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "escape.py", ESCAPE)
    pids, release = tmp_path / "pid", tmp_path / "never"
    server = LiveServer(directory, "--graceful-timeout", "1s")
    with running(server), ThreadPoolExecutor(1) as pool:
        call = pool.submit(requests.post, server.url("/function/escape"),
                           params={"pids": str(pids), "wait_for": str(release)}, timeout=60)
        escaped = read_pid(Path(f"{pids}.escaped"))
        try:
            assert psutil.Process(escaped).status() != psutil.STATUS_ZOMBIE
            server.descendants()  # LiveServer.stop checks each of these is gone
            assert server.stop() == 0
            assert reaped(escaped)
            assert call.result(timeout=30).status_code == 503
        finally:
            kill_quietly(escaped)


def test_fnserve_run_kills_what_escaped(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    write_function(directory, "escape.py", ESCAPE)
    pids = tmp_path / "pid"
    env = {**os.environ}
    done = fnserve_cli("run", "escape", "--dir", str(directory), "--param", f"pids={pids}",
                       env=env)
    escaped = read_pid(Path(f"{pids}.escaped"))
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"main done\n"
        # killed before `fnserve run` exited (at most a zombie, which init then reaps), not
        # left running as init's orphan
        assert process_gone(escaped)
        assert wait_until(lambda: reaped(escaped), timeout=5)
    finally:
        kill_quietly(escaped)


SWEEPING_WHILE_EXECUTING = """
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fnserve.context import make_context
from fnserve.executor import Executor, Invocation
from fnserve.reaper import REAPER
from fnserve.registry import spec_for_path
from fnserve.runtimes import make_runtimes

assert REAPER.start(background=False)
stop = False

def sweep_without_pause():
    while not stop:
        REAPER.sweep()

sweeper = threading.Thread(target=sweep_without_pause)
sweeper.start()
spec = spec_for_path(Path(sys.argv[1]))
executor = Executor(8, make_runtimes(Path(sys.argv[2]), {}))

def one(n):
    context = make_context(spec.name, 10.0)
    result = executor.run(Invocation(spec, context, b"{}", time.monotonic() + 10,
                                     {"PATH": "/usr/bin:/bin"}))
    return result.outcome, result.exit_code

with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(one, range(200)))
stop = True
sweeper.join()
REAPER.stop()
print(json.dumps({"results": sorted(set(map(tuple, results))), "killed": REAPER.killed}))
"""


def test_sweeps_never_take_the_exit_status_of_a_function(tmp_path: Path) -> None:
    """200 invocations on 8 threads while another thread sweeps without pause: every
    exit status is the function's own (a stolen one reads as 0 or fails the wait),
    and no process the executor started is mistaken for an orphan."""
    function = write_function(tmp_path, "exits3.sh", "#!/bin/sh\nexit 3\n", executable=True)
    script = tmp_path / "sweeping.py"
    script.write_text(textwrap.dedent(SWEEPING_WHILE_EXECUTING))
    done = subprocess.run([sys.executable, str(script), str(function), str(tmp_path / "cache")],
                          capture_output=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, Any] = json.loads(done.stdout)
    assert report == {"results": [["failed", 3]], "killed": 0}
