"""Runs INSIDE the function's interpreter, for the fork and warm modes (SPEC §8).

Started by the server as `<python> _bootstrap.py MODE ENTRY HANDLER MEMORY PARENT FD WALLS` (by
path, so it works under any interpreter the function names with `python = ...`, which
need not have fnserve installed). It imports nothing of fnserve: the frame layout
below is repeated in fnserve/runtimes/channel.py, which is the worker's side.

It imports the function's module once (not as __main__) and then:
- warm: loops on the channel FD: one request frame in, the handler called, one
  response frame out, until the channel closes;
- fork: is a single-threaded fork server on the control socket FD. Each "F"
  message brings three descriptors (SCM_RIGHTS): the invocation's channel and the
  pipes for its stdout and stderr, so the payload never passes through here. A
  child is forked, becomes its own session (the worker kills its group), calls
  the handler on that channel and exits. Its pid goes back to the worker, which
  watches it with a pidfd; the child is reaped only when the worker says "W"
  (after its group kill), so its pid and group id cannot be reused under a kill.
  With WALLS = "walled" (a sandboxed function, SPEC §12) each invocation gets
  walls of its own inside the sandbox: see WalledChild.

The handler's prints go to fd 1 and 2 (pipes the worker logs line by line), never
into the response frame.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import importlib.util
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback
from typing import Any

REQUEST = struct.Struct(">IIIQ")  # context, client context, event lengths; max output
RESPONSE = struct.Struct(">BIQ")  # kind, payload length, max RSS (KiB)
READY, OK, ERROR, TOO_LARGE, INIT_FAILED = range(5)
FORK_REPLY = struct.Struct(">i")  # the child's pid (ours), or -errno; + its pidfd (SCM_RIGHTS)
REAP = struct.Struct(">i")
REAP_REPLY = struct.Struct(">iQ")  # wait status, max RSS (KiB)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV = 0x2, 0x4
CAP_VERSION_3 = 0x20080522
SPARE_READY = b"R"  # + G's pid, as the fork server numbers it
SPARE_FAILED = b"E"
REAP_INTERVAL_MS = 20  # how often a fork server looks for killed children to reap


class LambdaContext(dict):  # type: ignore[type-arg]
    """The keys of FN_CONTEXT (SPEC §2) plus the attributes of an AWS Lambda context."""

    log_stream_name = ""  # one per process, as Lambda's is per execution environment

    def __init__(self, data: dict[str, Any], memory_mb: int, client_context: Any = None) -> None:
        super().__init__(data)
        name = data.get("function", "")
        self.request_id = self.aws_request_id = data.get("request_id", "")
        self.function_name = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{name}"
        self.memory_limit_in_mb = memory_mb
        self.log_group_name = f"/aws/lambda/{name}"
        self.identity = None
        self.client_context = client_context
        self._deadline_ms = int(data.get("deadline_ms") or 0)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


class Function:
    def __init__(self, entry: str, handler_name: str, memory_mb: int) -> None:
        self.entry = entry
        self.handler_name = handler_name
        self.memory_mb = memory_mb
        self.base_env = dict(os.environ)  # what the server started us with (SPEC §2 base)
        self.handler: Any = None
        self.environ = dict(self.base_env)  # what os.environ holds now
        self._snapshot: Any = dict(getattr(os.environ, "_data", {}))
        LambdaContext.log_stream_name = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{os.getpid():x}"

    def load(self) -> bytes | None:
        """Import the module; None, or the INIT_FAILED payload."""
        # as `python ENTRY` would: the function's own directory first on sys.path
        sys.path[0] = os.path.dirname(self.entry)
        module_name = os.path.splitext(os.path.basename(self.entry))[0]
        try:
            spec = importlib.util.spec_from_file_location(module_name, self.entry)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {self.entry}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            # compiled from its source, never from __pycache__: as `python FILE` runs its
            # __main__, and a save within the same second as the last one, of the same
            # size, would otherwise run the old bytecode (the .pyc check is mtime + size)
            with open(self.entry, "rb") as source:
                code = compile(source.read(), self.entry, "exec")
            exec(code, module.__dict__)
        except BaseException as exc:  # a module that raises SystemExit fails to init too
            traceback.print_exc()
            return _error_payload(exc, ())
        names = [self.handler_name] if self.handler_name else ["handler", "lambda_handler"]
        for name in names:
            candidate = getattr(module, name, None)
            if callable(candidate):
                self.handler = candidate
                return None
        wanted = " or ".join(names)
        message = f"{os.path.basename(self.entry)} has no callable named {wanted}"
        print(message, file=sys.stderr)
        return json.dumps({"error_type": "HandlerNotFound", "error_message": message,
                           "stack_trace": []}).encode()

    def invoke(self, frame: bytes, max_output: int, context_length: int,
               client_length: int) -> tuple[int, bytes]:
        context_text = frame[:context_length].decode()
        client_json = frame[context_length:context_length + client_length]
        raw_event = frame[context_length + client_length:]
        data = json.loads(context_text)
        environ = dict(self.base_env)
        environ.update(data.get("env") or {})
        environ["FN_CONTEXT"] = context_text
        environ["FN_FUNCTION"] = data.get("function", "")
        environ["FN_REQUEST_ID"] = data.get("request_id", "")
        self._set_environ(environ)
        try:
            event: Any = json.loads(raw_event) if raw_event else {}
        except ValueError:  # a text body: its text, as Lambda's runtime would not parse it
            event = raw_event.decode("utf-8", "replace")
        client_context = json.loads(client_json) if client_json else None
        context = LambdaContext(data, self.memory_mb, client_context)
        try:
            value = self.handler(event, context)
            if isinstance(value, (bytes, bytearray, memoryview)):
                body = bytes(value)
            else:
                body = json.dumps(value).encode()
        except BaseException as exc:  # the process survives whatever the handler does
            traceback.print_exc()
            tb = exc.__traceback__
            frames = traceback.format_tb(tb.tb_next) if tb is not None else []
            return ERROR, _error_payload(exc, frames)
        finally:
            _flush_std()
        if len(body) > max_output:
            return TOO_LARGE, b""
        return OK, body


    def _set_environ(self, environ: dict[str, str]) -> None:
        """os.environ = environ, touching only what changed (clear() + update() of every
        variable was a quarter of a warm invocation's own time)."""
        current = self.environ
        data = getattr(os.environ, "_data", None)  # CPython's encoded mapping: compared in C
        if data is None or data != self._snapshot:  # the handler changed it: start over
            os.environ.clear()
            current = {}
        for key in [key for key in current if key not in environ]:
            del os.environ[key]
        for key, value in environ.items():
            if current.get(key) != value:
                os.environ[key] = value
        self.environ = environ
        self._snapshot = dict(data) if data is not None else None


def _walls_failure() -> bytes:
    message = ("a sandboxed function in fork mode needs nested user namespaces, to give "
               "each invocation its own /tmp and PID namespace; this machine refuses them "
               "(see the lines above)")
    print(message, file=sys.stderr)
    return json.dumps({"error_type": "SandboxUnavailable", "error_message": message,
                       "stack_trace": []}).encode()


def _error_payload(exc: BaseException, frames: Any) -> bytes:
    return json.dumps({"error_type": type(exc).__name__, "error_message": str(exc),
                       "stack_trace": list(frames)}).encode()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # the worker closed its end: the output has nowhere to go


def _max_rss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return bytes(buffer)


def _send_response(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(RESPONSE.pack(kind, len(payload), _max_rss_kb()) + payload)


def serve_one(function: Function, channel: socket.socket) -> bool:
    """One request frame in, one response frame out; False when the channel closed."""
    header = _recv_exact(channel, REQUEST.size)
    if header is None:
        return False
    context_length, client_length, event_length, max_output = REQUEST.unpack(header)
    frame = _recv_exact(channel, context_length + client_length + event_length)
    if frame is None:
        return False
    kind, payload = function.invoke(frame, max_output, context_length, client_length)
    _send_response(channel, kind, payload)
    return True


def serve_on(function: Function, fds: list[int]) -> None:
    """A forked child's one invocation, on the descriptors the worker passed."""
    channel_fd, out_fd, err_fd = fds
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    with socket.socket(fileno=channel_fd) as channel:
        serve_one(function, channel)


_libc: Any = None


def _c_library() -> Any:
    """libc, loaded once in the fork server, before its children inherit it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL when the process that started us dies, so nothing outlives the server.

    `parent`, when known, closes the window before the prctl. A bootstrap's own
    parent may be a wrapper in another PID namespace (bwrap): no check there; its
    channel closing (EOF) ends it too."""
    try:
        _c_library().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def run_warm(function: Function, channel: socket.socket) -> None:
    while serve_one(function, channel):
        pass


class ForkServer:
    """Single-threaded: forks one child per "F" message, reaps one per "W" message."""

    def __init__(self, function: Function, control: socket.socket, walled: bool = False) -> None:
        self.function = function
        self.control = control
        self.children: set[int] = set()
        self.reapable: set[int] = set()  # group killed by the worker: reap once exited
        self.walled = walled
        # walled: the next invocation's child, made ahead (-errno: making it failed)
        self.spare: WalledChild | int | None = None

    def run(self) -> None:
        # quiet from here: the children get their own fd 1 and 2; our own pipes are done
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        gc.freeze()  # what the import made is never collected in a child: fewer copied pages
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        while True:
            if self.reapable:
                self.reap_exited()
                if self.reapable and not poller.poll(REAP_INTERVAL_MS):
                    continue
            try:
                message, fds, _flags, _addr = socket.recv_fds(self.control, 64, 3)
            except OSError:
                message, fds = b"", []
            if not message:  # the worker is gone or stopping: nothing of ours outlives it
                self.stop()
                return
            if message[:1] == b"F" and len(fds) == 3:
                inner = 0
                if self.walled:
                    pid, inner = self.hand_over(fds)
                else:
                    pid = self.fork(fds)
                self.send_fork_reply(pid, inner)
                if self.walled and self.spare is None:  # after the reply: off its path
                    self.spare = WalledChild.make(self)
                continue
            for fd in fds:
                os.close(fd)
            if message[:1] == b"W":
                (pid,) = REAP.unpack(message[1:1 + REAP.size])
                self.control.send(self.reap(pid))
            elif message[:1] == b"w":
                (pid,) = REAP.unpack(message[1:1 + REAP.size])
                if pid in self.children:
                    self.reapable.add(pid)

    def fork(self, fds: list[int]) -> int:
        try:
            pid = os.fork()
        except OSError as exc:
            pid = -(exc.errno or 1)
        if pid == 0:  # the child: one invocation, then exit without any cleanup
            code = 0
            try:
                os.setsid()
                self.control.close()
                _die_with_parent(os.getppid())
                serve_on(self.function, fds)
            except BaseException:  # nothing may escape into a copy of the server's loop
                code = 70
            finally:
                _flush_std()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            self.children.add(pid)
        return pid

    def hand_over(self, fds: list[int]) -> tuple[int, int]:
        """Walled: the spare child takes the invocation (a new one is made if there is
        none, or it failed: once, so a passing failure fails no call). (C's pid, G's
        pid), or (-errno, 0) when no walled child could be had."""
        spare, self.spare = self.spare, None
        failure = -errno.EAGAIN
        try:
            for _attempt in range(2):
                if not isinstance(spare, WalledChild):
                    spare = WalledChild.make(self)
                if isinstance(spare, int):
                    failure, spare = spare, None
                    continue
                pid = spare.take(fds)
                if pid > 0:
                    self.children.add(pid)
                    return pid, spare.inner
                failure, spare = pid, None
            return failure, 0
        finally:
            for fd in fds:
                os.close(fd)

    def send_fork_reply(self, pid: int, inner: int = 0) -> None:
        """The pid as we see it, and a pidfd of the child: in a sandbox's PID namespace
        the worker cannot use our pid numbers, but it can use the pidfd (and read its
        own number for the child from it). Walled: a second pidfd, of the handler's
        process (G), which the worker kills first: killing it ends its namespace."""
        pidfds = []
        for number in (pid, inner):
            if number > 0:
                try:
                    pidfds.append(os.pidfd_open(number))
                except OSError:
                    break
        try:
            socket.send_fds(self.control, [FORK_REPLY.pack(pid)], pidfds)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)

    def reap_exited(self) -> None:
        for pid in list(self.reapable):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                self.reapable.discard(pid)
                self.children.discard(pid)

    def reap(self, pid: int) -> bytes:
        # only ever asked once the worker saw the child exit: this does not block
        if pid not in self.children:
            return REAP_REPLY.pack(-1, 0)
        _, status, usage = os.wait4(pid, 0)
        self.children.discard(pid)
        self.reapable.discard(pid)
        return REAP_REPLY.pack(status, int(usage.ru_maxrss))

    def stop(self) -> None:
        if isinstance(self.spare, WalledChild) and self.spare.failure is None:
            self.spare.discard()
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in self.children:
            os.waitpid(pid, 0)


class WalledChild:
    """A sandboxed function's forked invocation, with walls of its own (SPEC §12).

    The fork server's sandbox (bwrap) walls the function off from the server; these
    wall one invocation off from the next. The child (C) unshares a user, mount, PID
    and IPC namespace, maps its own uid and gid, mounts a fresh tmpfs on /tmp (also
    /dev/shm, a link to it in the sandbox's read-only /dev), drops every capability
    and forks the process that runs the handler (G): PID 1 of its namespace, in a
    process group of its own. Killing G kills everything left in its namespace,
    `setsid()` escapees included, and G cannot leave it: the worker kills G by a
    pidfd the fork server hands it, first, then C's group. C waits for G and ends
    as G did, so the worker's reading of the exit status and of the peak RSS
    (wait4 counts reaped children) is unchanged. Shared with the other invocations
    of the fork server: its network namespace (loopback only, unless `network =
    true`) and the view of /proc (they see each other's pids; a fresh /proc cannot
    be mounted under bwrap's partly covered one).

    Another invocation of the same function is the same uid, but in a sibling user
    namespace, and the kernel lets a process read or trace another's memory only in
    its own user namespace (or with CAP_SYS_PTRACE over the other's): invocations
    cannot reach each other's memory or environment, nor the fork server's. G and C
    do share one user namespace: C is not dumpable, which keeps G out of its memory.

    Being PID 1, G ignores a signal it sends itself unless it handles it (the
    kernel's rule for an init): `os.kill(os.getpid(), SIGKILL)` returns, and
    `os.abort()` ends in SIGSEGV, not SIGABRT; a fault kills it as usual.

    That costs two forks and three namespaces, about a millisecond here, so one
    child is made ahead (the spare), waiting on its own socket for the invocation's
    descriptors: an invocation pays only the hand-over. The fork server only forks
    it; C makes the walls on its own time, and says when they are up (or why they
    could not be) when asked for the first time.
    """

    def __init__(self, pid: int, hand: socket.socket) -> None:
        self.pid = pid  # C: the fork server's child, the worker's pidfd and group
        self.inner = 0  # G, as we number it: known once ready
        self.hand = hand
        self.failure = 0  # -errno once its walls could not be made
        self.confirmed = False

    @classmethod
    def make(cls, server: ForkServer) -> WalledChild | int:
        """A walled child on its way; or -errno when it cannot be forked (the worker
        answers as for a failed fork)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            return -(exc.errno or 1)
        if pid == 0:
            code = 70
            try:
                ours.close()
                os.setsid()
                server.control.close()
                _die_with_parent(os.getppid())
                code = _walled_child(server.function, theirs)
            except BaseException:
                pass
            finally:
                _flush_std()
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def ready(self) -> bool:
        """Wait for its walls; False (then it is gone, `failure` says why) when they
        could not be made. At the fork server's start the reason goes to its stderr,
        the worker's log; later the worker answers 503 with the errno's text."""
        if not self.confirmed:
            self.confirmed = True
            try:
                answer = self.hand.recv(4096)
            except OSError:
                answer = b""
            if answer[:1] == SPARE_READY and len(answer) == 1 + REAP.size:
                (self.inner,) = REAP.unpack(answer[1:])
            else:
                number, _, text = answer[1:].decode("utf-8", "replace").partition(" ")
                self.failure = -int(number) if number.isdigit() and int(number) else -errno.ECHILD
                print(f"fnserve: cannot wall off an invocation: {text or 'the child died'}",
                      file=sys.stderr, flush=True)
                self.discard()
        return self.failure == 0

    def take(self, fds: list[int]) -> int:
        """Hand the invocation's descriptors over; C's pid, or -errno."""
        if not self.ready():
            return self.failure
        try:
            socket.send_fds(self.hand, [b"F"], fds)
        except OSError as exc:
            self.discard()
            return -(exc.errno or 1)
        self.hand.close()
        return self.pid

    def discard(self) -> None:
        self.hand.close()
        _kill_and_reap(self.pid)


def _walled_child(function: Function, hand: socket.socket) -> int:
    """C: make the walls, fork G into them, end as G ends. Returns C's exit code."""
    try:
        # not dumpable: G shares our user namespace, and must not reach our memory (or,
        # through it, the fork server's descriptors). Inherited from the fork server;
        # said here too, as this is where it matters
        _c_library().prctl(PR_SET_DUMPABLE, 0)
        uid, gid = os.getuid(), os.getgid()  # before unshare: then they read as overflow
        _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC)
        _write_proc("setgroups", "deny")  # required before an unprivileged gid_map
        _write_proc("uid_map", f"{uid} {uid} 1")
        _write_proc("gid_map", f"{gid} {gid} 1")
        _mount_tmpfs("/tmp")
        _drop_capabilities()
        child = os.fork()
    except OSError as exc:
        hand.send(SPARE_FAILED + f"{exc.errno or 0} {exc.strerror or exc} "
                                 f"({exc.filename or 'namespaces'})".encode())
        return 71
    if child == 0:  # G, PID 1 of the new namespace
        code = 0
        try:
            _c_library().prctl(PR_SET_DUMPABLE, 0)
            _die_with_parent(None)
            # a group of its own: a signal the handler sends its group (kill(0, ...))
            # does not reach C, which must live to report how G ended. The worker
            # kills G by its pidfd, and the namespace with it
            os.setpgid(0, 0)
            message, fds, _flags, _addr = socket.recv_fds(hand, 16, 3)
            hand.close()
            if message and len(fds) == 3:
                serve_on(function, fds)
            else:  # the fork server stopped before handing us an invocation
                for fd in fds:
                    os.close(fd)
        except BaseException:
            code = 70
        finally:
            _flush_std()
            os._exit(code)
    try:
        hand.send(SPARE_READY + REAP.pack(child))
    finally:
        hand.close()
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):  # end as G did: the worker reports the signal
        number = os.WTERMSIG(status)
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP have no handler to reset
        os.kill(os.getpid(), number)
        return 128 + number
    return os.waitstatus_to_exitcode(status)


