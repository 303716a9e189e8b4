"""`fnserve dev`: a real server on a real directory, edited on disk while it runs.

Every test starts `python -m fnserve dev DIR` (tests/live.py) and edits files the
way an editor would; the watchdog observer, the debounce, the SIGHUP and the new
gunicorn worker are all real. Waiting is polling with a deadline: the reload
takes one quiet window plus a worker boot, longer on a busy machine.

Requests go out on fresh connections (`Connection: close`): a reload retires the
worker that holds a keep-alive connection, and that is the client's business,
not the subject of these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fnserve.registry import load_registry
from fnserve.reloader import is_ignored
from fnserve.runtimes import BuildError, Runtime

from .helpers import process_gone, read_pid, wait_until, write_function, write_toml
from .live import LiveServer

RELOAD_LINE = re.compile(r"^\[reload\] (.+) modified, reloading server\.\.\.$", re.MULTILINE)
# the invocation line of the text formatter: `12:00:01 GET hello 200 12.3ms`
REQUEST_LINE = re.compile(r"^\d\d:\d\d:\d\d (GET|POST) (\S+) (\d{3}) (\d+\.\d)ms", re.MULTILINE)
RELOAD_TIMEOUT = 15.0  # generous: a loaded CI machine, a worker boot, sometimes a Go build
GO_TIMEOUT = 120.0  # a cold Go build cache compiles the runtime first
QUIET_CHECK = 1.5  # how long "no further reload" is watched for

HELLO = """
    print("hello v1")
