"""Sandboxed functions (SPEC §12): real bwrap, a real server, attacks proven from outside.

One server for the module, started with `--isolation sandbox`, runs the same attack
function as Python and as Go (tests/sandbox_functions.py), plus `open`, the same
Python attack with `isolation = "none"`: each attack is shown to work there, so a
test that finds it stopped in the sandbox is not passing by accident.

Never skipped in CI: the `sandbox` marker (tests/conftest.py), and .ci/run installs
bubblewrap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from fnserve import sandbox as sandbox_module
from fnserve.registry import Settings, load_registry
from fnserve.runtimes.channel import BOOTSTRAP
from fnserve.sandbox import ETC_ENTRIES, exit_status, sandbox_argv
from tests.helpers import fnserve_cli, wait_until, write_function, write_toml
from tests.live import LiveServer, assert_serving, running, the_worker
from tests.sandbox_functions import ATTACK_GO, ATTACK_HANDLER, ATTACK_PY

BWRAP = shutil.which("bwrap")
SECRET = "worker-secret-3f9a1c"
OTHER_SECRET = "other-function-source-8b2e"
TOML_SECRET = "toml-env-secret-51d0"
SHARED_MARK = "shared-helper-77aa"


def _bwrap_works() -> bool:
    if BWRAP is None:
        return False
    probe = subprocess.run([BWRAP, "--unshare-user", "--unshare-pid", "--unshare-net",
                            "--ro-bind", "/", "/", "--uid", "65534", "/bin/true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(not _bwrap_works(), reason="bwrap missing or cannot create namespaces"),
]

LANGUAGES = {"python": "", "go": "go"}  # name prefix of each language's functions
MODES = ("fork", "warm")  # SPEC §8: the fork server or pool process starts in the sandbox


@dataclasses.dataclass
class Setup:
    server: LiveServer
    fn_dir: Path
    home: Path
    data: Path

    def call(self, function: str, event: dict[str, Any], **kwargs: Any) -> Any:
        response = self.server.post(f"/function/{function}", json=event, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()


def _write_functions(fn_dir: Path, data: Path) -> None:
    for base in ("attack", "netattack", "slowattack", "writer"):
        write_function(fn_dir, f"{base}.py", ATTACK_PY, dedent=False)
        write_function(fn_dir, f"go{base}.go", ATTACK_GO, dedent=False)
    write_function(fn_dir, "open.py", ATTACK_PY, dedent=False)
    write_function(fn_dir, "hungry.py", ATTACK_PY, dedent=False)
    write_function(fn_dir, "gohungry.go", ATTACK_GO, dedent=False)
    write_function(fn_dir, "ok.py", "print('ok')")
    for mode in MODES:
        write_function(fn_dir, f"{mode}attack.py", ATTACK_HANDLER, dedent=False)
    write_function(fn_dir, "forkopen.py", ATTACK_HANDLER, dedent=False)
    write_function(fn_dir, "other/main.py", f"print('{OTHER_SECRET}')")
    write_function(fn_dir, "_shared.py", f"MARK = '{SHARED_MARK}'\n")
    write_toml(fn_dir, f"""
        [defaults]
        timeout = "20s"

        [functions.open]
        isolation = "none"

        [functions.other]
        env = {{ TOML_SECRET = "{TOML_SECRET}" }}

        [functions.netattack]
        network = true
        [functions.gonetattack]
        network = true

        [functions.slowattack]
        timeout = "3s"
        [functions.goslowattack]
        timeout = "3s"

        [functions.writer]
        writable = ["{data}"]
        [functions.gowriter]
        writable = ["{data}"]

        [functions.forkattack]
        mode = "fork"
        timeout = "3s"
        [functions.forkopen]
        mode = "fork"
        isolation = "none"
        [functions.warmattack]
        mode = "warm"
        pool = 1
        timeout = "3s"

        [functions.hungry]
        memory = "64MB"
        [functions.gohungry]
        memory = "64MB"
    """)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("sandbox")
    fn_dir, home, data = root / "functions", root / "home", root / "data"
    for directory in (fn_dir, home, data):
        directory.mkdir()
    (home / "notes.txt").write_text("the server's home\n")
    _write_functions(fn_dir, data)
    env = dict(os.environ, SANDBOX_TEST_SECRET=SECRET, HOME=str(home))
    server = LiveServer(fn_dir, "--isolation", "sandbox", "--concurrency", "8", env=env)
    with running(server):
        yield Setup(server, fn_dir, home, data)


def attack(lang: str, base: str = "attack") -> str:
    return LANGUAGES[lang] + base


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- what it is and what it gets -------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_unprivileged_and_exactly_the_spec_environment(setup: Setup, lang: str) -> None:
    inside = setup.call(attack(lang), {"action": "whoami"})
    outside = setup.call("open", {"action": "whoami"})
    assert (inside["uid"], inside["gid"], inside["caps"]) == (65534, 65534, "0000000000000000")
    assert outside["uid"] == os.getuid()
    # SPEC §2's environment, HOME being the private /tmp (SPEC §12)
    assert set(inside["env"]) == set(outside["env"])
    assert inside["env"]["HOME"] == "/tmp" and outside["env"]["HOME"] == str(setup.home)
    assert {k: v for k, v in inside["env"].items() if k not in ("HOME", "FN_CONTEXT",
                                                                 "FN_REQUEST_ID")} == \
        {k: v for k, v in outside["env"].items() if k not in ("HOME", "FN_CONTEXT",
                                                               "FN_REQUEST_ID", "FN_FUNCTION")
         } | {"FN_FUNCTION": attack(lang)}
    assert SECRET not in json.dumps(inside)
    assert inside["cwd"] == str(setup.fn_dir)


def test_listing_shows_isolation(setup: Setup) -> None:
    rows = {row["name"]: row for row in setup.server.get("/functions").json()["functions"]}
    assert rows["open"]["isolation"] == "none"
    assert rows["attack"]["isolation"] == "sandbox"  # --isolation sandbox, the default
    assert rows["goattack"]["isolation"] == "sandbox"
    assert all(row["status"] == "ok" for row in rows.values()), rows


# -- the attacks of issue 13 -------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_cannot_read_the_workers_environ(setup: Setup, lang: str) -> None:
    worker = the_worker(setup.server).pid
    paths = [f"/proc/{worker}/environ", f"/proc/{setup.server.proc.pid}/environ",  # type: ignore[union-attr]
             "/proc/1/environ"]
    seen = setup.call("open", {"action": "read", "paths": paths[:1]})
    assert seen[paths[0]]["ok"] and SECRET in seen[paths[0]]["value"]  # without the sandbox
    report = setup.call(attack(lang), {"action": "read", "paths": paths})
    assert not report[paths[0]]["ok"] and not report[paths[1]]["ok"], report
    assert SECRET not in json.dumps(report)  # pid 1 is its own bwrap: the function's env


@pytest.mark.parametrize("lang", LANGUAGES)
def test_sees_only_its_own_processes(setup: Setup, lang: str) -> None:
    worker = the_worker(setup.server)
    worker_cmdline = " ".join(worker.cmdline())
    outside = setup.call("open", {"action": "processes"})
    assert [worker.pid, worker_cmdline] in [[p, c.strip()] for p, c in outside]
    inside = setup.call(attack(lang), {"action": "processes"})
    # bwrap's init (pid 1) and the function: nothing of the server, nothing else
    assert 1 <= len(inside) <= 3, inside
    assert all(pid <= 3 for pid, _ in inside), inside
    assert not any(worker_cmdline in cmdline for _, cmdline in inside), inside
    assert any(attack(lang) in cmdline for _, cmdline in inside), inside


@pytest.mark.parametrize("lang", LANGUAGES)
def test_cannot_kill_the_worker(setup: Setup, lang: str) -> None:
    worker = the_worker(setup.server).pid
    master = setup.server.proc.pid  # type: ignore[union-attr]
    report = setup.call(attack(lang), {"action": "kill", "pids": [worker, master]})
    assert not report[str(worker)]["ok"] and not report[str(master)]["ok"], report
    assert the_worker(setup.server).pid == worker
    assert_serving(setup.server, "ok", b"ok\n")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_cannot_write_outside_tmp(setup: Setup, lang: str) -> None:
    own = setup.fn_dir / ("attack.py" if lang == "python" else "goattack.go")
    before_fns, before_home = _tree(setup.fn_dir), _tree(setup.home)
    paths = [str(own), str(setup.fn_dir / "new.txt"), str(setup.fn_dir / "other" / "main.py"),
             str(setup.fn_dir / "fnserve.toml"), str(setup.home / "notes.txt"),
             str(setup.home / "new.txt"), str(setup.data / "new.txt"), "/usr/new.txt",
             "/etc/new.txt", "/new.txt"]
    report = setup.call(attack(lang), {"action": "write", "paths": paths})
    assert not any(report[path]["ok"] for path in paths), report
    assert _tree(setup.fn_dir) == before_fns and _tree(setup.home) == before_home
    assert not (setup.data / "new.txt").exists()
    assert not os.path.exists("/usr/new.txt") and not os.path.exists("/new.txt")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_cannot_read_other_functions_or_fnserve_toml(setup: Setup, lang: str) -> None:
    own = "attack.py" if lang == "python" else "goattack.go"
    paths = [str(setup.fn_dir / "other" / "main.py"), str(setup.fn_dir / "fnserve.toml"),
             str(setup.fn_dir / "open.py"), str(setup.fn_dir / "_shared.py"),
             str(setup.fn_dir / own), str(setup.home / "notes.txt")]
    outside = setup.call("open", {"action": "read", "paths": paths[:2]})
    assert OTHER_SECRET in outside[paths[0]]["value"]
    assert TOML_SECRET in outside[paths[1]]["value"]
    report = setup.call(attack(lang), {"action": "read", "paths": paths})
    assert [report[path]["ok"] for path in paths] == [False, False, False, True, True, False]
    assert SHARED_MARK in report[paths[3]]["value"]  # the shared `_` entries are readable
    assert OTHER_SECRET not in json.dumps(report) and TOML_SECRET not in json.dumps(report)
    listing = setup.call(attack(lang), {"action": "listdir", "path": str(setup.fn_dir)})
    assert listing == {"ok": True, "value": ["_shared.py", own]}


def test_sees_the_system_files_it_needs_and_no_others(setup: Setup) -> None:
    wanted = ["/etc/passwd", "/etc/group", "/etc/hosts", "/etc/nsswitch.conf"]
    report = setup.call("attack", {"action": "read", "paths": [*wanted, "/etc/shadow"]})
    for path in wanted:  # the host's files, as they are (a private copy, bwrapped as /etc)
        if os.path.exists(path):
            assert report[path] == {"ok": True, "value": Path(path).read_text()}, path
    assert not report["/etc/shadow"]["ok"]
    listing = setup.call("attack", {"action": "listdir", "path": "/etc"})
    assert set(listing["value"]) <= {*ETC_ENTRIES, "ssl"}, listing
    devices = setup.call("attack", {"action": "devices"})  # a minimal /dev, not bwrap's --dev
    assert devices == {"/dev/null": {"ok": True, "value": 1},
                       "/dev/zero": {"ok": True, "value": 16},
                       "/dev/urandom": {"ok": True, "value": 16},
                       "/dev/random": {"ok": True, "value": 16},
                       "/dev/stderr": {"ok": True, "value": 1},
                       "semaphore": {"ok": True, "value": True}}, devices


def test_a_removed_copy_of_etc_is_made_again() -> None:
    # the private copy lives in the temporary directory, which a long-running server
    # may see cleaned up under it
    first = sandbox_module._etc_mounts(False)
    copy = Path(first[first.index("/etc") - 1])
    assert (copy / "passwd").read_bytes() == Path("/etc/passwd").read_bytes()
    assert sandbox_module._etc_mounts(False) == first  # unchanged: the same copy
    (copy / "passwd").unlink()
    again = sandbox_module._etc_mounts(False)
    fresh = Path(again[again.index("/etc") - 1])
    assert fresh != copy and (fresh / "passwd").read_bytes() == Path("/etc/passwd").read_bytes()


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    return server


def _connections(listener: socket.socket) -> int:
    accepted = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return accepted
        connection.close()
        accepted += 1


@pytest.mark.parametrize("lang", LANGUAGES)
def test_no_network_unless_asked(setup: Setup, lang: str) -> None:
    with _listener() as listener:
        port = listener.getsockname()[1]
        report = setup.call(attack(lang), {"action": "connect", "port": port})
        assert not report["ok"], report
        assert _connections(listener) == 0
        report = setup.call(attack(lang, "netattack"), {"action": "connect", "port": port})
        assert report == {"ok": True, "value": "connected"}
        assert _connections(listener) == 1


# process mode (Python, Go) and fork mode: a sandbox per invocation, or walls per forked
# invocation inside the fork server's sandbox (SPEC §12). Not warm: one process serves
# many invocations there.
PER_INVOCATION = ("attack", "goattack", "forkattack")


@pytest.mark.parametrize("function", PER_INVOCATION)
def test_tmp_is_private_to_each_invocation(setup: Setup, function: str) -> None:
    first, second = f"mark-{uuid.uuid4().hex}", f"mark-{uuid.uuid4().hex}"
    one = setup.call(function, {"action": "tmp", "mark": first})
    two = setup.call(function, {"action": "tmp", "mark": second})
    assert one["home"] == "/tmp" and first not in two["before"], (one, two)
    assert not Path("/tmp", first).exists() and not Path("/tmp", second).exists()
    if function == "forkattack":  # the same calls without walls: the second sees the first
        one = setup.call("forkopen", {"action": "tmp", "mark": first})
        two = setup.call("forkopen", {"action": "tmp", "mark": second})
        for mark in (first, second):
            Path("/tmp", mark).unlink()
        assert first in two["before"], two


def test_a_forked_handler_cannot_outlive_its_deadline(setup: Setup) -> None:
    # fork: the handler's own process drops its parent-death signal and leaves its
    # parent's group and session; the worker kills it by its pidfd, and so its PID
    # namespace, the child it started included
    mark = f"escape-{uuid.uuid4().hex}"
    assert setup.call("forkattack", {"action": "whoami"})  # the fork server is up
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(setup.server.post, "/function/forkattack",
                              json={"action": "escape", "mark": mark})
        assert wait_until(lambda: _marked(mark), timeout=10), "it never started"
        response = waiting.result(timeout=30)
    assert response.status_code == 504, response.text
    assert wait_until(lambda: not _marked(mark), timeout=10), _marked(mark)
    assert wait_until(lambda: len(_bootstraps(setup, "forkattack")) == 3, timeout=10), \
        _bootstraps(setup, "forkattack")  # the fork server and its spare (C and G), no more


def test_a_forked_handler_cannot_stop_what_reports_its_end(setup: Setup) -> None:
    # kill(0, SIGSTOP) reaches only the handler's own group, not the process that
    # reports how it ended: the crash that follows is reported as the crash
    response = setup.server.post("/function/forkattack", json={"action": "stop-parent"})
    assert response.status_code == 502, response.text
    assert response.json()["signal"] == signal.SIGSEGV, response.json()


def test_nothing_outside_tmp_reaches_the_next_forked_invocation(setup: Setup) -> None:
    # SysV shared memory (its own IPC namespace), /dev (read-only) and /dev/shm (a link
    # to its own /tmp) are per invocation too
    mark, key = f"left-{uuid.uuid4().hex}", 0x5A000000 + uuid.uuid4().int % 0xFFFFFF
    left = setup.call("forkattack", {"action": "leave", "mark": mark, "key": key})
    assert left == {"sysv": True, "dev": False, "shm": True}, left
    found = setup.call("forkattack", {"action": "find", "mark": mark, "key": key})
    assert found == {"sysv": False, "dev": False, "shm": False}, found
    # without the walls (and as the server's user on the host), the next one finds them
    left = setup.call("forkopen", {"action": "leave", "mark": mark, "key": key})
    try:
        found = setup.call("forkopen", {"action": "find", "mark": mark, "key": key,
                                        "remove": True})
    finally:
        for path in (Path("/dev", mark), Path("/dev/shm", mark)):
            path.unlink(missing_ok=True)
    assert found["sysv"] and found["shm"], found


def _peek_while_held(setup: Setup, function: str) -> tuple[dict[str, Any], list[str]]:
    """What an invocation of `function` can open of the others' /proc while another
    invocation of it holds a secret; and the holder's pids as that /proc numbers them."""
    mark, secret = f"hold-{uuid.uuid4().hex}", f"secret-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(setup.call, function, {"action": "hold", "secret": secret,
                                                     "seconds": 2.5, "mark": mark})
        assert wait_until(lambda: _marked(mark), timeout=10), "the holder never started"
        report = setup.call(function, {"action": "peek"})
        assert holding.result(timeout=30) == len(secret)
    sleeper = [pid for pid, row in report.items()
               if row["cmdline"]["ok"] and mark in row["cmdline"]["value"]]
    assert len(sleeper) == 1, sleeper
    return report, [sleeper[0], str(report[sleeper[0]]["ppid"]["value"])]


