"""The worker's side of a fork/warm channel: frames, and one poll loop for one invocation.

The frame layout is repeated in _bootstrap.py (which runs in the function's own
interpreter and imports nothing of fnserve): a request is REQUEST (context length,
client context length, event length, max output) + the context JSON + Lambda's
client context as JSON (empty when none, SPEC §9) + the event; a response is RESPONSE
(kind, payload length, max RSS) + the payload.

`Exchange` is what _Communication is to process mode: it writes the request,
reads the response, logs the process's stdout and stderr lines, and stops at the
process's exit (pidfd), the deadline, a cancel (eventfd) or an oversize response.
It never kills: the runner that owns the process decides how (group kill of a
fork child, replacement of a warm process).
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..reaper import REAPER, kill_group

if TYPE_CHECKING:
    from ..executor import Job, LineLog, Result

REQUEST = struct.Struct(">IIIQ")
RESPONSE = struct.Struct(">BIQ")
READY, OK, ERROR, TOO_LARGE, INIT_FAILED = range(5)
BOOTSTRAP = Path(__file__).with_name("_bootstrap.py")
READ_CHUNK = 256 * 1024

_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


@dataclass(frozen=True)
class Reply:
    kind: int
    payload: bytes
    max_rss_kb: int | None

    def error_fields(self) -> dict[str, Any]:
        """error_type, error_message, stack_trace of an ERROR or INIT_FAILED payload."""
        try:
            fields = json.loads(self.payload)
        except ValueError:
            fields = {}
        return {"error_type": str(fields.get("error_type", "")),
                "error_message": str(fields.get("error_message", "")),
                "stack_trace": tuple(str(line) for line in fields.get("stack_trace", ()))}


def request_frame(job: Job) -> bytes:
    context = job.context.to_json().encode()
    client = job.invocation.client_context
    client_json = b"" if client is None else json.dumps(client).encode()
    event = job.invocation.event
    return (REQUEST.pack(len(context), len(client_json), len(event), job.invocation.max_output)
            + context + client_json + event)


def bootstrap_argv(python: str, mode: str, entry: Path, handler: str | None, memory: int | None,
                   channel_fd: int, walled: bool = False) -> list[str]:
    """`walled`: a sandboxed fork server, whose invocations get walls of their own."""
    memory_mb = (memory or 0) // (1024 * 1024)
    return [python or sys.executable, str(BOOTSTRAP), mode, str(entry), handler or "-",
            str(memory_mb), str(os.getpid()), str(channel_fd), "walled" if walled else "-"]


class Exchange:
    """One request/response on `channel_fd` (non-blocking), watched like a process run."""

    def __init__(self, channel_fd: int, pidfd: int, output_fds: tuple[int, int],
                 logs: tuple[LineLog | None, LineLog | None], deadline: float,
                 max_output: int, wake_fd: int = -1, hangup_fd: int = -1,
                 client_gone: Callable[[int], bool] | None = None) -> None:
        self.channel_fd = channel_fd
        self.pidfd = pidfd
        self.out_fd, self.err_fd = output_fds
        self.logs = logs
        self.deadline = deadline
        self.max_output = max_output
        self.wake_fd = wake_fd
        self.hangup_fd = hangup_fd  # the client's socket: its hangup is a cancel
        self.client_gone = client_gone  # ... if this says so (a half-close is not)
        self.buffer = bytearray()
        self.expected = -1
        self.exited = False

    def run(self, request: bytes = b"") -> tuple[str | None, Reply | None]:
        """(None, reply); or (why, None): "exited", "timeout", "cancelled",
        "output_too_large". `request` is written first, while watching the rest."""
        # a small request fits the socket buffer: written at once, no poll round for it
        pending = self._write(memoryview(request)) if request else memoryview(b"")
        poller = select.poll()
        poller.register(self.channel_fd, _POLL_IN | (select.POLLOUT if pending else 0))
        for fd in (self.out_fd, self.err_fd, self.wake_fd):
            if fd >= 0:
                poller.register(fd, _POLL_IN)
        if self.pidfd >= 0:
            poller.register(self.pidfd, select.POLLIN)
        if self.hangup_fd >= 0:
            poller.register(self.hangup_fd, select.POLLRDHUP)
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                return "timeout", None
            try:
                events = poller.poll((self.deadline - now) * 1000 + 1)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self.channel_fd:
                    if pending and mask & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                        pending = self._write(pending)
                        if not pending:
                            poller.modify(fd, _POLL_IN)
                    if mask & _POLL_IN:
                        why = self._read_channel()
                        if why is not None:
                            return why, None
                        reply = self._reply()
                        if reply is not None:
                            self.drain_output()
                            return None, reply
                elif fd == self.pidfd:
                    self.exited = True
                    poller.unregister(fd)
                    # it may have answered just before it died: take what is there
                    self._read_channel()
                    reply = self._reply()
                    self.drain_output()
                    return (None, reply) if reply is not None else ("exited", None)
                elif fd == self.wake_fd:
                    return "cancelled", None
                elif fd == self.hangup_fd:
                    if self.client_gone is None or self.client_gone(mask):
                        return "cancelled", None
                    poller.modify(fd, 0)  # half-closed: from now on only a reset wakes us
                elif not self._read_output(fd):
                    poller.unregister(fd)

    def _write(self, pending: memoryview) -> memoryview:
        try:
            written = os.write(self.channel_fd, pending[:READ_CHUNK])
        except BlockingIOError:
            return pending
        except OSError:  # the process is gone: its pidfd says so next
            return pending[len(pending):]
        return pending[written:]

    def _read_channel(self) -> str | None:
        while True:
            try:
                data = os.read(self.channel_fd, READ_CHUNK)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                return None if self._reply() is not None else "exited"
            self.buffer += data
            if self.expected < 0 and len(self.buffer) >= RESPONSE.size:
                _kind, length, _rss = RESPONSE.unpack_from(self.buffer)
                if length > self.max_output + 64 * 1024:  # an error payload may be a bit larger
                    return "output_too_large"
                self.expected = RESPONSE.size + length
            if 0 <= self.expected <= len(self.buffer):
                return None

    def _reply(self) -> Reply | None:
        if self.expected < 0 or len(self.buffer) < self.expected:
            return None
        kind, _length, rss = RESPONSE.unpack_from(self.buffer)
        return Reply(kind, bytes(self.buffer[RESPONSE.size:self.expected]), rss or None)

    def _read_output(self, fd: int, drain: bool = False) -> bool:
        """Log what the process wrote; False at EOF (or, draining, when nothing is left)."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return not drain
        except OSError:
            return False
        if not data:
            return False
        log = self.logs[0] if fd == self.out_fd else self.logs[1]
        if log is not None:
            log.feed(data)
        return True

    def drain_output(self) -> None:
        """What the handler printed before it answered is in the pipes already (they are
        non-blocking): log it now, so no line is counted against the next invocation."""
        for fd in (self.out_fd, self.err_fd):
            while fd >= 0 and self._read_output(fd, drain=True):
                pass


