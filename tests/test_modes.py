"""fork and warm modes (SPEC §8) through the executor: real fork servers, real pools.

Every test ends with the executor shut down and checks, where it started processes,
that none of them is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from fnserve.config import build_environment, cache_dir
from fnserve.context import function_environment
from fnserve.errors import ConfigError
from fnserve.executor import Executor, Result
from fnserve.registry import FunctionSpec, Settings, load_registry
from fnserve.runtimes import Runtime, make_runtimes
from fnserve.runtimes.channel import BOOTSTRAP

from .helpers import (
    fnserve_cli,
    invocation,
    process_gone,
    read_pid,
    wait_until,
    write_function,
    write_toml,
)

MODES = ("fork", "warm")


class Lines:
    """stdout and stderr sinks that remember (stream, request_id, line)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []

    def sink(self, stream: str) -> Any:
        def record(inv: Any, line: str) -> None:
            self.lines.append((stream, inv.context.request_id, line))
        return record

    def of(self, request_id: str, stream: str) -> list[str]:
        return [line for s, rid, line in self.lines if rid == request_id and s == stream]


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture
def executor(runtimes: dict[str, Runtime], lines: Lines) -> Iterator[Executor]:
    pool = Executor(4, runtimes, stderr_sink=lines.sink("stderr"),
                    stdout_sink=lines.sink("stdout"))
    yield pool
    pool.shutdown()
    assert wait_until(lambda: not bootstrap_processes(), timeout=10), bootstrap_processes()


def bootstrap_processes() -> list[psutil.Process]:
    """Fork servers, warm processes and fork children below this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if str(BOOTSTRAP) in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def spec(directory: Path, name: str, mode: str, **settings: Any) -> FunctionSpec:
    return FunctionSpec(name, "python", directory / f"{name}.py", directory,
                        Settings(mode=mode, **settings))


def run(executor: Executor, fn: FunctionSpec, event: bytes = b"{}", timeout: float = 10.0,
        **kwargs: Any) -> Result:
    kwargs.setdefault("configured_env", fn.settings.env)  # as the service builds it
    return executor.run(invocation(fn, event, timeout, **kwargs))


def body(result: Result) -> Any:
    assert result.outcome == "ok", result
    return json.loads(result.stdout)


SEED = """
    import json, os, sys

    def handler(event, context):
        name = event.get("name") or context.get("parameters", {}).get("name") or "world"
        return {"message": f"{os.environ.get('GREETING', 'Hello')}, {name}!",
                "request_id": context.get("request_id"), "deadline": context.get("deadline") > 0}

    if __name__ == "__main__":
        event = json.load(sys.stdin)
        ctx = json.loads(os.environ["FN_CONTEXT"])
        print(json.dumps(handler(event, ctx)))
"""

COUNTER = """
    import os
    count = 0

    def handler(event, context):
        global count
        count += 1
        return {"count": count, "pid": os.getpid()}