def test_forked_invocations_cannot_reach_each_other(setup: Setup) -> None:
    # fork mode: each invocation has a user namespace of its own, so it cannot open the
    # memory or environment of another invocation of the same function (same uid, same
    # sandbox), of what that one ran, or of the fork server, whose memory would reach every
    # invocation after it. It does see them in /proc (docs/reliability.md)
    report, holder = _peek_while_held(setup, "forkattack")
    opened = {pid: row["cmdline"].get("value", "")[:80] for pid, row in report.items()
              if row["mem"]["ok"] or row["environ"]["ok"]}  # bwrap's init included
    assert not opened, opened
    assert all(pid in report for pid in holder)
    # without the walls, the same peek opens the holder's memory
    report, holder = _peek_while_held(setup, "forkopen")
    assert report[holder[1]]["mem"]["ok"], report[holder[1]]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_writable_paths_are_written_through(setup: Setup, lang: str) -> None:
    target = setup.data / f"{lang}-out.txt"
    report = setup.call(attack(lang, "writer"), {"action": "write", "paths": [str(target)]})
    assert report[str(target)]["ok"], report
    assert target.read_text() == "written by the function\n"


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if mark in " ".join(process.info["cmdline"] or ()):
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


def _bootstraps(setup: Setup, function: str) -> list[psutil.Process]:
    """The fork server or pool processes of `function`, and all they forked."""
    entry = str(setup.fn_dir / f"{function}.py")
    found = []
    for process in setup.server.function_processes():
        try:
            cmdline = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline[1:2] == [str(BOOTSTRAP)] and entry in cmdline:
            found.append(process)
    return found


