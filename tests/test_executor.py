"""The process lifecycle (SPEC §4): stdin, stdout cap, deadline, cancel, kill, reap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from fnserve.executor import STDERR_TAIL, Executor, Result
from fnserve.registry import FunctionSpec, load_registry
from fnserve.runtimes import Runtime

from .helpers import (
    PYTHON,
    invocation,
    process_gone,
    read_pid,
    wait_until,
    write_function,
    write_toml,
)


def spawn_grandchild(then: str) -> str:
    """A function that starts a `sleep` holding its stdout and stderr, writes its pid, then..."""
    return f"""
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "60"])
        with open(sys.argv[0] + ".pid", "w") as f:
            f.write(str(child.pid) + "\\n")
        print("started", flush=True)
        {then}
    """


def spec(directory: Path, name: str) -> FunctionSpec:
    return load_registry(directory).get(name)


def python_function(directory: Path, name: str, source: str) -> FunctionSpec:
    write_function(directory, f"{name}.py", source)
    return spec(directory, name)


def test_event_reaches_stdin(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "echo", "import sys; sys.stdout.write(sys.stdin.read())")
    result = executor.run(invocation(fn, b'{"name": "Ada"}'))
    assert result.outcome == "ok"
    assert result.exit_code == 0
    assert result.stdout == b'{"name": "Ada"}'


def test_empty_event_is_an_empty_stdin(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "size", "import sys; print(len(sys.stdin.buffer.read()))")
    result = executor.run(invocation(fn, b""))
    assert (result.outcome, result.stdout) == ("ok", b"0\n")


def test_function_that_ignores_a_large_event(fn_dir: Path, executor: Executor) -> None:
    # the event (6 MiB) is far larger than a pipe: the writer must not block on it
    fn = python_function(fn_dir, "deaf", "print('not reading')")
    started = time.monotonic()
    result = executor.run(invocation(fn, b"x" * (6 * 1024 * 1024), timeout=10))
    assert (result.outcome, result.stdout) == ("ok", b"not reading\n")
    assert time.monotonic() - started < 5


def test_large_event_is_delivered_whole(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "count", "import sys; print(len(sys.stdin.buffer.read()))")
    result = executor.run(invocation(fn, b"y" * (6 * 1024 * 1024)))
    assert result.stdout == b"%d\n" % (6 * 1024 * 1024)


def test_exit_code_is_kept(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "fail", "import sys; print('partial'); sys.exit(3)")
    result = executor.run(invocation(fn))
    assert (result.outcome, result.exit_code, result.signal) == ("failed", 3, None)
    assert result.stdout == b"partial\n"


def test_exit_by_signal(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "killed",
                         "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    result = executor.run(invocation(fn))
    assert (result.outcome, result.signal, result.exit_code) == ("failed", 15, None)


def test_missing_file_fails_with_127(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "gone.sh", "#!/bin/sh\necho hi\n", executable=True)
    fn = spec(fn_dir, "gone")
    (fn_dir / "gone.sh").unlink()  # deleted between the scan and the call
    result = executor.run(invocation(fn))
    assert (result.outcome, result.exit_code) == ("failed", 127)
    assert "gone" in result.error


def test_timeout_kills_a_grandchild_holding_stdout(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "hang", spawn_grandchild("time.sleep(60)"))
    started = time.monotonic()
    result = executor.run(invocation(fn, timeout=1.0))
    elapsed = time.monotonic() - started
    assert result.outcome == "timeout"
    assert elapsed < 1.0 + 3.0  # a busy 2-core CI: seconds of slack, not fractions
    grandchild = read_pid(fn_dir / "hang.py.pid", timeout=0)
    assert wait_until(lambda: process_gone(grandchild), timeout=2)


def test_background_child_is_killed_when_the_function_exits(
        fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "leaver", spawn_grandchild("print('done')"))
    started = time.monotonic()
    result = executor.run(invocation(fn, timeout=30))
    # the sleep still holds stdout: only the group kill at exit ends the read
    assert time.monotonic() - started < 5
    assert (result.outcome, result.exit_code) == ("ok", 0)
    assert result.stdout == b"started\ndone\n"
    child = read_pid(fn_dir / "leaver.py.pid", timeout=0)
    assert wait_until(lambda: process_gone(child), timeout=2)


class PeakRSS:
    """Samples this process's RSS in a thread: the peak, not the end state, is the point."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def test_output_flood_is_cut_at_the_cap(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "flood", """
        import sys
        block = b"x" * (1024 * 1024)
        for _ in range(200):
            sys.stdout.buffer.write(block)
    """)
    started = time.monotonic()
    with PeakRSS() as rss:
        result = executor.run(invocation(fn, timeout=30, max_output=1024 * 1024))
    assert result.outcome == "output_too_large"
    assert result.stdout == b""
    assert time.monotonic() - started < 5
    assert rss.growth < 50 * 1024 * 1024, f"RSS grew by {rss.growth / 1024**2:.0f} MB"


def test_output_at_the_cap_is_kept(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "exact",
                         "import sys; sys.stdout.buffer.write(b'z' * (1024 * 1024))")
    result = executor.run(invocation(fn, max_output=1024 * 1024))
    assert result.outcome == "ok"
    assert len(result.stdout) == 1024 * 1024


def test_memory_hog_fails_cleanly(fn_dir: Path, executor: Executor) -> None:
    write_toml(fn_dir, '[functions.hog]\nmemory = "64MB"\n')
    fn = python_function(fn_dir, "hog", """
        hog = bytearray(300 * 1024 * 1024)
        print("allocated", len(hog))
    """)
    assert fn.settings.memory == 64 * 1024 * 1024
    result = executor.run(invocation(fn))
    assert result.outcome == "failed"
    assert result.exit_code not in (0, None) or result.signal is not None
    assert b"allocated" not in result.stdout
    assert b"MemoryError" in result.stderr_tail


def test_memory_limit_leaves_a_normal_function_alone(fn_dir: Path, executor: Executor) -> None:
    write_toml(fn_dir, '[functions.small]\nmemory = "64MB"\n')
    fn = python_function(fn_dir, "small", "data = bytearray(8 * 1024 * 1024); print(len(data))")
    result = executor.run(invocation(fn))
    assert (result.outcome, result.stdout) == ("ok", b"8388608\n")


def test_cancel_from_another_thread_kills_the_group(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "wait", spawn_grandchild("time.sleep(60)"))
    run = executor.submit(invocation(fn, timeout=30))
    grandchild = read_pid(fn_dir / "wait.py.pid")
    leader = psutil.Process(grandchild).ppid()
    started = time.monotonic()
    threading.Thread(target=run.cancel).start()
    result = run.result(timeout=10)
    assert time.monotonic() - started < 5
    assert result.outcome == "cancelled"
    assert wait_until(lambda: process_gone(grandchild) and process_gone(leader), timeout=2)
    assert wait_until(lambda: executor.active == 0, timeout=2)


def test_cancel_before_start_never_spawns(fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    fn = python_function(fn_dir, "marker", "open('started', 'w').close()")
    executor = Executor(1, runtimes)
    try:
        blocker = python_function(fn_dir, "block", "import time; time.sleep(0.5)")
        first = executor.submit(invocation(blocker))
        queued = executor.submit(invocation(fn))
        queued.cancel()
        assert queued.result(timeout=5).outcome == "cancelled"
        assert first.result(timeout=5).outcome == "ok"
    finally:
        executor.shutdown()
    assert not (fn_dir / "started").exists()


SLOW = """
    import json, os, sys, time
    ctx = json.loads(os.environ["FN_CONTEXT"])
    with open(ctx["request_id"] + ".started", "w") as f:
        f.write(str(ctx["deadline"]))
    time.sleep(float(sys.stdin.read() or 0))
    print(ctx["deadline"])