"""


# -- what the handler sees and returns ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_seed_style_file_gives_the_same_json_as_process_mode(
        fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "hello.py", SEED)
    settings = {"env": {"GREETING": "Hi"}}
    event = b'{"name": "Ada"}'
    process = run(executor, spec(fn_dir, "hello", "process", **settings), event, request_id="r-1")
    other = run(executor, spec(fn_dir, "hello", mode, **settings), event, request_id="r-1")
    assert body(other) == body(process) == {"message": "Hi, Ada!", "request_id": "r-1",
                                             "deadline": True}


def test_fork_runs_each_invocation_in_a_fresh_child(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "counter.py", COUNTER)
    fn = spec(fn_dir, "counter", "fork")
    answers = [body(run(executor, fn)) for _ in range(4)]
    assert [a["count"] for a in answers] == [1, 1, 1, 1]
    assert len({a["pid"] for a in answers}) == 4


def test_warm_keeps_module_state_in_one_process(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "counter.py", COUNTER)
    fn = spec(fn_dir, "counter", "warm", pool=1)
    answers = [body(run(executor, fn)) for _ in range(4)]
    assert [a["count"] for a in answers] == [1, 2, 3, 4]
    assert len({a["pid"] for a in answers}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_context_is_a_dict_with_lambda_attributes(fn_dir: Path, executor: Executor,
                                                  mode: str) -> None:
    write_function(fn_dir, "ctx.py", """
        import json, os

        def handler(event, context):
            return {
                "is_dict": isinstance(context, dict),
                "keys": sorted(context),
                "same_as_env": json.loads(os.environ["FN_CONTEXT"]) == dict(context),
                "request_id": context.request_id, "aws_request_id": context.aws_request_id,
                "function_name": context.function_name,
                "function_version": context.function_version,
                "arn": context.invoked_function_arn,
                "memory": context.memory_limit_in_mb,
                "log_group": context.log_group_name,
                "log_stream": bool(context.log_stream_name),
                "identity": context.identity, "client_context": context.client_context,
                "remaining": context.get_remaining_time_in_millis(),
                "deadline": context.get("deadline"),
            }
    """)
    fn = spec(fn_dir, "ctx", mode, memory=256 * 1024 * 1024)
    got = body(run(executor, fn, timeout=8.0, request_id="req-7"))
    assert got["is_dict"] and got["same_as_env"]
    assert got["keys"] == sorted(["request_id", "function", "timestamp", "deadline",
                                  "deadline_ms", "parameters", "env", "tracing"])
    assert got["request_id"] == got["aws_request_id"] == "req-7"
    assert got["function_name"] == "ctx"
    assert got["function_version"] == "$LATEST"
    assert got["arn"] == "arn:aws:lambda:local:000000000000:function:ctx"
    assert got["memory"] == 256
    assert got["log_group"] == "/aws/lambda/ctx" and got["log_stream"]
    assert got["identity"] is None and got["client_context"] is None
    assert 0 < got["remaining"] <= 8000
    assert 0 < got["deadline"] <= 8.0


@pytest.mark.parametrize("mode", MODES)
def test_os_environ_is_the_functions_environment_of_each_call(
        fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "env.py", """
        import os

        def handler(event, context):
            return dict(os.environ)
    """)
    fn = spec(fn_dir, "env", mode, env={"GREETING": "Hello"}, pool=1)
    first = run(executor, fn, forwarded={"HTTP_X_API_KEY": "k-1"}, request_id="a-1")
    second = run(executor, fn, request_id="a-2")  # no header: none left from the first call
    for result, request_id in ((first, "a-1"), (second, "a-2")):
        environ = body(result)
        assert environ == function_environment(result.context, invocation(fn).base_env)
        assert environ["FN_REQUEST_ID"] == request_id
        assert environ["FN_FUNCTION"] == "env" and environ["GREETING"] == "Hello"
    assert body(first)["HTTP_X_API_KEY"] == "k-1"
    assert "HTTP_X_API_KEY" not in body(second)


@pytest.mark.parametrize("mode", MODES)
def test_events_json_text_and_empty(fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "echo.py", """
        def handler(event, context):
            return {"type": type(event).__name__, "event": event}
    """)
    fn = spec(fn_dir, "echo", mode)
    assert body(run(executor, fn, b'{"a": 1}')) == {"type": "dict", "event": {"a": 1}}
    assert body(run(executor, fn, b"hello \xff")) == {"type": "str", "event": "hello \ufffd"}
    assert body(run(executor, fn, b"")) == {"type": "dict", "event": {}}
    assert body(run(executor, fn, b"[1, 2]")) == {"type": "list", "event": [1, 2]}


@pytest.mark.parametrize("mode", MODES)
def test_handler_setting_and_lambda_handler_fallback(fn_dir: Path, executor: Executor,
                                                     mode: str) -> None:
    write_function(fn_dir, "named.py", """
        def main(event, context):
            return "main"

        def lambda_handler(event, context):
            return "lambda"
    """)
    assert body(run(executor, spec(fn_dir, "named", mode, handler="main"))) == "main"
    # unset: `handler`, else `lambda_handler` (a fresh spec is a fresh runner)
    assert body(run(executor, spec(fn_dir, "named", mode, pool=2))) == "lambda"


@pytest.mark.parametrize("mode", MODES)
def test_bytes_are_sent_as_they_are(fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "raw.py", """
        def handler(event, context):
            return b"\\x00raw bytes"
    """)
    result = run(executor, spec(fn_dir, "raw", mode))
    assert result.outcome == "ok" and result.stdout == b"\x00raw bytes"


@pytest.mark.parametrize("mode", MODES)
def test_prints_go_to_the_log_never_into_the_result(fn_dir: Path, executor: Executor,
                                                    lines: Lines, mode: str) -> None:
    write_function(fn_dir, "chatty.py", """
        import sys
        print("importing")

        def handler(event, context):
            print("to stdout")
            print("to stderr", file=sys.stderr)
            return {"ok": True}
    """)
    fn = spec(fn_dir, "chatty", mode)
    first = run(executor, fn, request_id="p-1")
    second = run(executor, fn, request_id="p-2")
    assert body(first) == body(second) == {"ok": True}
    assert lines.of("p-1", "stdout") == ["importing", "to stdout"]
    assert lines.of("p-2", "stdout") == ["to stdout"]
    assert lines.of("p-1", "stderr") == lines.of("p-2", "stderr") == ["to stderr"]


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exception_is_reported_and_a_warm_process_survives(
        fn_dir: Path, executor: Executor, lines: Lines, mode: str) -> None:
    write_function(fn_dir, "boom.py", """
        import os

        def handler(event, context):
            if event.get("fail"):
                raise ValueError("bad input: " + event["fail"])
            return os.getpid()
    """)
    fn = spec(fn_dir, "boom", mode, pool=1)
    before = body(run(executor, fn))
    failed = run(executor, fn, b'{"fail": "x"}', request_id="e-1")
    assert failed.outcome == "failed" and failed.exit_code == 1
    assert (failed.error_type, failed.error_message) == ("ValueError", "bad input: x")
    assert failed.stack_trace and "in handler" in failed.stack_trace[-1]
    assert any("ValueError: bad input: x" in line for line in lines.of("e-1", "stderr"))
    assert b"ValueError" in failed.stderr_tail
    after = body(run(executor, fn))
    assert (after == before) == (mode == "warm")


@pytest.mark.parametrize("mode", MODES)
def test_a_value_that_is_not_json_names_its_type(fn_dir: Path, executor: Executor,
                                                 mode: str) -> None:
    write_function(fn_dir, "odd.py", """
        def handler(event, context):
            return {1, 2}
    """)
    result = run(executor, spec(fn_dir, "odd", mode))
    assert result.outcome == "failed" and result.error_type == "TypeError"
    assert "set" in result.error_message


@pytest.mark.parametrize("mode", MODES)
def test_init_failure_then_fixed(fn_dir: Path, executor: Executor,
                                 runtimes: dict[str, Runtime], mode: str) -> None:
    path = write_function(fn_dir, "broken.py", "import no_such_module_here\n")
    fn = spec(fn_dir, "broken", mode)
    result = run(executor, fn)
    assert result.outcome == "init_failed"
    assert result.error_type == "ModuleNotFoundError"
    assert "no_such_module_here" in result.error_message
    problem = runtimes["python"].problem(fn)
    assert problem is not None and "ModuleNotFoundError" in problem
    path.write_text("def handler(event, context):\n    return 'fixed'\n")
    assert body(run(executor, fn)) == "fixed"
    assert runtimes["python"].problem(fn) is None


@pytest.mark.parametrize("mode", MODES)
def test_no_handler_is_an_init_failure(fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "script.py", "print('a script, no handler')\n")
    result = run(executor, spec(fn_dir, "script", mode))
    assert result.outcome == "init_failed" and result.error_type == "HandlerNotFound"
    assert "handler or lambda_handler" in result.error_message


@pytest.mark.parametrize("mode", MODES)
def test_output_cap(fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "big.py", """
        def handler(event, context):
            return "x" * event["size"]
    """)
    fn = spec(fn_dir, "big", mode, pool=1)
    too_big = run(executor, fn, b'{"size": 2000}', max_output=1000)
    assert too_big.outcome == "output_too_large" and too_big.stdout == b""
    assert body(run(executor, fn, b'{"size": 10}', max_output=1000)) == "x" * 10


# -- deadline, memory, cancel, deaths -----------------------------------------------------


SLEEPER = """
    import os, subprocess, time

    def handler(event, context):
        if event.get("quick"):
            return os.getpid()
        child = subprocess.Popen(["sleep", "60"])
        with open(event["pidfile"], "w") as f:
            f.write(f"{child.pid}\\n")
        time.sleep(60)