def _per_call(setup: Setup) -> list[psutil.Process]:
    """The server's function processes but the fork servers and pool processes (and,
    since they run the bootstrap too, what a fork server forked)."""
    found = []
    for process in setup.server.function_processes():
        try:
            if str(BOOTSTRAP) not in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("function", ["slowattack", "goslowattack", *(f"{m}attack" for m in MODES)])
def test_deadline_kills_a_setsid_grandchild(setup: Setup, function: str) -> None:
    # process mode: the deadline kills bwrap, whose namespace dies with it; fork: the
    # forked invocation's own PID namespace dies with its PID 1; warm: the pool process's
    # sandbox dies with it
    mark = f"grandchild-{uuid.uuid4().hex}"
    # built, or its fork server or pool process started, before the clock runs
    assert setup.call(function, {"action": "whoami"})["uid"] == 65534
    before = _bootstraps(setup, function)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(setup.server.post, f"/function/{function}",
                              json={"action": "grandchild", "mark": mark})
        assert wait_until(lambda: _marked(mark), timeout=10), "the grandchild never started"
        response = waiting.result(timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "timeout"
    assert wait_until(lambda: not _marked(mark), timeout=10), _marked(mark)
    if function.startswith("fork"):  # the fork server lives on; the child that took the call
        assert len(before) == 3, before  # does not: the fork server, its spare's C and G
        assert wait_until(lambda: len(_alive(before)) == 1, timeout=10), _alive(before)
    else:
        assert wait_until(lambda: not _alive(before), timeout=10), _alive(before)
    assert wait_until(lambda: not _per_call(setup), timeout=10), _per_call(setup)
    assert setup.call(function, {"action": "whoami"})["uid"] == 65534  # and it serves on


# -- limits and failures behave as without the sandbox -------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_memory_limit_applies_inside(setup: Setup, lang: str) -> None:
    function = attack(lang, "hungry")
    response = setup.server.post(f"/function/{function}",
                                 json={"action": "allocate", "bytes": 1024**3})
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "function_failed"
    # Python's MemoryError (1), Go's "fatal error: runtime: out of memory" (2): as
    # without a sandbox
    assert response.json()["exit_code"] == (1 if lang == "python" else 2)
    small = setup.call(function, {"action": "allocate", "bytes": 1024**2})
    assert small == 1024**2


def test_output_cap_applies_inside(setup: Setup) -> None:
    response = setup.server.post("/function/attack", json={"action": "flood"})
    assert response.status_code == 502 and response.json()["code"] == "output_too_large"
    assert wait_until(lambda: not _per_call(setup), timeout=10), _per_call(setup)


@pytest.mark.parametrize("function", ["attack", "forkattack"])
def test_a_signal_is_reported_as_a_signal(setup: Setup, function: str) -> None:
    # fork: the handler's process is PID 1 of its own namespace, and its parent ends
    # with the same signal
    response = setup.server.post(f"/function/{function}", json={"action": "segfault"})
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["signal"] == signal.SIGSEGV and "exit_code" not in body


def test_client_disconnect_kills_the_sandbox(setup: Setup) -> None:
    mark = f"cancelled-{uuid.uuid4().hex}"
    import requests

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.post, setup.server.url("/function/attack"),
                              json={"action": "grandchild", "mark": mark}, timeout=5)
        assert wait_until(lambda: _marked(mark), timeout=10)
        with pytest.raises(requests.Timeout):
            waiting.result(timeout=30)  # the client gives up and closes its connection
    assert wait_until(lambda: not _marked(mark), timeout=10), _marked(mark)