"""


def test_queue_wait_counts_against_the_deadline(
        fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    fn = python_function(fn_dir, "slow", SLOW)
    executor = Executor(1, runtimes)
    try:
        first = executor.submit(invocation(fn, b"1.0", timeout=5, request_id="first"))
        second = executor.submit(invocation(fn, b"0", timeout=5, request_id="second"))
        results = first.result(timeout=10), second.result(timeout=10)
    finally:
        executor.shutdown()
    assert [r.outcome for r in results] == ["ok", "ok"]
    assert float(results[0].stdout) > 4.5
    # the second waited about a second for the only worker
    assert float(results[1].stdout) < 4.2
    assert results[1].context.deadline == float(results[1].stdout)


def test_queue_wait_past_the_deadline_times_out_without_spawning(
        fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    fn = python_function(fn_dir, "slow", SLOW)
    executor = Executor(1, runtimes)
    try:
        first = executor.submit(invocation(fn, b"1.0", timeout=5, request_id="first"))
        second = executor.submit(invocation(fn, b"0", timeout=0.5, request_id="second"))
        second_result = second.result(timeout=10)
        assert first.result(timeout=10).outcome == "ok"
    finally:
        executor.shutdown()
    assert second_result.outcome == "timeout"
    assert second_result.context.deadline == 0
    assert (fn_dir / "first.started").exists()
    assert not (fn_dir / "second.started").exists()


def test_stderr_lines_reach_the_sink_and_the_tail_is_capped(
        fn_dir: Path, executor: Executor, stderr_lines) -> None:  # type: ignore[no-untyped-def]
    fn = python_function(fn_dir, "noisy", """
        import sys
        sys.stderr.write("first line\\nsecond line\\n")
        for i in range(100):
            sys.stderr.write("%04d " % i + "e" * 1019 + "\\n")
        sys.stderr.write("last line")
        print("out")
    """)
    inv = invocation(fn, request_id="noisy-1")
    result = executor.run(inv)
    assert result.outcome == "ok"
    assert result.stdout == b"out\n"
    assert len(result.stderr_tail) == STDERR_TAIL
    assert result.stderr_tail.endswith(b"e\nlast line")
    lines = stderr_lines.of("noisy-1")
    assert lines[:2] == ["first line", "second line"]
    assert lines[-1] == "last line"  # a last line without a newline is not lost
    assert len(lines) == 103


def test_stderr_logging_is_bounded(fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    seen: list[str] = []
    executor = Executor(1, runtimes, stderr_sink=lambda _inv, line: seen.append(line),
                        stderr_log_limit=10_000)
    fn = python_function(fn_dir, "chatty", """
        import sys
        for i in range(1000):
            sys.stderr.write("x" * 99 + "\\n")
    """)
    try:
        result = executor.run(invocation(fn))
    finally:
        executor.shutdown()
    assert result.outcome == "ok"
    assert len(seen) == 101
    assert seen[-1].startswith("[fnserve] ")
    assert seen[-1].endswith(" more bytes of stderr not logged")


def test_each_result_carries_its_own_context(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "rid", "import os; print(os.environ['FN_REQUEST_ID'])")
    runs = [executor.submit(invocation(fn, request_id=f"req-{i}")) for i in range(6)]
    results: list[Result] = [run.result(timeout=10) for run in runs]
    for i, result in enumerate(results):
        assert result.context.request_id == f"req-{i}"
        assert result.stdout == f"req-{i}\n".encode()


def test_no_zombie_and_no_leaked_fd(fn_dir: Path, executor: Executor) -> None:
    fn = python_function(fn_dir, "quick", "print('ok')")
    me = psutil.Process()
    executor.run(invocation(fn))  # warm up: pool threads, imports
    fds = me.num_fds()
    for _ in range(5):
        assert executor.run(invocation(fn, timeout=0.5)).outcome == "ok"
    timeouts = python_function(fn_dir, "sleeper", "import time; time.sleep(30)")
    assert executor.run(invocation(timeouts, timeout=0.3)).outcome == "timeout"
    assert me.num_fds() == fds
    assert not [child for child in me.children(recursive=True)
                if child.status() == psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("event", [b"", b"{}"])
def test_exec_function(fn_dir: Path, executor: Executor, event: bytes) -> None:
    write_function(fn_dir, "upper.sh", "#!/bin/sh\ntr a-z A-Z\n", executable=True)
    result = executor.run(invocation(spec(fn_dir, "upper"), event + b"abc"))
    assert (result.outcome, result.stdout) == ("ok", event.upper() + b"ABC")


def test_python_setting_chooses_the_interpreter(fn_dir: Path, executor: Executor) -> None:
    wrapper = write_function(fn_dir.parent, "mypython", f"""
        #!/bin/sh
        echo wrapped
        exec {PYTHON} "$@"
    """, executable=True)
    write_toml(fn_dir, f'[functions.which]\npython = "{wrapper}"\n')
    fn = python_function(fn_dir, "which", "print('inner')")
    result = executor.run(invocation(fn))
    assert result.stdout == b"wrapped\ninner\n"