"""


@pytest.mark.parametrize("mode", MODES)
def test_deadline_kills_the_group_and_the_next_call_works(
        fn_dir: Path, tmp_path: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "sleeper.py", SLEEPER)
    fn = spec(fn_dir, "sleeper", mode, pool=1)
    first_pid = body(run(executor, fn, b'{"quick": true}'))
    pidfile = tmp_path / "grandchild"
    result = run(executor, fn, json.dumps({"pidfile": str(pidfile)}).encode(), timeout=1.0)
    assert result.outcome == "timeout"
    grandchild = read_pid(pidfile)
    assert wait_until(lambda: process_gone(grandchild), timeout=5)
    assert process_gone(first_pid)  # warm: that process was replaced; fork: long gone
    assert body(run(executor, fn, b'{"quick": true}')) != first_pid


@pytest.mark.parametrize("mode", MODES)
def test_cancel_kills_the_invocation(fn_dir: Path, tmp_path: Path, executor: Executor,
                                     mode: str) -> None:
    write_function(fn_dir, "sleeper.py", SLEEPER)
    fn = spec(fn_dir, "sleeper", mode, pool=1)
    pidfile = tmp_path / "grandchild"
    handle = executor.submit(invocation(fn, json.dumps({"pidfile": str(pidfile)}).encode()))
    grandchild = read_pid(pidfile, timeout=10)
    handle.cancel()
    assert handle.result(timeout=10).outcome == "cancelled"
    assert wait_until(lambda: process_gone(grandchild), timeout=5)
    assert isinstance(body(run(executor, fn, b'{"quick": true}')), int)


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit(fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "hog.py", """
        def handler(event, context):
            block = bytearray(event["mb"] * 1024 * 1024)
            return len(block)
    """)
    fn = spec(fn_dir, "hog", mode, memory=96 * 1024 * 1024, pool=1)
    result = run(executor, fn, b'{"mb": 512}')
    assert result.outcome == "failed" and result.error_type == "MemoryError"
    assert body(run(executor, fn, b'{"mb": 4}')) == 4 * 1024 * 1024


def test_warm_process_killed_from_outside_is_replaced(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "counter.py", COUNTER)
    fn = spec(fn_dir, "counter", "warm", pool=1)
    first = body(run(executor, fn))
    os.kill(first["pid"], signal.SIGKILL)
    assert wait_until(lambda: process_gone(first["pid"]), timeout=5)
    second = body(run(executor, fn))
    assert second["pid"] != first["pid"] and second["count"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_process_dying_mid_invocation_is_a_502_with_its_signal(
        fn_dir: Path, executor: Executor, mode: str) -> None:
    write_function(fn_dir, "crash.py", """
        import os, signal

        def handler(event, context):
            if event.get("die"):
                os.kill(os.getpid(), signal.SIGKILL)
            return os.getpid()
    """)
    fn = spec(fn_dir, "crash", mode, pool=1)
    before = body(run(executor, fn))
    died = run(executor, fn, b'{"die": true}')
    assert died.outcome == "failed" and died.signal == signal.SIGKILL
    after = body(run(executor, fn))
    assert after != before


def test_fork_server_killed_from_outside_is_started_again(fn_dir: Path,
                                                          executor: Executor) -> None:
    write_function(fn_dir, "counter.py", COUNTER)
    fn = spec(fn_dir, "counter", "fork")
    body(run(executor, fn))
    # the answered child is killed and reaped without the call waiting for it
    assert wait_until(lambda: len(bootstrap_processes()) == 1, timeout=5)
    servers = bootstrap_processes()
    servers[0].kill()
    assert wait_until(lambda: not bootstrap_processes(), timeout=5)
    assert body(run(executor, fn))["count"] == 1
    assert [p.pid for p in bootstrap_processes()] != [servers[0].pid]


def test_warm_max_requests_replaces_the_process(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "counter.py", COUNTER)
    fn = spec(fn_dir, "counter", "warm", pool=1, max_requests=2)
    answers = [body(run(executor, fn)) for _ in range(4)]
    assert [a["count"] for a in answers] == [1, 2, 1, 2]
    pids = [a["pid"] for a in answers]
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_warm_busy_pool_waits_within_the_deadline(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "nap.py", """
        import os, pathlib, time

        def handler(event, context):
            if event.get("marker"):
                pathlib.Path(event["marker"]).write_text("started\\n")
            time.sleep(event["seconds"])
            return os.getpid()
    """)
    fn = spec(fn_dir, "nap", "warm", pool=1)
    body(run(executor, fn, b'{"seconds": 0}'))  # started
    marker = fn_dir.parent / "marker"
    long = executor.submit(invocation(fn, json.dumps({"seconds": 1.5,
                                                      "marker": str(marker)}).encode()))
    assert wait_until(marker.exists, timeout=10)  # it holds the only process
    waiting = executor.submit(invocation(fn, b'{"seconds": 0}'))
    short = executor.submit(invocation(fn, b'{"seconds": 0}', timeout=0.3))
    assert short.result(timeout=10).outcome == "timeout"
    assert waiting.result(timeout=10).outcome == "ok"
    assert long.result(timeout=10).outcome == "ok"


def test_warm_pool_serves_concurrent_invocations_in_parallel_processes(
        fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "nap.py", """
        import os, time

        def handler(event, context):
            time.sleep(0.3)
            return os.getpid()
    """)
    fn = spec(fn_dir, "nap", "warm", pool=3)
    handles = [executor.submit(invocation(fn)) for _ in range(3)]
    pids = {body(handle.result(timeout=20)) for handle in handles}
    assert len(pids) == 3


@pytest.mark.parametrize("mode", MODES)
def test_shutdown_leaves_no_process(fn_dir: Path, runtimes: dict[str, Runtime],
                                    tmp_path: Path, mode: str) -> None:
    write_function(fn_dir, "sleeper.py", SLEEPER)
    fn = spec(fn_dir, "sleeper", mode, pool=2)
    executor = Executor(4, runtimes)
    body(run(executor, fn, b'{"quick": true}'))
    pidfile = tmp_path / "grandchild"
    handle = executor.submit(invocation(fn, json.dumps({"pidfile": str(pidfile)}).encode()))
    grandchild = read_pid(pidfile, timeout=10)
    started = bootstrap_processes()
    assert started
    executor.shutdown()
    assert handle.result(timeout=10).outcome == "cancelled"
    assert wait_until(lambda: not bootstrap_processes(), timeout=10)
    assert all(process_gone(p.pid) for p in started)
    assert wait_until(lambda: process_gone(grandchild), timeout=5)


def test_fork_children_run_side_by_side(fn_dir: Path, tmp_path: Path,
                                        executor: Executor) -> None:
    """The fork server forks and returns to its loop: it never waits for a child. Each
    child waits (up to 10 s) until all four are running: serialised, they could not."""
    write_function(fn_dir, "meet.py", """
        import os, pathlib, time

        def handler(event, context):
            here = pathlib.Path(event["dir"])
            (here / str(os.getpid())).touch()
            deadline = time.monotonic() + 10
            while len(list(here.iterdir())) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            return len(list(here.iterdir()))
    """)
    fn = spec(fn_dir, "meet", "fork")
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    event = json.dumps({"dir": str(meeting)}).encode()
    handles = [executor.submit(invocation(fn, event, 20.0)) for _ in range(4)]
    assert [body(handle.result(timeout=30)) for handle in handles] == [4, 4, 4, 4]


# -- settings and listings ---------------------------------------------------------------


def test_mode_settings_are_checked(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", "def handler(e, c):\n    return 1\n")
    write_function(fn_dir, "tool.sh", "#!/bin/sh\necho hi\n", executable=True)
    write_toml(fn_dir, """
        [defaults]
        mode = "warm"
        pool = 2

        [functions.hello]
        handler = "handler"
        max_requests = 100
    """)
    registry = load_registry(fn_dir)
    hello = registry.get("hello").settings
    assert (hello.mode, hello.pool, hello.max_requests, hello.handler) == \
        ("warm", 2, 100, "handler")
    assert registry.get("tool").settings.mode == "process"  # [defaults] is Python-only

    for table, key in (('[functions.tool]\nmode = "fork"\n', "functions.tool.mode"),
                       ('[functions.hello]\nmode = "threads"\n', "functions.hello.mode"),
                       ('[functions.hello]\npool = 0\n', "functions.hello.pool"),
                       ('[functions.hello]\nhandler = "a.b"\n', "functions.hello.handler"),
                       ('[defaults]\nmax_requests = -1\n', "defaults.max_requests")):
        write_toml(fn_dir, table)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_registry(fn_dir)


def test_fnserve_run_and_list_honour_the_mode(fn_dir: Path, environ: dict[str, str]) -> None:
    write_function(fn_dir, "counter.py", """
        import os
        print("imported")

        def handler(event, context):
            print("called")
            return {"pid": os.getpid(), "event": event}
    """)
    write_toml(fn_dir, '[functions.counter]\nmode = "fork"\n')
    done = fnserve_cli("run", "counter", "--dir", str(fn_dir), "--data", '{"a": 1}',
                       env=environ)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["event"] == {"a": 1}
    assert done.stderr.decode().splitlines() == ["imported", "called"]
    listed = fnserve_cli("list", str(fn_dir), env=environ)
    assert listed.stdout.decode().split() == ["NAME", "RUNTIME", "MODE", "TIMEOUT", "MEMORY",
                                              "ISOLATION", "STATUS", "counter", "python",
                                              "fork", "30s", "-", "none", "ok"]
    write_function(fn_dir, "counter.py", "def handler(e, c):\n    raise KeyError('k')\n")
    failed = fnserve_cli("run", "counter", "--dir", str(fn_dir), env=environ)
    assert failed.returncode == 1
    assert "KeyError" in failed.stderr.decode()
    write_toml(fn_dir, '[functions.counter]\nmode = "warm"\n')
    write_function(fn_dir, "counter.py", "def handler(e, c):\n    return e\n")
    warm = fnserve_cli("run", "counter", "--dir", str(fn_dir), "--data", '"hi"', env=environ)
    assert (warm.returncode, warm.stdout) == (0, b'"hi"'), warm.stderr
    for mode in MODES:  # a module that does not import: a failure, said in one line
        write_toml(fn_dir, f'[functions.counter]\nmode = "{mode}"\n')
        write_function(fn_dir, "counter.py", "raise ValueError('no import')\n")
        broken = fnserve_cli("run", "counter", "--dir", str(fn_dir), env=environ)
        assert (broken.returncode, broken.stdout) == (1, b""), broken
        assert broken.stderr.decode().splitlines()[-1] == "fnserve: ValueError: no import"


def test_warm_handler_changing_os_environ_does_not_leak_into_the_next_call(
        fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "setenv.py", """
        import os

        def handler(event, context):
            seen = os.environ.get("LEAKED")
            os.environ["LEAKED"] = "yes"
            os.environ["PATH"] = "/nowhere"
            return [seen, os.environ.get("FN_REQUEST_ID")]
    """)
    fn = spec(fn_dir, "setenv", "warm", pool=1)
    assert body(run(executor, fn, request_id="x-1")) == [None, "x-1"]
    second = run(executor, fn, request_id="x-2")
    assert body(second) == [None, "x-2"]


class SandboxedExecutor(Executor):
    """The executor with a bwrap PID namespace around every process it starts, through
    the one argv hook a sandbox uses (`process_argv`): a fork server then numbers its
    children in its own namespace, and the worker must still kill the right group."""

    def process_argv(self, argv: Sequence[str], spec: FunctionSpec,
                     readable: Sequence[str | Path] = ()) -> list[str]:
        return ["bwrap", "--unshare-pid", "--dev-bind", "/", "/", "--die-with-parent", "--",
                *super().process_argv(argv, spec, readable)]


def _bwrap_works() -> bool:
    if not shutil.which("bwrap"):
        return False
    done = subprocess.run(["bwrap", "--unshare-pid", "--dev-bind", "/", "/", "true"],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.sandbox
@pytest.mark.parametrize("mode", MODES)
def test_modes_in_a_pid_namespace(fn_dir: Path, tmp_path: Path, runtimes: dict[str, Runtime],
                                  mode: str) -> None:
    if not _bwrap_works():
        pytest.skip("bwrap is missing or cannot make a PID namespace here")
    write_function(fn_dir, "sleeper.py", SLEEPER)
    fn = spec(fn_dir, "sleeper", mode, pool=1)
    executor = SandboxedExecutor(2, runtimes)
    try:
        inner = [body(run(executor, fn, b'{"quick": true}')) for _ in range(2)]
        assert all(pid < 100 for pid in inner), inner  # numbered inside the namespace
        pidfile = tmp_path / "grandchild"
        result = run(executor, fn, json.dumps({"pidfile": str(pidfile)}).encode(), timeout=1.0)
        assert result.outcome == "timeout"
        assert body(run(executor, fn, b'{"quick": true}')) > 0
    finally:
        executor.shutdown()
    assert wait_until(lambda: not bootstrap_processes(), timeout=10), bootstrap_processes()


def test_workers_bound_fork_and_warm_runs_in_the_callers_thread(
        fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    """An inline run (the synchronous path) holds no pool thread, but --workers still
    bounds how many run at once: the second waits, within its deadline."""
    write_function(fn_dir, "nap.py", """
        import pathlib, time

        def handler(event, context):
            pathlib.Path(event["marker"]).write_text("running\\n")
            time.sleep(event["seconds"])
            return "done"
    """)
    fn = spec(fn_dir, "nap", "warm", pool=2)
    executor = Executor(1, runtimes)
    markers = [fn_dir.parent / "first", fn_dir.parent / "second"]
    try:
        first = executor.submit(invocation(fn, json.dumps(
            {"marker": str(markers[0]), "seconds": 2}).encode()), inline=True)
        waiter = threading.Thread(target=first.result)
        waiter.start()
        assert wait_until(markers[0].exists, timeout=10)
        second = executor.submit(invocation(fn, json.dumps(
            {"marker": str(markers[1]), "seconds": 0}).encode(), timeout=0.5), inline=True)
        assert second.result().outcome == "timeout"
        assert not markers[1].exists()
        waiter.join(timeout=20)
        assert first.result().outcome == "ok"
    finally:
        executor.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_a_new_process_runs_the_saved_source_not_a_stale_pyc(
        fn_dir: Path, runtimes: dict[str, Runtime], environ: dict[str, str],
        mode: str) -> None:
    """A save of the same size within the same second leaves __pycache__ looking valid
    (its check is mtime in seconds + size): the module is compiled from its source."""
    path = write_function(fn_dir, "greet.py", 'def handler(event, context):\n    return "v1"\n')
    fn = spec(fn_dir, "greet", mode)
    first = Executor(1, runtimes)
    try:
        assert body(run(first, fn)) == "v1"
    finally:
        first.shutdown()
    stamp = path.stat()
    path.write_text('def handler(event, context):\n    return "v2"\n')
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = Executor(1, make_runtimes(cache_dir(environ), build_environment(environ)))
    try:
        assert body(run(second, fn)) == "v2"
    finally:
        second.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_lambda_client_context_reaches_the_handler(fn_dir: Path, executor: Executor,
                                                  mode: str) -> None:
    write_function(fn_dir, "client.py", """
        def handler(event, context):
            return [context.client_context, "client_context" in context]
    """)
    fn = spec(fn_dir, "client", mode)
    call = dataclasses.replace(invocation(fn), client_context={"custom": {"k": "v"}})
    assert body(executor.run(call)) == [{"custom": {"k": "v"}}, False]