# -- startup, CLI and the argv --------------------------------------------------------------


def _env_without_bwrap(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"  # a PATH with the usual tools but no bwrap
    bin_dir.mkdir()
    for tool in ("go", "prlimit", "env", "sh"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return dict(os.environ, PATH=str(bin_dir))


def test_missing_bwrap_is_a_startup_error_naming_the_function(fn_dir: Path,
                                                             tmp_path: Path) -> None:
    write_function(fn_dir, "plain.py", "print(1)")
    write_function(fn_dir, "boxed.py", "print(2)")
    write_toml(fn_dir, '[functions.boxed]\nisolation = "sandbox"\n')
    env = _env_without_bwrap(tmp_path)
    served = fnserve_cli("serve", str(fn_dir), "--port", "0", env=env, timeout=60)
    assert served.returncode == 2, served.stderr
    message = served.stderr.decode().strip()
    assert len(message.splitlines()) == 1 and "boxed" in message and "bwrap" in message
    ran = fnserve_cli("run", "boxed", "--dir", str(fn_dir), env=env)
    assert ran.returncode == 2 and b"boxed" in ran.stderr and b"Traceback" not in ran.stderr
    listed = fnserve_cli("list", str(fn_dir), env=env)
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.decode().splitlines()}
    assert "sandbox" in rows["boxed"] and "error:" in rows["boxed"] and "bwrap" in rows["boxed"]
    assert rows["plain"].split()[-2:] == ["none", "ok"]


def test_run_and_list_in_a_sandbox(fn_dir: Path) -> None:
    write_function(fn_dir, "who.py", "import os; print(os.getuid(), os.environ['HOME'])")
    write_toml(fn_dir, '[defaults]\nisolation = "sandbox"\n')
    ran = fnserve_cli("run", "who", "--dir", str(fn_dir), env=os.environ)
    assert (ran.returncode, ran.stdout) == (0, b"65534 /tmp\n"), ran.stderr
    listed = fnserve_cli("list", str(fn_dir), env=os.environ)
    assert listed.stdout.decode().splitlines()[1].split()[-2:] == ["sandbox", "ok"]


@pytest.mark.parametrize("toml, message", [
    ('[defaults]\nisolation = "box"', "defaults.isolation: must be one of none, sandbox"),
    ('[functions.f]\nnetwork = "yes"', "functions.f.network: must be true or false"),
    ('[functions.f]\nwritable = ["data"]', "functions.f.writable: 'data' is not an absolute"),
    ('[functions.f]\nwritable = "/tmp"', "functions.f.writable: must be a list"),
    ('[server]\nisolation = "jail"', "[server] isolation: must be one of none, sandbox"),
])
def test_bad_sandbox_settings_are_startup_errors(fn_dir: Path, toml: str, message: str) -> None:
    write_function(fn_dir, "f.py", "print(1)")
    write_toml(fn_dir, toml)
    served = fnserve_cli("serve", str(fn_dir), "--port", "0", env=os.environ)
    assert served.returncode == 2 and message in served.stderr.decode(), served.stderr


def test_writable_path_must_exist_and_not_hold_the_functions(fn_dir: Path) -> None:
    write_function(fn_dir, "f.py", "print(1)")
    for path, message in ((fn_dir / "missing", "does not exist"),
                          (fn_dir.parent, "contains the functions directory")):
        write_toml(fn_dir, f'[functions.f]\nisolation = "sandbox"\nwritable = ["{path}"]\n')
        served = fnserve_cli("serve", str(fn_dir), "--port", "0", env=os.environ)
        assert served.returncode == 2, served.stderr
        assert f"function f: writable path {path} {message}" in served.stderr.decode()


def test_isolation_flag_sets_the_default_and_toml_wins(fn_dir: Path) -> None:
    write_function(fn_dir, "a.py", "print(1)")
    write_function(fn_dir, "b.py", "print(1)")
    write_toml(fn_dir, '[functions.b]\nisolation = "none"\n')
    registry = load_registry(fn_dir, isolation="sandbox")
    assert (registry.get("a").settings.isolation, registry.get("b").settings.isolation) == \
        ("sandbox", "none")
    assert load_registry(fn_dir).get("a").settings.isolation == "none"


def test_the_argv_mounts_only_what_the_function_may_see(fn_dir: Path) -> None:
    write_function(fn_dir, "me.py", "print(1)")
    write_function(fn_dir, "other.py", "print(2)")
    write_function(fn_dir, "_lib/helper.py", "X = 1")
    write_function(fn_dir, "__pycache__/other.cpython-311.pyc", "compiled")
    write_toml(fn_dir, "")
    spec = load_registry(fn_dir).get("me")
    spec = dataclasses.replace(spec, settings=Settings(isolation="sandbox",
                                                       writable=("/srv/data",)))
    argv = sandbox_argv("/usr/bin/bwrap", spec, (sys.executable, str(spec.entry)), spec.cwd)
    text = " ".join(argv)
    assert argv[argv.index("--") + 1:] == ["/usr/bin/env", "-u", "PWD", sys.executable,
                                           str(spec.entry)]
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--cap-drop ALL" in text and "--uid 65534 --gid 65534" in text
    assert f"--ro-bind {fn_dir / 'me.py'} {fn_dir / 'me.py'}" in text
    assert f"--ro-bind {fn_dir / '_lib'} {fn_dir / '_lib'}" in text
    assert "other.py" not in text and "fnserve.toml" not in text and "__pycache__" not in text
    assert "--bind /srv/data /srv/data" in text and "--setenv HOME /tmp" in text
    networked = dataclasses.replace(spec, settings=Settings(isolation="sandbox", network=True))
    assert "--unshare-net" not in sandbox_argv("bwrap", networked, ("x",), spec.cwd)


def test_exit_status_of_a_signalled_command() -> None:
    assert [exit_status(code) for code in (0, 1, 128, 137, 139, 192, 193, -9)] == \
        [0, 1, 128, -9, -11, -64, 193, -9]


def test_shutdown_kills_running_sandboxes(fn_dir: Path) -> None:
    write_function(fn_dir, "attack.py", ATTACK_PY, dedent=False)
    mark = f"shutdown-{uuid.uuid4().hex}"
    server = LiveServer(fn_dir, "--isolation", "sandbox", "--graceful-timeout", "1s")
    with running(server), ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.post, "/function/attack",
                              json={"action": "grandchild", "mark": mark})
        assert wait_until(lambda: _marked(mark), timeout=10)
        assert server.stop() == 0  # also checks that no process it started is left
        response = waiting.result(timeout=30)
        assert response.status_code == 503 and response.json()["code"] == "unavailable"
    assert not _marked(mark)


