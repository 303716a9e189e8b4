"""Waiting for a Go build ends on a cancel or a shutdown, and what the Go runtime
remembers is bounded (memo tables, key locks, binaries on disk). Real builds.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnserve.executor import Executor, Run
from fnserve.registry import FunctionSpec, load_registry
from fnserve.runtimes import BuildCancelled, Runtime
from fnserve.runtimes import go as go_module
from fnserve.runtimes.go import KEEP_BUILDS, GoRuntime, _Bounded

from .helpers import invocation, wait_until, write_function

pytestmark = pytest.mark.go

WAIT_ENDS_WITHIN = 10.0  # seconds; the wait it replaces was BUILD_TIMEOUT, 300 s


def hello_go(text: str) -> str:
    return f'package main\n\nimport "fmt"\n\nfunc main() {{ fmt.Println("{text}") }}\n'


@pytest.fixture
def go(runtimes: dict[str, Runtime]) -> GoRuntime:
    runtime = runtimes["go"]
    assert isinstance(runtime, GoRuntime) and runtime.go is not None
    return runtime


@pytest.fixture
def hi(fn_dir: Path) -> FunctionSpec:
    write_function(fn_dir, "hi.go", hello_go("hi"))
    return load_registry(fn_dir).get("hi")


@pytest.fixture
def cache_lock_held(go: GoRuntime, hi: FunctionSpec) -> Iterator[str]:
    """The key's cache lock, held as by a build in another process; yields the key."""
    key = go.source_key(hi)
    directory = go.binary_path(key).parent
    directory.mkdir(parents=True)
    with open(directory / "lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        yield key


def waiting(go: GoRuntime, key: str, users: int = 1) -> bool:
    """`users` runs are inside the build of `key` (waiting, since the test holds its lock)."""
    entry = go._key_locks.get(key)
    return entry is not None and getattr(entry, "users", 1) >= users


def test_a_cancel_ends_the_wait_for_another_builds_lock(
        runtimes: dict[str, Runtime], go: GoRuntime, hi: FunctionSpec,
        cache_lock_held: str) -> None:
    executor = Executor(2, runtimes)
    try:
        run = executor.submit(invocation(hi, timeout=60))
        assert wait_until(lambda: waiting(go, cache_lock_held), timeout=10)
        run.cancel()
        assert run.result(timeout=WAIT_ENDS_WITHIN).outcome == "cancelled"
        assert go._key_locks == {}  # no lock kept for a key nobody builds
    finally:
        executor.shutdown()


def test_the_second_waiter_on_the_key_lock_can_be_cancelled_too(
        runtimes: dict[str, Runtime], go: GoRuntime, hi: FunctionSpec,
        cache_lock_held: str) -> None:
    executor = Executor(2, runtimes)
    try:
        first = executor.submit(invocation(hi, timeout=120))
        second = executor.submit(invocation(hi, timeout=120))
        # the first waits for the cache lock, holding the key's thread lock; the second
        # waits for that thread lock
        assert wait_until(lambda: go._key_locks.get(cache_lock_held) is not None
                          and go._key_locks[cache_lock_held].users == 2, timeout=10)
        second.cancel()
        assert second.result(timeout=WAIT_ENDS_WITHIN).outcome == "cancelled"
        assert not first.future.done()
    finally:
        executor.shutdown()
    assert first.result(timeout=WAIT_ENDS_WITHIN).outcome == "cancelled"


def test_shutdown_ends_every_wait_and_does_not_hang(
        runtimes: dict[str, Runtime], go: GoRuntime, hi: FunctionSpec,
        cache_lock_held: str) -> None:
    executor = Executor(2, runtimes)
    runs: list[Run] = [executor.submit(invocation(hi, timeout=120)) for _ in range(2)]
    assert wait_until(lambda: waiting(go, cache_lock_held), timeout=10)
    # what worker_exit does: it must return while another process holds the lock
    stopping = threading.Thread(target=executor.shutdown, daemon=True)
    stopping.start()
    stopping.join(timeout=WAIT_ENDS_WITHIN)
    assert not stopping.is_alive(), "Executor.shutdown() hangs on a wait for a Go build"
    assert [run.result(timeout=1).outcome for run in runs] == ["cancelled", "cancelled"]


def test_a_wait_outside_a_run_ends_at_shutdown(go: GoRuntime, hi: FunctionSpec,
                                               cache_lock_held: str) -> None:
    """dev's prebuild in a new worker calls command() from a thread of its own."""
    errors: list[BaseException] = []

    def build() -> None:
        try:
            go.command(hi)
        except BaseException as exc:  # the test reads it
            errors.append(exc)

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    assert wait_until(lambda: waiting(go, cache_lock_held), timeout=10)
    go.kill_all()
    builder.join(timeout=WAIT_ENDS_WITHIN)
    assert not builder.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BuildCancelled)


def test_only_the_newest_builds_of_a_function_stay_on_disk(fn_dir: Path, go: GoRuntime) -> None:
    binaries = []
    for version in range(KEEP_BUILDS + 2):
        write_function(fn_dir, "hi.go", hello_go(f"v{version}"))
        binaries.append(Path(go.command(load_registry(fn_dir).get("hi")).argv[0]))
    kept = sorted(p.name for p in go.cache_dir.iterdir() if p.name.startswith("hi-"))
    assert len(kept) == KEEP_BUILDS
    assert [b.exists() for b in binaries] == [False] * 2 + [True] * KEEP_BUILDS
    # an evicted version is built again when its source comes back
    write_function(fn_dir, "hi.go", hello_go("v0"))
    assert Path(go.command(load_registry(fn_dir).get("hi")).argv[0]).exists()


def test_a_build_another_process_holds_is_not_evicted(fn_dir: Path, go: GoRuntime) -> None:
    write_function(fn_dir, "hi.go", hello_go("held"))
    held = Path(go.command(load_registry(fn_dir).get("hi")).argv[0])
    with open(held.parent / "lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)  # as another process building or waiting for it
        for version in range(KEEP_BUILDS + 1):
            write_function(fn_dir, "hi.go", hello_go(f"v{version}"))
            go.command(load_registry(fn_dir).get("hi"))
        assert held.exists()


def test_the_source_hash_memo_is_bounded(fn_dir: Path, go: GoRuntime,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(go_module, "MAX_HASHES", 3)
    bounded = GoRuntime(go.cache_dir.parent, go.env)
    for version in range(10):
        write_function(fn_dir, "hi.go", hello_go(f"v{version}"))
        bounded.source_key(load_registry(fn_dir).get("hi"))
    assert len(bounded._hashes) == 3


def test_bounded_forgets_the_least_recently_used() -> None:
    table: _Bounded[str, int] = _Bounded(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1  # a is now the most recent
    table.put("c", 3)
    assert (table.get("a"), table.get("b"), table.get("c")) == (1, None, 3)
    assert len(table) == 2
