"""The process lifecycle: one frozen Invocation in, one Result out.

Knows nothing of HTTP. Each invocation is one fresh process in its own session
(start_new_session keeps CPython's vfork fast path; preexec_fn would force a real
fork and is unsafe in a threaded server). One thread per invocation multiplexes
stdin, stdout, stderr, the process's pidfd and a cancel eventfd with poll(), so:
- stdout is capped while it is read (communicate() would buffer everything);
- the deadline, a cancel or an overflow SIGKILLs the whole process group, and a
  grandchild that still holds the pipes cannot keep the request open;
- when the main process exits, whatever it left running in its group is killed.
A grandchild that calls setsid() leaves the group and cannot be reached by a
group kill; its pipes are closed on it after EXIT_GRACE, and in a process that
is a subreaper (the server's worker, `fnserve run`) reaper.py kills and reaps it
once the invocation has ended.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import Context, function_environment
from .reaper import REAPER, kill_group
from .registry import FunctionSpec
from .runtimes import RUN_CANCELLED, BuildCancelled, BuildError, Runner, Runtime
from .sandbox import exit_status, sandbox_argv

STDERR_TAIL = 64 * 1024
LOG_TAIL = 4096
MAX_STDERR_LINE = 16 * 1024
READ_CHUNK = 64 * 1024
INLINE_WAIT_SLICE = 0.05  # seconds between looks at a cancel while waiting for a slot
EXIT_GRACE = 0.2  # seconds an exited function's leftover pipe holders get before we stop reading
DEFAULT_MAX_OUTPUT = 6 * 1024 * 1024
# a fixed search path: the memory wrapper must not depend on the caller's PATH
_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# Popen errors that say the server itself is out of processes, descriptors or memory:
# the function is not to blame (503 unavailable), unlike a missing or unrunnable file
SERVER_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})

_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_POLL_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


@dataclass(frozen=True)
class Invocation:
    spec: FunctionSpec
    context: Context
    event: bytes
    deadline_at: float  # time.monotonic() by which the function must be done
    base_env: Mapping[str, str] = field(default_factory=dict)
    max_output: int = DEFAULT_MAX_OUTPUT
    client_context: Any = None  # Lambda's ClientContext (SPEC §9), for the handler's context


@dataclass(frozen=True)
class Result:
    outcome: str
    context: Context
    stdout: bytes = b""
    stderr_tail: bytes = b""
    exit_code: int | None = None
    signal: int | None = None
    duration: float = 0.0  # seconds from spawn to reap
    error: str = ""  # build error or start failure, for the caller
    # a Python handler's exception (fork/warm mode), as Lambda reports it
    error_type: str = ""
    error_message: str = ""
    stack_trace: tuple[str, ...] = ()
    max_rss_kb: int | None = None  # peak RSS of the function's process, when known
    # fork/warm: the last LOG_TAIL bytes of the lines the handler printed (stdout) and
    # wrote to stderr, in order, for Lambda's Tail log (process mode: stderr_tail)
    log_tail: bytes = b""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


StderrSink = Callable[[Invocation, str], None]
LineSink = StderrSink  # a handler's stdout lines (fork/warm) go to one of these too


@dataclass
class Job:
    """One invocation as a mode runner (fork, warm) gets it: what process mode has at spawn."""

    invocation: Invocation
    context: Context  # stamped: the deadline as the function sees it
    deadline: float  # time.monotonic()
    run: Run  # attach a wake fd to hear a cancel from another thread
    stderr: LineLog
    stdout: LineLog
    # the one argv builder (memory limit, sandbox): (argv, readable=()) -> argv
    process_argv: Callable[..., list[str]]


class Run:
    """A submitted invocation: its future, and cancel() for another thread.

    An inline run (fork/warm: its runner only waits on descriptors) executes in the
    first thread that asks for its result, with no hand-off to a pool thread; that
    call returns when the run is done, whatever its timeout: the run's own deadline
    and a cancel bound it, and a hangup of `hangup_fd` (the client's socket, set by
    the caller) cancels it.
    """

    def __init__(self, invocation: Invocation) -> None:
        self.invocation = invocation
        self.future: Future[Result] = Future()
        self.hangup_fd = -1
        # given the poll events seen on hangup_fd, is the client gone? None: any hangup
        # is (app.py sets disconnect.ClientWatch.hangup: a half-close is not)
        self.client_gone: Callable[[int], bool] | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._wake_fd = -1
        self.cancel_event = threading.Event()  # ends a wait for a build (runtimes/go.py)
        self._inline: Callable[[Run], None] | None = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self.cancel_event.set()
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def result(self, timeout: float | None = None) -> Result:
        if self._inline is not None:
            with self._lock:
                execute, self._inline = self._inline, None
            if execute is not None:
                execute(self)
        return self.future.result(timeout)

    def _attach(self, wake_fd: int) -> bool:
        with self._lock:
            self._wake_fd = wake_fd
            return self._cancelled

    def _detach(self) -> None:
        with self._lock:
            os.close(self._wake_fd)
            self._wake_fd = -1


class Executor:
    def __init__(
        self,
        workers: int,
        runtimes: Mapping[str, Runtime],
        stderr_sink: StderrSink | None = None,
        stderr_log_limit: int | None = 1024 * 1024,
        stdout_sink: LineSink | None = None,
        bwrap: str | None = None,
    ) -> None:
        self.runtimes = runtimes
        self.bwrap = bwrap  # for isolation = "sandbox" (sandbox.find_bwrap on the server's PATH)
        self.stderr_sink = stderr_sink
        self.stdout_sink = stdout_sink
        self.stderr_log_limit = stderr_log_limit
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fnserve-run")
        # inline runs hold no pool thread: --workers bounds them with these slots
        self._inline_slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._active: set[Run] = set()
        # The memory limit is RLIMIT_DATA set by util-linux prlimit, which then execs
        # the function (same pid, ~1 ms). Not preexec_fn (unsafe with threads, and a
        # real fork), not prlimit(pid) after spawn (the function runs unlimited until
        # then). Without prlimit: `sh -c 'ulimit -d'`, same effect, one more exec.
        self._prlimit = shutil.which("prlimit", path=_SYSTEM_PATH)

    # -- public API -------------------------------------------------------------

    def submit(self, invocation: Invocation, inline: bool = False) -> Run:
        """Queue it on the pool. `inline`: the caller waits for the result at once, so a
        run that needs no thread of its own (fork/warm) runs in the caller's thread."""
        run = Run(invocation)
        with self._lock:
            self._active.add(run)
        spec = invocation.spec
        if inline and self.runtimes[spec.runtime].runner(spec) is not None:
            run._inline = self._run_inline
            return run
        try:
            self._pool.submit(self._run_into_future, run)
        except RuntimeError:  # pool shut down: the server is stopping
            self._forget(run)
            run.future.set_result(Result("cancelled", invocation.context))
        return run

    def run(self, invocation: Invocation) -> Result:
        """Run in the calling thread (the CLI has no use for a pool)."""
        run = Run(invocation)
        with self._lock:
            self._active.add(run)
        try:
            return self._execute(run)
        finally:
            self._forget(run)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def kill_all(self) -> None:
        """Cancel every queued or running invocation and any build: the server stops."""
        with self._lock:
            runs = list(self._active)
        for run in runs:
            run.cancel()
        for runtime in self.runtimes.values():
            runtime.kill_all()

    def shutdown(self) -> None:
        self.kill_all()
        self._pool.shutdown(wait=True, cancel_futures=False)
        if REAPER.started:  # every invocation has ended: whatever escaped goes too
            REAPER.kill_all_orphans()

    # -- one invocation ---------------------------------------------------------

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._active.discard(run)

    def _run_inline(self, run: Run) -> None:
        """In the caller's thread, once one of --workers slots is free (waiting counts
        against the deadline, as in the pool's queue)."""
        while not self._inline_slots.acquire(timeout=INLINE_WAIT_SLICE):
            if run.cancelled or time.monotonic() >= run.invocation.deadline_at:
                outcome = "cancelled" if run.cancelled else "timeout"
                if run.future.set_running_or_notify_cancel():
                    run.future.set_result(Result(outcome, run.invocation.context.started(0.0)))
                self._forget(run)
                return
        try:
            self._run_into_future(run)
        finally:
            self._inline_slots.release()

    def _run_into_future(self, run: Run) -> None:
        if not run.future.set_running_or_notify_cancel():
            self._forget(run)
            return
        try:
            result = self._execute(run)
        except BaseException as exc:  # surfaced to the waiting request as a 500
            run.future.set_exception(exc)
        else:
            run.future.set_result(result)
        finally:
            self._forget(run)

    def _execute(self, run: Run) -> Result:
        # escaped descendants of this invocation are left alone while it runs, and
        # killed by the reaper (when the process is a subreaper) once it has ended
        request_id = run.invocation.context.request_id
        REAPER.invocation_started(request_id)
        try:
            return self._execute_started(run)
        finally:
            REAPER.invocation_ended(request_id)

    def _execute_started(self, run: Run) -> Result:
        invocation = run.invocation
        spec = invocation.spec
        if run.cancelled:
            return Result("cancelled", invocation.context)
        if spec.settings.sandboxed and self.bwrap is None:  # checked at startup; a dev
            return Result("failed", invocation.context, exit_code=127,  # reload may change it
                          error=f'cannot start {spec.name}: isolation = "sandbox" and no '
                                f"bwrap on PATH")
        runner = self.runtimes[spec.runtime].runner(spec)
        if runner is not None:
            return self._execute_with(runner, run)
        build_started = time.monotonic()
        token = RUN_CANCELLED.set(run.cancel_event)
        try:
            command = self.runtimes[spec.runtime].command(spec)
        except BuildCancelled:
            return Result("cancelled", invocation.context)
        except BuildError as exc:
            return Result("build_failed", invocation.context, error=str(exc))
        finally:
            RUN_CANCELLED.reset(token)
        # a build is FnServe's work, not the function's: it does not use up its deadline
        now = time.monotonic()
        deadline = invocation.deadline_at + (now - build_started)
        remaining = deadline - now
        if remaining <= 0:  # used up waiting in the queue
            return Result("timeout", invocation.context.started(0.0))
        if run.cancelled:
            return Result("cancelled", invocation.context)
        context = invocation.context.started(remaining)
        argv = self.process_argv(command.argv, spec)
        started = time.monotonic()
        try:
            with REAPER.spawning():
                proc = subprocess.Popen(
                    argv, cwd=command.cwd,
                    env={**command.env, **function_environment(context, invocation.base_env)},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                REAPER.adopt(proc.pid)
        except OSError as exc:
            if exc.errno in SERVER_EXHAUSTED:  # FnServe's fault, not the function's
                return Result("unavailable", context,
                              error=f"cannot start {spec.name}: {exc.strerror}")
            code = 127 if exc.errno == errno.ENOENT else 126
            return Result("failed", context, exit_code=code,
                          error=f"cannot start {spec.name}: {exc.strerror}")
        stderr = _StderrLines(invocation, self.stderr_sink, self.stderr_log_limit)
        try:
            outcome, stdout = _Communication(proc, run, invocation, stderr, deadline).run()
        except BaseException:  # Ctrl-C in `fnserve run`, or a bug: never leave it running
            kill_group(proc.pid)
            proc.wait()
            REAPER.release(proc.pid)
            raise
        returncode, max_rss_kb = _reap(proc)
        REAPER.release(proc.pid)
        if spec.settings.sandboxed:
            returncode = exit_status(returncode)
        duration = time.monotonic() - started
        stderr.close()
        if outcome is None:
            outcome = "ok" if returncode == 0 else "failed"
        return Result(
            outcome, context, stdout=stdout, stderr_tail=stderr.tail(),
            exit_code=returncode if returncode >= 0 else None,
            signal=-returncode if returncode < 0 else None,
            duration=duration, max_rss_kb=max_rss_kb,
        )

    def _execute_with(self, runner: Runner, run: Run) -> Result:
        """fork and warm modes: the runner owns the process; deadline, cancel and the
        output cap hold as in process mode (it gets them in the Job)."""
        invocation = run.invocation
        remaining = invocation.deadline_at - time.monotonic()
        if remaining <= 0:  # used up waiting in the queue
            return Result("timeout", invocation.context.started(0.0))
        context = invocation.context.started(remaining)
        transcript = bytearray()  # what the handler printed and logged, in order
        stderr = LineLog(invocation, self.stderr_sink, self.stderr_log_limit, transcript)
        stdout = LineLog(invocation, self.stdout_sink, self.stderr_log_limit, transcript)
        job = Job(invocation, context, invocation.deadline_at, run, stderr, stdout,
                  functools.partial(self.process_argv, spec=invocation.spec))
        try:
            result = runner.run(job)
        except OSError as exc:  # no descriptors for the invocation's channel and pipes
            if exc.errno not in SERVER_EXHAUSTED:
                raise
            result = Result("unavailable", context,
                            error=f"cannot start {invocation.spec.name}: {exc.strerror}")
        stderr.close()
        stdout.close()
        tail = stderr.tail()
        result = dataclasses.replace(result, log_tail=bytes(transcript))
        return dataclasses.replace(result, stderr_tail=tail) if tail else result

    def process_argv(self, argv: Sequence[str], spec: FunctionSpec,
                     readable: Sequence[str | Path] = ()) -> list[str]:
        """The argv that starts any process of `spec`: a process-mode run, a fork server or
        a warm pool process. The one place a wrapper (memory limit, sandbox) is added.

        Every runtime starts its processes in `spec.cwd`; `readable`: files the process
        needs besides its program and the function (the fork/warm bootstrap script)."""
        if spec.settings.sandboxed:
            if self.bwrap is None:  # never quietly without the walls asked for
                raise OSError(errno.ENOENT, 'isolation = "sandbox" and no bwrap on PATH')
            argv = sandbox_argv(self.bwrap, spec, argv, spec.cwd, readable)
        # the memory limit goes outside: bwrap and the function inherit it
        return self._with_memory_limit(tuple(argv), spec.settings.memory)

    def _with_memory_limit(self, argv: tuple[str, ...], memory: int | None) -> list[str]:
        if not memory:
            return list(argv)
        if self._prlimit:
            return [self._prlimit, f"--data={memory}", "--", *argv]
        return ["/bin/sh", "-c", 'ulimit -d "$0" && exec "$@"', str(max(memory // 1024, 1)), *argv]


class _Communication:
    """communicate() with a capped stdout, a deadline, a cancel fd and the pidfd."""

    def __init__(self, proc: subprocess.Popen[bytes], run: Run, invocation: Invocation,
                 stderr: _StderrLines, deadline: float) -> None:
        self.proc = proc
        self.run_handle = run
        self.invocation = invocation
        self.stderr = stderr
        self.deadline = deadline
        self.stdout: list[bytes] = []
        self.stdout_size = 0
        self.outcome: str | None = None
        self.exited_at: float | None = None
        assert proc.stdin and proc.stdout and proc.stderr
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()
        self.stderr_fd = proc.stderr.fileno()
        self.event = memoryview(invocation.event)
        self.written = 0
        self.poller = select.poll()
        self.reading = {self.stdout_fd, self.stderr_fd}
        self.pidfd = -1
        self.wake_fd = -1

    def run(self) -> tuple[str | None, bytes]:
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            if self.run_handle._attach(self.wake_fd):
                self._kill("cancelled")
            self._setup()
            self._loop()
        finally:
            self.run_handle._detach()
            self._close()
        if self.outcome is not None:
            self.stdout = []
            self.stdout_size = 0
        return self.outcome, b"".join(self.stdout)

    def _setup(self) -> None:
        for fd in (self.stdout_fd, self.stderr_fd):
            self.poller.register(fd, _POLL_IN)
        self.poller.register(self.wake_fd, select.POLLIN)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
            self.poller.register(self.pidfd, select.POLLIN)
        except OSError:  # no pidfd (old kernel): exit is checked with waitid on each wakeup
            self.pidfd = -1
        if self.event:
            os.set_blocking(self.stdin_fd, False)
            self.poller.register(self.stdin_fd, _POLL_OUT)
        else:
            self._close_stdin()

    def _loop(self) -> None:
        while self.outcome is None:
            now = time.monotonic()
            if self.exited_at is None:
                if now >= self.deadline:
                    self._kill("timeout")
                    return
                if self.pidfd < 0 and _has_exited(self.proc.pid):
                    self._leader_exited(now)
                    continue
                until = self.deadline
                if self.pidfd < 0:
                    until = min(until, now + 0.02)
            else:
                if not self.reading or now >= self.exited_at + EXIT_GRACE:
                    return
                until = self.exited_at + EXIT_GRACE
            try:
                events = self.poller.poll(max(0.0, until - now) * 1000 + 1)
            except InterruptedError:
                continue
            for fd, mask in events:
                self._handle(fd, mask)
                if self.outcome is not None or (self.exited_at is not None
                                                and not self.reading):
                    return

    def _handle(self, fd: int, mask: int) -> None:
        if fd == self.stdout_fd or fd == self.stderr_fd:
            data = os.read(fd, READ_CHUNK)
            if not data:
                self.poller.unregister(fd)
                self.reading.discard(fd)
            elif fd == self.stdout_fd:
                self.stdout_size += len(data)
                if self.stdout_size > self.invocation.max_output:
                    self._kill("output_too_large")
                else:
                    self.stdout.append(data)
            else:
                self.stderr.feed(data)
        elif fd == self.stdin_fd:
            self._write_stdin(mask)
        elif fd == self.pidfd:
            self.poller.unregister(fd)
            self._leader_exited(time.monotonic())
        elif fd == self.wake_fd:
            self._cancelled()

    def _write_stdin(self, mask: int) -> None:
        if mask & (select.POLLHUP | select.POLLERR):
            self._close_stdin()
            return
        try:
            chunk = self.event[self.written:self.written + READ_CHUNK]
            self.written += os.write(self.stdin_fd, chunk)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the function does not read its stdin, that is its right
            self._close_stdin()
            return
        if self.written >= len(self.event):
            self._close_stdin()

    def _close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            try:
                self.poller.unregister(self.stdin_fd)
            except KeyError:
                pass  # never registered: an empty event
            try:
                self.proc.stdin.close()
            except OSError:
                pass  # EPIPE on flush of an already-dead reader; nothing is lost

    def _leader_exited(self, now: float) -> None:
        self.exited_at = now
        # the function is done; whatever it left running in its group goes with it
        kill_group(self.proc.pid)

    def _cancelled(self) -> None:
        if self.exited_at is None and not _has_exited(self.proc.pid):
            self._kill("cancelled")
            return
        # The main process has exited (its pidfd may not have been handled yet): its
        # result stands. The cancel only cuts short the wait for leftover pipe holders.
        if self.exited_at is None:
            self._leader_exited(time.monotonic())
        self.poller.unregister(self.wake_fd)
        self._read_what_is_buffered()
        self.reading.clear()

    def _read_what_is_buffered(self) -> None:
        """What the function wrote before it exited, without waiting for more."""
        for fd in list(self.reading):
            for _ in range(64):  # a bound: an escaped writer could refill the pipe forever
                ready = select.poll()
                ready.register(fd, _POLL_IN)
                if not ready.poll(0) or fd not in self.reading or self.outcome is not None:
                    break
                self._handle(fd, select.POLLIN)

    def _kill(self, outcome: str) -> None:
        self.outcome = outcome
        kill_group(self.proc.pid)

    def _close(self) -> None:
        self._close_stdin()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, int | None]:
    """Reap the leader with wait4, for its peak RSS (Lambda's Max Memory Used): its
    returncode as Popen reports it, and ru_maxrss in KiB (Linux's unit)."""
    if proc.returncode is not None:  # already reaped (cannot happen here, but be exact)
        return proc.returncode, None
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere: the status is lost, as Popen says
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss


def _has_exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, so the group id stays reserved for kill_group
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


class _StderrLines:
    """Keeps the last STDERR_TAIL bytes and hands each line to the sink (bounded)."""

    def __init__(self, invocation: Invocation, sink: StderrSink | None, limit: int | None,
                 transcript: bytearray | None = None) -> None:
        self.invocation = invocation
        self.sink = sink
        self.limit = limit
        self.transcript = transcript  # shared by a run's stdout and stderr: lines in order
        self._tail = bytearray()
        self._partial = bytearray()
        self._logged = 0
        self._dropped = 0

    def feed(self, data: bytes) -> None:
        self._tail += data
        if len(self._tail) > STDERR_TAIL:
            del self._tail[:len(self._tail) - STDERR_TAIL]
        if self.sink is None:
            return
        if self.limit is not None and self._logged >= self.limit:
            self._dropped += len(data)
            return
        self._partial += data
        *lines, rest = bytes(self._partial).split(b"\n")
        self._partial = bytearray(rest)
        if len(self._partial) > MAX_STDERR_LINE:
            lines.append(rest)
            self._partial.clear()
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        assert self.sink is not None
        if self.limit is not None and self._logged >= self.limit:
            self._dropped += len(line) + 1
            return
        self._logged += len(line) + 1
        if self.transcript is not None:
            self.transcript += line + b"\n"
            if len(self.transcript) > LOG_TAIL:
                del self.transcript[:len(self.transcript) - LOG_TAIL]
        self.sink(self.invocation, line.decode("utf-8", "replace").rstrip("\r"))

    def close(self) -> None:
        if self.sink is None:
            return
        if self._partial:
            self._emit(bytes(self._partial))
            self._partial.clear()
        if self._dropped:
            self.sink(self.invocation, f"[fnserve] {self._dropped} more bytes of stderr not logged")

    def tail(self) -> bytes:
        return bytes(self._tail)


LineLog = _StderrLines  # the name fork/warm runners use: stdout lines are logged the same way