class Booted:
    """A bootstrap process this worker started (a fork server or a warm process).

    We are its parent and the only one that reaps it, after the group kill, so the
    group id cannot have been reused when we kill it.
    """

    def __init__(self, proc: subprocess.Popen[bytes], channel: socket.socket, pidfd: int,
                 out_fd: int, err_fd: int) -> None:
        self.proc = proc
        self.channel = channel
        self.pidfd = pidfd
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.served = 0
        self.same_pid_namespace: bool | None = None  # a fork server's: unknown until a fork

    def exchange(self, job: Job, wake_fd: int, request: bytes = b"",
                 max_output: int | None = None) -> tuple[str | None, Reply | None]:
        cap = job.invocation.max_output if max_output is None else max_output
        return Exchange(self.channel.fileno(), self.pidfd, (self.out_fd, self.err_fd),
                        (job.stdout, job.stderr), job.deadline, cap, wake_fd,
                        job.run.hangup_fd, job.run.client_gone).run(request)

    def alive(self) -> bool:
        return not readable(self.pidfd, 0.0)

    def close_output(self) -> None:
        for fd in (self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.err_fd = -1

    def kill(self) -> int:
        """SIGKILL the whole group, reap, close; the wait status as Popen gives it."""
        kill_group(self.proc.pid)
        returncode = self.proc.wait()
        REAPER.release(self.proc.pid)
        self.close_output()
        self.channel.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return returncode


def boot(job: Job, mode: str, wake_fd: int) -> tuple[Booted | None, Result | None]:
    """Start a bootstrap process for `job`'s function and wait for its module to load,
    logging what the import prints as `job`'s lines; (booted, None) or (None, why not)."""
    from ..executor import SERVER_EXHAUSTED, Result

    spec = job.invocation.spec
    settings = spec.settings
    kind = socket.SOCK_SEQPACKET if mode == "fork" else socket.SOCK_STREAM
    walled = mode == "fork" and settings.sandboxed
    # the function's own settings only: a request's forwarded headers must not stay in
    # the environment of the invocations that follow (each one sets its own)
    env = {**job.invocation.base_env, **settings.env, "FN_FUNCTION": spec.name}
    proc: subprocess.Popen[bytes] | None = None
    try:
        ours, theirs, (out_r, out_w), (err_r, err_w) = channel_and_pipes(kind)
    except OSError as exc:  # out of descriptors: nothing was started
        return None, Result("unavailable", job.context,
                            error=f"cannot start {spec.name}: {exc.strerror}")
    try:
        argv = job.process_argv(bootstrap_argv(settings.python or sys.executable, mode,
                                               spec.entry, settings.handler, settings.memory,
                                               theirs.fileno(), walled),
                                readable=(BOOTSTRAP,))  # in a sandbox, it must see the script
        with REAPER.spawning():  # a child we wait for: never an orphan to the reaper
            proc = subprocess.Popen(argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out_w, stderr=err_w, pass_fds=(theirs.fileno(),),
                                    start_new_session=True)
            REAPER.adopt(proc.pid)
        pidfd = os.pidfd_open(proc.pid)
    except OSError as exc:
        ours.close()
        for fd in (out_r, err_r):
            os.close(fd)
        if proc is not None:  # started, but we cannot watch it (no pidfd): it goes
            kill_group(proc.pid)
            proc.wait()
            REAPER.release(proc.pid)
        if exc.errno in SERVER_EXHAUSTED:  # the server's own trouble, not the function's
            return None, Result("unavailable", job.context,
                                error=f"cannot start {spec.name}: {exc.strerror}")
        return None, Result("init_failed", job.context, exit_code=127,
                            error=f"cannot start {spec.name}: {exc.strerror}",
                            error_type=type(exc).__name__, error_message=str(exc.strerror))
    finally:
        theirs.close()
        os.close(out_w)
        os.close(err_w)
    for fd in (ours.fileno(), out_r, err_r):
        os.set_blocking(fd, False)
    booted = Booted(proc, ours, pidfd, out_r, err_r)
    started = time.monotonic()
    why, reply = booted.exchange(job, wake_fd, max_output=1024 * 1024)
    if why is None and reply is not None and reply.kind == READY:
        return booted, None
    returncode = booted.kill()
    duration = time.monotonic() - started
    if why in ("timeout", "cancelled"):
        return None, Result(why, job.context, duration=duration)
    fields = reply.error_fields() if reply is not None else {
        "error_type": "ProcessExited",
        "error_message": f"the {mode} process of {spec.name} exited while importing it "
                         f"({describe_status(returncode)})"}
    return None, Result("init_failed", job.context, duration=duration,
                        error=f"{fields['error_type']}: {fields['error_message']}", **fields)


def channel_and_pipes(kind: int = socket.SOCK_STREAM
                      ) -> tuple[socket.socket, socket.socket, tuple[int, int], tuple[int, int]]:
    """A socketpair (ours, theirs) and two pipes (stdout, stderr: read end, write end);
    all of them, or an OSError (EMFILE...) with none left open."""
    made: list[int] = []
    pair: tuple[socket.socket, socket.socket] | None = None
    try:
        pair = socket.socketpair(socket.AF_UNIX, kind)
        out = os.pipe()
        made += out
        err = os.pipe()
    except OSError:
        for fd in made:
            os.close(fd)
        for sock in pair or ():
            sock.close()
        raise
    return pair[0], pair[1], out, err


def readable(fd: int, timeout: float) -> bool:
    """poll, not select: a descriptor number may be past select's 1024 in a busy server."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def describe_status(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else f"status {returncode}"


def outcome_result(job: Job, why: str | None, reply: Reply | None, duration: float,
                   returncode: int | None = None, max_rss_kb: int | None = None) -> Result:
    """The Result of one exchange: a reply, or why there was none (the process was killed
    already, `returncode` as Popen gives it)."""
    from ..executor import Result

    context = job.context
    rss = max_rss_kb if max_rss_kb is not None else (reply.max_rss_kb if reply else None)
    if why is None and reply is not None:
        if reply.kind == OK:
            return Result("ok", context, stdout=reply.payload, exit_code=0, duration=duration,
                          max_rss_kb=rss)
        if reply.kind == TOO_LARGE:
            return Result("output_too_large", context, duration=duration, max_rss_kb=rss)
        fields = reply.error_fields()
        return Result("failed", context, exit_code=1, duration=duration, max_rss_kb=rss,
                      error=f"{fields['error_type']}: {fields['error_message']}", **fields)
    if why in ("timeout", "cancelled", "output_too_large"):
        return Result(why, context, duration=duration, max_rss_kb=rss)
    code = returncode if returncode is not None else 1
    return Result("failed", context, duration=duration, max_rss_kb=rss,
                  exit_code=code if code >= 0 else None, signal=-code if code < 0 else None)


def attach_cancel(job: Job) -> tuple[int, bool]:
    """An eventfd a cancel from another thread writes to; and whether it came already.
    Give it back with job.run._detach()."""
    wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return wake_fd, job.run._attach(wake_fd)