"""

SLOW = """
    import json, os, sys, time
    context = json.loads(os.environ["FN_CONTEXT"])
    pidfile = context["parameters"].get("pidfile")
    if pidfile:
        with open(pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\\n")
    time.sleep(float(context["parameters"].get("seconds", "2")))
    print("slept")
"""


@contextlib.contextmanager
def dev_server(directory: Path, *args: str, **kwargs: Any) -> Iterator[LiveServer]:
    """A started `fnserve dev`, stopped with SIGTERM (exit 0, nothing left) on the way out."""
    with LiveServer(directory, *args, mode="dev", **kwargs) as server:
        # the kept-alive /healthz connection of the start would hold a stopping worker ~2 s
        server.session.close()
        yield server


def started_dev_server(directory: Path, *args: str, **kwargs: Any) -> LiveServer:
    server = LiveServer(directory, *args, mode="dev", **kwargs).start()
    server.session.close()
    return server


def call(server: LiveServer, name: str, method: str = "GET", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 60)
    headers = {"Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, server.url(f"/function/{name}"), headers=headers, **kwargs)


def listed(server: LiveServer) -> dict[str, dict[str, Any]]:
    response = requests.get(server.url("/functions"), headers={"Connection": "close"},
                            timeout=30)
    assert response.status_code == 200, response.text
    return {row["name"]: row for row in response.json()["functions"]}


def reloads(server: LiveServer) -> list[str]:
    """The paths of the `[reload] <path> modified, reloading server...` lines so far."""
    return RELOAD_LINE.findall(server.stdout())


def wait_for_reloads(server: LiveServer, count: int, timeout: float = RELOAD_TIMEOUT) -> list[str]:
    seen = wait_until(lambda: len(reloads(server)) >= count and reloads(server), timeout)
    assert seen, f"expected {count} reload(s) within {timeout}s:\n{server.stdout()}"
    return list(seen)


def assert_reloads_stay(server: LiveServer, count: int, duration: float = QUIET_CHECK) -> None:
    """Watch for `duration`: no reload beyond `count` (a reload loop would show here)."""
    deadline = time.monotonic() + duration
    while True:
        seen = reloads(server)
        assert len(seen) == count, f"expected {count} reload(s), saw {seen}:\n{server.stdout()}"
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def wait_for_response(server: LiveServer, name: str, check: Callable[[requests.Response], bool],
                      timeout: float = RELOAD_TIMEOUT, **kwargs: Any) -> requests.Response:
    """Call `name` until check(response) holds; the last response either way."""
    last: list[requests.Response] = []

    def attempt() -> bool:
        last[:] = [call(server, name, **kwargs)]
        return check(last[0])

    ok = wait_until(attempt, timeout, interval=0.02)
    response = last[0]
    assert ok, (f"/function/{name} did not change within {timeout}s: last answer "
                f"{response.status_code} {response.text!r}\n{server.stdout()}")
    return response


def wait_for_output(server: LiveServer, name: str, text: str,
                    timeout: float = RELOAD_TIMEOUT) -> requests.Response:
    return wait_for_response(
        server, name, lambda r: r.status_code == 200 and r.text.strip() == text, timeout)


def same_path(reported: str, path: Path) -> bool:
    return Path(reported).resolve() == path.resolve()


def workers_booted(server: LiveServer) -> int:
    return server.stdout().count("Booting worker with pid")


# -- Python functions, the function table, fnserve.toml ------------------------------


def test_edited_python_function_answers_with_the_new_output(fn_dir: Path) -> None:
    hello = write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        assert call(server, "hello").text.strip() == "hello v1"
        write_function(fn_dir, "hello.py", 'print("hello v2")\n')
        wait_for_output(server, "hello", "hello v2")
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, hello)
        assert_reloads_stay(server, 1)
        assert call(server, "hello").text.strip() == "hello v2"


def test_added_function_is_listed_and_answers_and_a_deleted_one_is_gone(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        assert set(listed(server)) == {"hello"}
        assert call(server, "added").status_code == 404

        write_function(fn_dir, "added.py", 'print("I am new")\n')
        write_function(fn_dir, "pkg/main.py", 'print("a package")\n')
        assert wait_until(lambda: set(listed(server)) == {"hello", "added", "pkg"},
                          RELOAD_TIMEOUT), listed(server)
        assert call(server, "added").text.strip() == "I am new"
        assert call(server, "pkg").text.strip() == "a package"

        (fn_dir / "added.py").unlink()
        wait_for_response(server, "added", lambda r: r.status_code == 404)
        body = call(server, "added").json()
        assert body["code"] == "not_found"
        assert set(listed(server)) == {"hello", "pkg"}
        assert call(server, "hello").status_code == 200


def test_a_timeout_set_in_fnserve_toml_is_enforced_after_the_save(fn_dir: Path) -> None:
    write_function(fn_dir, "slow.py", SLOW)
    with dev_server(fn_dir) as server:
        response = call(server, "slow", params={"seconds": "1.5"})
        assert response.status_code == 200, response.text

        write_toml(fn_dir, """
            [functions.slow]
            timeout = "1s"
        """)
        assert wait_until(lambda: listed(server)["slow"]["timeout"] == "1s", RELOAD_TIMEOUT)
        started = time.monotonic()
        response = call(server, "slow", params={"seconds": "5"})
        assert response.status_code == 504, response.text
        assert response.json()["code"] == "timeout"
        assert "1s" in response.json()["error"]
        assert time.monotonic() - started < 4


@pytest.mark.parametrize("broken, complaint", [
    ("[functions.hello\n", "not valid TOML"),
    ('[functions.hello]\ntimeout = "soon"\n', "functions.hello.timeout"),
    ("[functoins.hello]\n", "functoins"),
], ids=["syntax", "bad-value", "unknown-table"])
def test_a_broken_fnserve_toml_keeps_the_server_serving(fn_dir: Path, broken: str,
                                                        complaint: str) -> None:
    write_function(fn_dir, "hello.py", """
        import os
        print(os.environ.get("GREETING", "unset"))
    """)
    toml = write_toml(fn_dir, '[functions.hello]\nenv = { GREETING = "one" }\n')
    with dev_server(fn_dir) as server:
        assert call(server, "hello").text.strip() == "one"
        workers = {p.pid for p in server.workers()}

        toml.write_text(broken)
        assert wait_until(lambda: "[reload] error:" in server.stdout(), RELOAD_TIMEOUT), \
            server.stdout()
        [error] = [line for line in server.stdout().splitlines()
                   if line.startswith("[reload] error:")]
        assert str(toml.resolve()) in error and complaint in error, error
        assert "Traceback" not in server.stdout() + server.stderr()
        # no reload: no line, no HUP, the same worker, the same answers
        assert reloads(server) == []
        for _ in range(5):
            response = call(server, "hello")
            assert (response.status_code, response.text.strip()) == (200, "one")
        assert {p.pid for p in server.workers()} == workers
        assert "Handling signal: hup" not in server.stdout()

        toml.write_text('[functions.hello]\nenv = { GREETING = "two" }\n')
        wait_for_output(server, "hello", "two")
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, toml)
        assert_reloads_stay(server, 1)


def test_a_broken_toml_at_reload_leaves_new_workers_the_last_good_registry(
        fn_dir: Path) -> None:
    # a worker that boots while the file is broken (here: a HUP from outside) must
    # not fail to load the app, or gunicorn's master would exit
    write_function(fn_dir, "hello.py", HELLO)
    toml = write_toml(fn_dir, '[functions.hello]\ntimeout = "2s"\n')
    with dev_server(fn_dir) as server:
        toml.write_text("[functions.hello\n")
        assert wait_until(lambda: "[reload] error:" in server.stdout(), RELOAD_TIMEOUT)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: workers_booted(server) == 2, RELOAD_TIMEOUT), server.stdout()
        assert wait_until(lambda: len(server.workers()) == 1, RELOAD_TIMEOUT)
        assert server.proc.poll() is None
        assert call(server, "hello").text.strip() == "hello v1"
        assert listed(server)["hello"]["timeout"] == "2s"


# -- bursts, loops, ignored files -----------------------------------------------------


def _rewrite_one_file_ten_times(fn_dir: Path) -> Path:
    path = fn_dir / "hello.py"
    for version in range(2, 12):
        path.write_text(f'print("hello v{version}")\n')
    return path


def _create_ten_files(fn_dir: Path) -> Path:
    for number in range(10):
        (fn_dir / f"new{number}.py").write_text(f'print("new {number}")\n')
    return fn_dir / "new0.py"


@pytest.mark.parametrize("burst", [_rewrite_one_file_ten_times, _create_ten_files],
                         ids=["rewrite-one-file-10x", "create-10-files"])
def test_a_burst_of_ten_writes_reloads_once(fn_dir: Path,
                                            burst: Callable[[Path], Path]) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        first = burst(fn_dir)
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, first)
        assert_reloads_stay(server, 1)
        assert server.stdout().count("Handling signal: hup") == 1
        if first.name == "new0.py":
            assert {f"new{n}" for n in range(10)} <= set(listed(server))
            assert call(server, "new9").text.strip() == "new 9"
        else:
            assert call(server, "hello").text.strip() == "hello v11"


def test_one_edit_causes_one_reload_and_no_loop(fn_dir: Path) -> None:
    # what the master and the new worker read on a reload (fnserve.toml, a package's
    # files) must not look like a change, or the server would reload forever
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "pkg/main.py", """
        import helper
        print(helper.WORD)
    """)
    write_function(fn_dir, "pkg/helper.py", 'WORD = "imported"\n')
    write_toml(fn_dir, '[defaults]\ntimeout = "5s"\n')
    with dev_server(fn_dir) as server:
        assert call(server, "pkg").text.strip() == "imported"
        assert (fn_dir / "pkg" / "__pycache__").is_dir()  # the import wrote it
        write_function(fn_dir, "pkg/helper.py", 'WORD = "edited"\n')
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, fn_dir / "pkg" / "helper.py")
        wait_for_output(server, "pkg", "edited")  # its __pycache__ is rewritten meanwhile
        assert_reloads_stay(server, 1)
        assert server.stdout().count("Handling signal: hup") == 1


def test_an_atomic_save_by_rename_reloads_once(fn_dir: Path) -> None:
    # what many editors do: write a hidden temporary file, then rename it over the original
    hello = write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        temporary = write_function(fn_dir, ".hello.py.tmp1234", 'print("hello v2")\n')
        os.replace(temporary, hello)
        wait_for_output(server, "hello", "hello v2")
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, hello)
        assert_reloads_stay(server, 1)


def _write(relpath: str) -> Callable[[Path], None]:
    def write(fn_dir: Path) -> None:
        write_function(fn_dir, relpath, "junk\n", dedent=False)
    return write


def _vim_probe(fn_dir: Path) -> None:
    probe = fn_dir / "4913"
    probe.write_text("")
    probe.unlink()


def _cat_toml(fn_dir: Path) -> None:
    subprocess.run(["cat", str(fn_dir / "fnserve.toml")], check=True, stdout=subprocess.DEVNULL)


def _read_everything(fn_dir: Path) -> None:
    for path in sorted(fn_dir.rglob("*")):
        if path.is_file():
            path.read_bytes()


IGNORED_CHANGES = {
    "pycache": _write("__pycache__/x.cpython-311.pyc"),
    "git": _write(".git/objects/ab/cdef"),
    "git-index": _write(".git/index"),
    "swap": _write(".hello.py.swp"),
    "swp-suffix": _write("foo.py.swp"),
    "backup": _write("foo~"),
    "emacs-lock": _write(".#foo.py"),
    "vim-probe": _vim_probe,
    "nested-pycache": _write("pkg/__pycache__/main.cpython-311.pyc"),
    "cat-toml": _cat_toml,
    "read-every-file": _read_everything,
}


def test_editor_and_tool_droppings_cause_no_reload(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "pkg/main.py", 'print("pkg")\n')
    write_toml(fn_dir, '[functions.hello]\ntimeout = "5s"\n')
    with dev_server(fn_dir) as server:
        for number, (kind, change) in enumerate(IGNORED_CHANGES.items(), start=1):
            change(fn_dir)
            # the sentinel: its events come after the dropping's, in order. Had the
            # dropping counted, it would be a reload of its own or the path named here.
            sentinel = write_function(fn_dir, "hello.py", f'print("hello v{number}")\n')
            seen = wait_for_reloads(server, number)
            assert len(seen) == number and same_path(seen[-1], sentinel), \
                f"{kind}: reloaded for {seen[number - 1:]}"
        assert_reloads_stay(server, len(IGNORED_CHANGES))


@pytest.mark.parametrize("relpath, ignored", [
    ("__pycache__", True),
    ("__pycache__/x.pyc", True),
    ("pkg/__pycache__", True),
    (".git", True),
    (".git/refs/heads/main", True),
    ("hello.py.swp", True),
    (".hello.py.swx", True),
    ("hello.py~", True),
    (".#hello.py", True),
    ("4913", True),
    ("node_modules/x/index.js", True),
    ("hello.py", False),
    ("fnserve.toml", False),
    ("pkg/main.go", False),
    ("pkg/go.mod", False),
    ("run.sh", False),
    ("wordcount", False),
])
def test_is_ignored(tmp_path: Path, relpath: str, ignored: bool) -> None:
    assert is_ignored(str(tmp_path / relpath), str(tmp_path)) is ignored


# -- Go functions ---------------------------------------------------------------------


def go_source(text: str, expression: str = "") -> str:
    return f"""
        package main

        import "fmt"

        func main() {{ fmt.Println({expression or repr(text).replace("'", '"')}) }}
    """


@pytest.mark.go
def test_edited_go_function_is_rebuilt(fn_dir: Path) -> None:
    source = write_function(fn_dir, "gohello.go", go_source("go v1"))
    with dev_server(fn_dir) as server:
        wait_for_output(server, "gohello", "go v1", GO_TIMEOUT)
        write_function(fn_dir, "gohello.go", go_source("go v2"))
        wait_for_output(server, "gohello", "go v2", GO_TIMEOUT)
        [path] = wait_for_reloads(server, 1)
        assert same_path(path, source)
        assert_reloads_stay(server, 1)  # the master's build of it is no change either


@pytest.mark.go
def test_edited_file_of_a_go_package_is_rebuilt(fn_dir: Path) -> None:
    write_function(fn_dir, "gopkg/go.mod", "module example.com/gopkg\n\ngo 1.21\n")
    write_function(fn_dir, "gopkg/main.go", go_source("", "word()"))
    write_function(fn_dir, "gopkg/word.go", """
        package main

        func word() string { return "package v1" }
    """)
    with dev_server(fn_dir) as server:
        wait_for_output(server, "gopkg", "package v1", GO_TIMEOUT)
        write_function(fn_dir, "gopkg/word.go", """
            package main

            func word() string { return "package v2" }
        """)
        wait_for_output(server, "gopkg", "package v2", GO_TIMEOUT)
        wait_for_reloads(server, 1)
        assert_reloads_stay(server, 1)


@pytest.mark.go
def test_go_compile_error_is_a_502_until_the_source_is_fixed(fn_dir: Path) -> None:
    write_function(fn_dir, "gohello.go", go_source("go v1"))
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        assert server.proc is not None
        master = server.proc.pid
        wait_for_output(server, "gohello", "go v1", GO_TIMEOUT)

        write_function(fn_dir, "gohello.go", go_source("", "undefinedThing"))
        response = wait_for_response(server, "gohello", lambda r: r.status_code == 502,
                                     GO_TIMEOUT)
        body = response.json()
        assert body["code"] == "build_failed", body
        assert "undefined: undefinedThing" in body["error"], body
        assert "gohello.go" in body["error"], body
        # and in the terminal, without anyone having to ask
        assert wait_until(lambda: "undefined: undefinedThing" in server.stdout(),
                          GO_TIMEOUT), server.stdout()
        assert call(server, "hello").status_code == 200  # the others keep working
        assert listed(server)["gohello"]["status"] == "error"

        write_function(fn_dir, "gohello.go", go_source("go fixed"))
        wait_for_output(server, "gohello", "go fixed", GO_TIMEOUT)
        assert server.proc.poll() is None and server.proc.pid == master  # no restart
        assert wait_until(lambda: listed(server)["gohello"]["status"] == "ok", RELOAD_TIMEOUT)


def slow_link_wrapper(directory: Path, seconds: float) -> Path:
    """A -toolexec wrapper: the link step starts, says so in directory/linking, then waits."""
    return write_function(directory, "slowlink.sh", f"""
        #!/bin/sh
        case "$1" in
            */link) [ "$2" = "-V=full" ] || {{ touch {directory}/linking; sleep {seconds}; }};;
        esac
        exec "$@"
    """, executable=True)


@pytest.mark.go
def test_a_request_during_the_first_go_build_waits_for_it(fn_dir: Path, tmp_path: Path) -> None:
    # the master used to build while it forked the first worker: the worker inherited the
    # build's flock for life, and a request that had to build hung until the worker died
    wrapper = slow_link_wrapper(tmp_path, 2)
    write_function(fn_dir, "gofn.go", go_source("built while you waited"))
    env = dict(os.environ, GOFLAGS=f"-toolexec={wrapper}")
    with dev_server(fn_dir, env=env) as server:
        assert wait_until(lambda: (tmp_path / "linking").exists(), GO_TIMEOUT)
        response = call(server, "gofn", timeout=GO_TIMEOUT)
        assert response.status_code == 200, response.text
        assert response.text.strip() == "built while you waited"


@pytest.mark.go
def test_a_failed_go_build_stays_failed_when_another_thread_reaps_it(
        fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    # dev once built Go in gunicorn's master, whose waitpid(-1) reaps every child:
    # subprocess then read exit status 0, and an empty file was cached as the binary
    go = runtimes["go"]
    reaping = threading.Event()
    reaping.set()

    def reap() -> None:
        while reaping.is_set():
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.0005)

    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    try:
        for number in range(3):
            write_function(fn_dir, "broken.go", go_source("", f"undefined{number}"))
            spec = load_registry(fn_dir).get("broken")
            with pytest.raises(BuildError, match=f"undefined: undefined{number}"):
                go.command(spec)
            with pytest.raises(BuildError):  # and again: no binary was cached meanwhile
                go.command(spec)
    finally:
        reaping.clear()
        reaper.join()


@pytest.mark.go
def test_go_compile_error_at_start_is_printed_in_the_terminal(fn_dir: Path) -> None:
    write_function(fn_dir, "broken.go", go_source("", "notDefinedAnywhere"))
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        assert wait_until(lambda: "undefined: notDefinedAnywhere" in server.stdout(),
                          GO_TIMEOUT), server.stdout()
        assert reloads(server) == []
        response = call(server, "broken")
        assert (response.status_code, response.json()["code"]) == (502, "build_failed")
        assert call(server, "hello").status_code == 200


# -- requests during a reload ----------------------------------------------------------


def test_a_request_in_flight_during_a_reload_completes(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "slow.py", SLOW)
    write_function(fn_dir, "hello.py", HELLO)
    pidfile = tmp_path / "slow.pid"
    with dev_server(fn_dir) as server:
        results: list[requests.Response] = []
        request = threading.Thread(target=lambda: results.append(
            call(server, "slow", params={"seconds": "4", "pidfile": str(pidfile)})))
        request.start()
        read_pid(pidfile)  # the function is running now

        write_function(fn_dir, "hello.py", 'print("hello v2")\n')
        wait_for_reloads(server, 1)
        # the new worker is up (and serving the edit) before the old one's request is done
        wait_for_output(server, "hello", "hello v2")
        assert request.is_alive(), "the slow request ended before the reload: no overlap"
        request.join(timeout=30)
        [response] = results
        assert response.status_code == 200, response.text
        assert response.text.strip() == "slept"
        assert wait_until(lambda: len(server.workers()) == 1, RELOAD_TIMEOUT)


def test_every_save_reloads_not_only_the_first(fn_dir: Path) -> None:
    # each worker is forked from the master and shares its inotify instance: a worker
    # that tore down the observer on its way out used to blind the master after one reload
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        for number in range(1, 5):
            write_function(fn_dir, f"fn{number}.py", f'print("fn {number}")\n')
            assert wait_for_reloads(server, number)[-1].endswith(f"fn{number}.py")
            wait_for_output(server, f"fn{number}", f"fn {number}")
        assert_reloads_stay(server, 4)


def test_a_save_while_an_old_worker_drains_reloads_at_once(fn_dir: Path,
                                                           tmp_path: Path) -> None:
    # gunicorn's reload() waits for the old worker to exit; with a slow request in it,
    # the master would sit out the next save (and Ctrl-C) for up to graceful_timeout
    write_function(fn_dir, "slow.py", SLOW)
    pidfile = tmp_path / "slow.pid"
    with dev_server(fn_dir) as server:
        results: list[requests.Response] = []
        request = threading.Thread(target=lambda: results.append(
            call(server, "slow", params={"seconds": "8", "pidfile": str(pidfile)})))
        request.start()
        read_pid(pidfile)
        write_function(fn_dir, "first.py", 'print("first")\n')
        wait_for_output(server, "first", "first")  # the old worker now drains the slow one
        started = time.monotonic()
        write_function(fn_dir, "second.py", 'print("second")\n')
        wait_for_output(server, "second", "second", timeout=6)
        assert request.is_alive(), "the slow request ended first: the test proved nothing"
        assert time.monotonic() - started < 6
        request.join(timeout=30)
        assert [r.status_code for r in results] == [200]


def test_requests_keep_succeeding_across_reloads(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    with dev_server(fn_dir) as server:
        statuses: list[int | str] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    statuses.append(call(server, "hello", timeout=30).status_code)
                except requests.RequestException as exc:
                    statuses.append(type(exc).__name__)

        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for client in clients:
            client.start()
        try:
            for round_ in range(1, 4):
                write_function(fn_dir, "hello.py", f'print("hello r{round_}")\n')
                wait_for_reloads(server, round_)
                wait_for_output(server, "hello", f"hello r{round_}")
                assert wait_until(lambda: len(server.workers()) == 1, RELOAD_TIMEOUT)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=60)
        failures = [status for status in statuses if status != 200]
        assert not failures, f"{len(failures)} of {len(statuses)} requests failed: {failures[:5]}"
        assert len(statuses) > 10


# -- dev responses and logs -----------------------------------------------------------


def test_function_failed_bodies_carry_the_stderr_tail(fn_dir: Path) -> None:
    write_function(fn_dir, "fail.py", """
        import sys
        sys.stderr.write("x" * 10000 + "\\n")
        sys.stderr.write("the end of the story\\n")
        sys.exit(3)
    """)
    write_function(fn_dir, "short.py", """
        import sys
        print("something went wrong", file=sys.stderr)
        sys.exit(1)
    """)
    with dev_server(fn_dir) as server:
        response = call(server, "fail")
        assert response.status_code == 502
        body = response.json()
        assert body["code"] == "function_failed"
        assert body["exit_code"] == 3
        assert body["stderr"].endswith("the end of the story\n")
        assert len(body["stderr"].encode()) == 4096

        body = call(server, "short").json()
        assert (body["code"], body["exit_code"]) == ("function_failed", 1)
        assert body["stderr"] == "something went wrong\n"


def test_dev_logs_are_lines_for_people_on_stdout(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "fail.py", """
        import sys
        print("oops", file=sys.stderr)
        sys.exit(1)
    """)
    with dev_server(fn_dir) as server:
        call(server, "hello", method="POST", json={"a": 1})
        call(server, "fail")
        call(server, "nope")
        assert wait_until(lambda: len(REQUEST_LINE.findall(server.stdout())) >= 3), \
            server.stdout()
        lines = REQUEST_LINE.findall(server.stdout())
        assert ("POST", "hello", "200") in [line[:3] for line in lines]
        assert ("GET", "fail", "502") in [line[:3] for line in lines]
        assert ("GET", "nope", "404") in [line[:3] for line in lines]
        assert wait_until(lambda: "fail | oops" in server.stdout()), server.stdout()
        assert "[dev] watching" in server.stdout()
        for line in server.stdout().splitlines() + server.stderr().splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue
            pytest.fail(f"a JSON log line in dev mode: {line}")
        assert "\033[" not in server.stdout()  # no colours when stdout is not a terminal


# -- stopping --------------------------------------------------------------------------


def test_ctrl_c_stops_the_server_and_the_running_function(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "slow.py", SLOW)
    pidfile = tmp_path / "slow.pid"
    server = started_dev_server(fn_dir)
    try:
        outcome: list[object] = []

        def slow_request() -> None:
            try:
                outcome.append(call(server, "slow", timeout=60,
                                    params={"seconds": "60", "pidfile": str(pidfile)}))
            except requests.RequestException as exc:
                outcome.append(exc)

        request = threading.Thread(target=slow_request)
        request.start()
        function_pid = read_pid(pidfile)
        write_function(fn_dir, "other.py", 'print("other")\n')  # one reload first
        wait_for_reloads(server, 1)
        assert wait_until(lambda: "other" in listed(server), RELOAD_TIMEOUT)

        started = time.monotonic()
        code = server.stop(signal.SIGINT)  # asserts no process of the server is left
        assert code == 0, server.stderr()
        assert time.monotonic() - started < 10  # not the 60 s of the function
        assert process_gone(function_pid)
        request.join(timeout=30)
        [answer] = outcome  # the connection closes, or an error: never a 200
        assert not isinstance(answer, requests.Response) or answer.status_code >= 500
    finally:
        server.kill()
    assert "Traceback" not in server.stderr() + server.stdout()


@pytest.mark.go
def test_ctrl_c_during_a_go_build_kills_the_build(fn_dir: Path, tmp_path: Path) -> None:
    # the master builds Go functions when dev starts; a toolexec wrapper holds that build
    # open, and Ctrl-C must not leave it (or its children) running
    wrapper = write_function(tmp_path, "toolexec.sh", f"""
        #!/bin/sh
        echo $$ > {tmp_path}/toolexec.pid
        exec sleep 300
    """, executable=True)
    write_function(fn_dir, "gofn.go", """
        package main

        import "fmt"

        func main() { fmt.Println("built") }
    """)
    env = dict(os.environ, GOFLAGS=f"-toolexec={wrapper}")
    server = started_dev_server(fn_dir, env=env)
    try:
        build_pid = read_pid(tmp_path / "toolexec.pid", timeout=GO_TIMEOUT)
        assert server.stop(signal.SIGINT) == 0
        assert process_gone(build_pid)
    finally:
        server.kill()
