"""fork mode (SPEC §8): the worker's client of one function's fork server.

The fork server (_bootstrap.py, single-threaded, started by this worker like any
function process) has imported the module once. Per invocation we make the
channel and the two output pipes here and pass them over the control socket
(SCM_RIGHTS): the event and the result never go through the fork server. It
forks a child in its own session and answers its pid; we watch the child with a
pidfd (pidfd_open works on a process that is not ours), kill its group when it is
done, at the deadline or on a cancel, and only then tell the fork server to reap
it, so its group id is never reused under our kill.

A dead fork server is started again by the next invocation; its death fails only
the invocations it was serving.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

from ..reaper import kill_group
from ..registry import FunctionSpec
from .channel import (
    Booted,
    Reply,
    attach_cancel,
    boot,
    channel_and_pipes,
    outcome_result,
    readable,
    request_frame,
)

if TYPE_CHECKING:
    from ..executor import Job, Result

FORK_REPLY_SIZE = 4
REAP_REPLY_SIZE = 12
CONTROL_TIMEOUT = 10.0  # the fork server answers at once; this only catches a wedged one
EXIT_WAIT = 5.0  # after SIGKILL, how long a child may take to be gone
EXIT_SETTLE = 1.0  # how long a child whose channel closed may take to exit by itself


class ForkServerGone(Exception):
    pass


class ForkRunner:
    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.init_error: str | None = None
        self._start_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._server: Booted | None = None
        self._closed = False

    # -- the Runner interface ------------------------------------------------------

    def run(self, job: Job) -> Result:
        wake_fd, cancelled = attach_cancel(job)
        try:
            if cancelled:
                return outcome_result(job, "cancelled", None, 0.0)
            for _attempt in range(2):  # a fork server found dead is started once more
                server, failure = self._server_for(job, wake_fd)
                if failure is not None:
                    return failure
                assert server is not None
                try:
                    return self._invoke(job, server, wake_fd)
                except ForkServerGone:
                    self._discard(server)
            return outcome_result(job, "exited", None, 0.0)
        finally:
            job.run._detach()

    def kill_all(self) -> None:
        with self._start_lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            self._stop(server)

    # -- the fork server -----------------------------------------------------------

    def _server_for(self, job: Job, wake_fd: int) -> tuple[Booted | None, Result | None]:
        remaining = job.deadline - time.monotonic()
        if remaining <= 0 or not self._start_lock.acquire(timeout=remaining):
            return None, outcome_result(job, "timeout", None, 0.0)
        try:
            if self._closed:
                return None, outcome_result(job, "cancelled", None, 0.0)
            server = self._server
            if server is not None and server.alive():
                return server, None
            if server is not None:
                self._server = None
                self._stop(server)
            server, failure = boot(job, "fork", wake_fd)
            if failure is not None:
                if failure.outcome == "init_failed":
                    self.init_error = failure.error
                return None, failure
            assert server is not None
            self.init_error = None
            server.close_output()  # the fork server writes nothing more; its children do
            server.channel.setblocking(True)
            server.channel.settimeout(CONTROL_TIMEOUT)
            self._server = server
            return server, None
        finally:
            self._start_lock.release()

    def _discard(self, server: Booted) -> None:
        with self._start_lock:
            if self._server is server:
                self._server = None
        self._stop(server)

    def _stop(self, server: Booted) -> None:
        # closing the control socket makes it kill and reap its children, then exit
        server.channel.close()
        try:
            server.proc.wait(timeout=2.0)
        except Exception:
            pass
        server.kill()

    def _tell(self, server: Booted, message: bytes) -> None:
        try:
            with self._control_lock:
                server.channel.send(message)
        except OSError:
            pass  # the fork server is gone; its children went with it

    def _ask_fork(self, server: Booted, fds: list[int]) -> tuple[bytes, int, int]:
        """"F" with the child's descriptors: its pid as the fork server sees it, and a
        pidfd of it (our only handle on it when the fork server is in a PID namespace);
        from a walled fork server also a pidfd of the handler's process (WalledChild
        in _bootstrap.py), or -1."""
        try:
            with self._control_lock:
                socket.send_fds(server.channel, [b"F"], fds)
                answer, pidfds, _flags, _addr = socket.recv_fds(server.channel,
                                                                FORK_REPLY_SIZE, 2)
        except OSError:
            answer, pidfds = b"", []
        if len(answer) != FORK_REPLY_SIZE:
            for fd in pidfds:
                os.close(fd)
            raise ForkServerGone()
        pidfds += [-1, -1]
        return answer, pidfds[0], pidfds[1]

    def _ask(self, server: Booted, message: bytes, fds: list[int], size: int) -> bytes:
        try:
            with self._control_lock:
                socket.send_fds(server.channel, [message], fds)
                answer = server.channel.recv(size)
        except OSError:
            answer = b""
        if len(answer) != size:
            raise ForkServerGone()
        return answer

    # -- one invocation -------------------------------------------------------------

    def _invoke(self, job: Job, server: Booted, wake_fd: int) -> Result:
        # an OSError here (EMFILE) leaves nothing open; the executor answers 503
        ours, theirs, (out_r, out_w), (err_r, err_w) = channel_and_pipes()
        try:
            answer, pidfd, inner_pidfd = self._ask_fork(server, [theirs.fileno(), out_w, err_w])
        except ForkServerGone:
            ours.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        pid = int.from_bytes(answer, "big", signed=True)
        child = _Child(pid, pidfd, ours, out_r, err_r, server.same_pid_namespace, inner_pidfd)
        if server.same_pid_namespace is None and pid > 0 and child.pidfd >= 0:
            server.same_pid_namespace = child.in_our_namespace  # read /proc once per server
        if pid <= 0 or child.pidfd < 0:
            if pid > 0:  # no handle on it: it gets EOF on its channel, exits, is reaped
                self._tell(server, b"w" + pid.to_bytes(4, "big", signed=True))
            child.close()
            if pid < 0:  # the fork server could not fork, or wall off, a child: -errno
                from ..executor import Result

                return Result("unavailable", job.context,
                              error=f"cannot start an invocation of {self.spec.name}: "
                                    f"{os.strerror(-pid)}")
            return outcome_result(job, "exited", None, 0.0, returncode=1)
        started = time.monotonic()
        why: str | None = "exited"
        reply: Reply | None = None
        try:
            why, reply = child.exchange(job, wake_fd)
        finally:
            settle = min(EXIT_SETTLE, job.deadline - time.monotonic()) if why == "exited" else 0
            status, rss = self._finish(server, child, need_status=why is not None,
                                       settle=settle)
        duration = time.monotonic() - started
        if why == "exited" and self._closed:  # killed by the shutdown, not by its own doing
            why = "cancelled"
        return outcome_result(job, why, reply, duration, returncode=status, max_rss_kb=rss)

    def _finish(self, server: Booted, child: _Child, need_status: bool,
                settle: float = 0.0) -> tuple[int | None, int | None]:
        """Kill what is left of the child's group, then let the fork server reap it.

        `need_status` (no answer came: how did it end?) waits for the exit status;
        otherwise "w" tells the fork server to reap it when it has exited, without
        an answer: the hot path waits neither for the child's teardown nor for the
        fork server. `settle`: it ended by itself (its channel closed), and may take
        this long to exit before the kill: a walled child's parent ends just after
        the handler's process, with its status, which the kill would replace. A
        walled child's handler process has a group of its own: it is killed by its
        pidfd, first, which also kills what is left in its PID namespace."""
        try:
            if child.inner_pidfd >= 0:  # walled: the handler's process, its namespace with it
                _pidfd_kill(child.inner_pidfd)
                if need_status:  # C reaps it and ends as it did: its status, peak RSS
                    settle = EXIT_SETTLE
            if settle > 0:
                readable(child.pidfd, settle)
            if server.alive():  # else it may have been reaped by init: no group kill then
                kill_group(child.group)
            else:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            if not need_status:
                self._tell(server, b"w" + child.pid.to_bytes(4, "big", signed=True))
                return None, None
            readable(child.pidfd, EXIT_WAIT)
            try:
                answer = self._ask(server, b"W" + child.pid.to_bytes(4, "big", signed=True),
                                   [], REAP_REPLY_SIZE)
            except ForkServerGone:
                return None, None
            status = int.from_bytes(answer[:4], "big", signed=True)
            rss = int.from_bytes(answer[4:], "big")
            if status < 0:
                return None, None
            return _returncode(status), rss or None
        except ProcessLookupError:
            return None, None
        finally:
            child.close()


class _Child:
    """One forked invocation: its pidfd, channel and output pipes. `pid` is its number
    in the fork server's PID namespace (for "W"), `group` in ours (for the group kill):
    they differ when the fork server runs in a sandbox."""

    def __init__(self, pid: int, pidfd: int, channel: socket.socket, out_fd: int,
                 err_fd: int, same_pid_namespace: bool | None, inner_pidfd: int = -1) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.inner_pidfd = inner_pidfd
        self.group = pid
        self.in_our_namespace = bool(same_pid_namespace)
        if not same_pid_namespace:
            ours, nested = _pid_of(pidfd)
            self.group = ours or pid
            self.in_our_namespace = ours == pid and not nested
        self.channel = channel
        self.out_fd = out_fd
        self.err_fd = err_fd
        for fd in (channel.fileno(), out_fd, err_fd):
            os.set_blocking(fd, False)

    def exchange(self, job: Job, wake_fd: int) -> tuple[str | None, Reply | None]:
        from .channel import Exchange

        return Exchange(self.channel.fileno(), self.pidfd, (self.out_fd, self.err_fd),
                        (job.stdout, job.stderr), job.deadline, job.invocation.max_output,
                        wake_fd, job.run.hangup_fd, job.run.client_gone).run(request_frame(job))

    def close(self) -> None:
        self.channel.close()
        for fd in (self.out_fd, self.err_fd, self.pidfd, self.inner_pidfd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.err_fd = self.pidfd = self.inner_pidfd = -1


def _pidfd_kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pid_of(pidfd: int) -> tuple[int | None, bool]:
    """The pid a pidfd refers to as our PID namespace numbers it, and whether the
    process lives in a namespace below ours (its NSpid line has more than one pid)."""
    pid: int | None = None
    nested = True
    if pidfd < 0:
        return pid, nested
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as info:
            for line in info:
                if line.startswith(b"Pid:"):
                    number = int(line.split()[1])
                    pid = number if number > 0 else None
                elif line.startswith(b"NSpid:"):
                    nested = len(line.split()) > 2
    except (OSError, ValueError, IndexError):
        pass
    return pid, nested


def _returncode(status: int) -> int:
    """A raw wait status as Popen's returncode: -N for signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