def test_an_executable_and_a_go_package_run_sandboxed(fn_dir: Path) -> None:
    write_function(fn_dir, "who.sh", """
        #!/bin/sh
        echo "$(id -u) $HOME $(ls /proc | grep -c '^[0-9]')"
    """, executable=True)
    write_function(fn_dir, "gowho/main.go", """
        package main

        import (
            "fmt"
            "os"
        )

        func main() { fmt.Println(os.Getuid(), os.Getenv("HOME")) }
    """)
    write_toml(fn_dir, '[defaults]\nisolation = "sandbox"\n')
    ran = fnserve_cli("run", "who", "--dir", str(fn_dir), env=os.environ)
    uid, home, processes = ran.stdout.decode().split()
    assert (ran.returncode, uid, home) == (0, "65534", "/tmp"), ran.stderr
    assert int(processes) <= 5  # bwrap's init, sh, its $(...) subshell, ls and grep
    ran = fnserve_cli("run", "gowho", "--dir", str(fn_dir), env=os.environ)
    assert (ran.returncode, ran.stdout) == (0, b"65534 /tmp\n"), ran.stderr


def test_an_interpreter_in_a_venv_under_tmp(fn_dir: Path, tmp_path: Path) -> None:
    # SPEC §12: the interpreter and its libraries are readable wherever they live;
    # here a venv under /tmp (pytest's tmp_path), itself a view onto the base install
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    write_function(fn_dir, "where.py", "import json, os, sys\n"
                   "print(json.dumps([sys.prefix, os.getuid(), __import__('decimal').__name__]))")
    write_toml(fn_dir, f'[functions.where]\nisolation = "sandbox"\npython = "{venv}/bin/python"\n')
    ran = fnserve_cli("run", "where", "--dir", str(fn_dir), env=os.environ)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == [str(venv), 65534, "decimal"]