def _unshare(flags: int) -> None:
    if _c_library().unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), "unshare")


def _write_proc(name: str, text: str) -> None:
    path = f"/proc/self/{name}"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


def _mount_tmpfs(path: str) -> None:
    if _c_library().mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                          b"mode=0755") != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), f"mount tmpfs on {path}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """The new user namespace gave us every capability in it: keep none (with them, G
    could unmount its private /tmp and find the fork server's underneath)."""
    header = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero
    if _c_library().capset(ctypes.byref(header), data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), "capset")


def _kill_and_reap(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def main(argv: list[str]) -> int:
    mode, entry, handler_name, memory_mb, parent, channel_fd, walls = argv[1:8]
    del parent  # kept in the argv for `ps`: which worker started this process
    _die_with_parent(None)
    function = Function(entry, "" if handler_name == "-" else handler_name, int(memory_mb))
    channel = socket.socket(fileno=int(channel_fd))
    failure = function.load()
    _flush_std()
    server = ForkServer(function, channel, walled=walls == "walled") if mode == "fork" else None
    if failure is None and server is not None and server.walled:
        # not dumpable: no invocation (the same uid, in the same sandbox) may ptrace us
        # or write our memory through /proc, which would plant code in every invocation
        # that follows (their own user namespaces already forbid it: see WalledChild)
        _c_library().prctl(PR_SET_DUMPABLE, 0)
        # the first spare before READY: walls that cannot be made fail the start, with
        # the reason, rather than every invocation
        server.spare = WalledChild.make(server)
        if isinstance(server.spare, int) or not server.spare.ready():
            failure = _walls_failure()
    if failure is not None:
        _send_response(channel, INIT_FAILED, failure)
        return 1
    _send_response(channel, READY, b"")
    if server is not None:
        server.run()
    else:
        run_warm(function, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