def test_executor_without_bwrap_refuses_a_sandboxed_function(fn_dir: Path,
                                                            runtimes: dict[str, Any]) -> None:
    # the startup check makes this rare (a dev reload that turns the sandbox on)
    from fnserve.executor import Executor
    from tests.helpers import invocation

    write_function(fn_dir, "boxed.py", "print('ran')")
    write_toml(fn_dir, '[defaults]\nisolation = "sandbox"\n')
    spec = load_registry(fn_dir).get("boxed")
    pool = Executor(1, runtimes, bwrap=None)
    try:
        result = pool.run(invocation(spec))
    finally:
        pool.shutdown()
    assert (result.outcome, result.exit_code, result.stdout) == ("failed", 127, b"")
    assert "bwrap" in result.error


def test_readable_paths_of_a_process_started_elsewhere(fn_dir: Path, tmp_path: Path) -> None:
    # how fork/warm modes start their bootstrap: its script is named in `readable`
    write_function(fn_dir, "me.py", "print(1)")
    bootstrap = write_function(tmp_path, "lib/_bootstrap.py", "print('booted')")
    inside = write_function(fn_dir, "me.data", "x")  # not a function, not shared: hidden
    spec = load_registry(fn_dir).get("me")
    spec = dataclasses.replace(spec, settings=Settings(isolation="sandbox"))
    argv = sandbox_argv("/usr/bin/bwrap", spec, (sys.executable, str(bootstrap)), spec.cwd,
                        readable=[bootstrap, inside])
    mounts = [argv[i:i + 3] for i, arg in enumerate(argv) if arg in ("--ro-bind", "--tmpfs")]
    view = mounts.index(["--tmpfs", str(fn_dir), "--ro-bind"])
    assert ["--ro-bind", str(bootstrap), str(bootstrap)] in mounts[:view]
    assert ["--ro-bind", str(inside), str(inside)] in mounts[view:]  # on top of the view
    ran = subprocess.run(argv, cwd=spec.cwd, capture_output=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert (ran.returncode, ran.stdout) == (0, b"booted\n"), ran.stderr


def test_a_bwrap_that_cannot_sandbox_is_a_startup_error(fn_dir: Path, tmp_path: Path) -> None:
    # a kernel or policy without user namespaces cannot be made here: a stand-in bwrap
    # answers the way the real one does there
    env = _env_without_bwrap(tmp_path)
    fake = tmp_path / "bin" / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    write_function(fn_dir, "boxed.py", "print(2)")
    write_toml(fn_dir, '[functions.boxed]\nisolation = "sandbox"\n')
    served = fnserve_cli("serve", str(fn_dir), "--port", "0", env=env, timeout=60)
    assert served.returncode == 2, served.stderr
    assert served.stderr.decode().strip() == (
        "Error: function boxed: bwrap cannot make a sandbox on this machine: "
        "bwrap: setting up uid map: Permission denied")


# -- fork and warm modes: the fork server or pool process starts inside -------------------


def test_fork_mode_without_nested_user_namespaces_fails_to_start(fn_dir: Path,
                                                                 tmp_path: Path) -> None:
    # fork mode walls each invocation off with namespaces of its own, made inside the
    # sandbox; a bwrap that forbids them (as `--disable-userns` does) fails the start of
    # the fork server, with the reason, never runs invocations without those walls
    assert BWRAP is not None
    fake = write_function(tmp_path, "bin/bwrap",
                          f'#!/bin/sh\nexec {BWRAP} --disable-userns "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    write_function(fn_dir, "forky.py", "def handler(event, context):\n    return 'walled'\n")
    write_toml(fn_dir, '[functions.forky]\nmode = "fork"\nisolation = "sandbox"\n')
    ran = fnserve_cli("run", "forky", "--dir", str(fn_dir), env=env)
    assert ran.returncode != 0 and ran.stdout == b"", ran
    assert "needs nested user namespaces" in ran.stderr.decode(), ran.stderr
    assert "Traceback" not in ran.stderr.decode()
    ran = fnserve_cli("run", "forky", "--dir", str(fn_dir), env=os.environ)  # the real bwrap
    assert (ran.returncode, ran.stdout) == (0, b'"walled"'), ran.stderr



@pytest.mark.parametrize("mode", MODES)
def test_fork_and_warm_run_inside_the_sandbox(setup: Setup, mode: str) -> None:
    function = f"{mode}attack"
    inside = setup.call(function, {"action": "whoami"})
    # fork: no capability kept from the invocation's own user namespace either
    assert (inside["uid"], inside["home"], inside["caps"]) == (65534, "/tmp", "0" * 16)
    # bwrap's init, the fork server or pool process, and (fork) the forked child
    assert inside["pids"] and max(inside["pids"]) < 100, inside
    worker = the_worker(setup.server).pid
    path = f"/proc/{worker}/environ"
    report = setup.call(function, {"action": "read", "paths": [path]})
    assert not report[path]["ok"] and SECRET not in json.dumps(report)
    rows = {row["name"]: row for row in setup.server.get("/functions").json()["functions"]}
    assert (rows[function]["mode"], rows[function]["isolation"]) == (mode, "sandbox")


@pytest.mark.parametrize("isolation", ["none", "sandbox"])
def test_peak_memory_of_a_forked_call_killed_at_its_deadline(
        fn_dir: Path, runtimes: dict[str, Any], isolation: str) -> None:
    # the handler's process is reaped by its parent (walled) before that parent's status
    # is read, so its peak RSS counts, as without the walls (Lambda's Max Memory Used)
    from fnserve.executor import Executor
    from tests.helpers import invocation

    write_function(fn_dir, "big.py", """
        import time

        def handler(event, context):
            block = bytearray(120 * 1024 * 1024)  # zeroed: every page touched
            time.sleep(30)
            return len(block)
    """)
    write_toml(fn_dir, f'[functions.big]\nmode = "fork"\nisolation = "{isolation}"\n')
    spec = load_registry(fn_dir).get("big")
    assert BWRAP is not None
    pool = Executor(1, runtimes, bwrap=BWRAP)
    try:
        result = pool.run(invocation(spec, timeout=3.0))
    finally:
        pool.shutdown()
    assert result.outcome == "timeout", result
    assert result.max_rss_kb is not None and result.max_rss_kb >= 120 * 1024, result.max_rss_kb
