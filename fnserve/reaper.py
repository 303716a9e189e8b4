"""Escaped processes: the worker adopts them, and kills and reaps them once their
invocation has ended.

A function's process group is killed when it exits, times out or is cancelled,
but a descendant that calls setsid() (or setpgid()) has left that group. With
PR_SET_CHILD_SUBREAPER such an escapee, once its parent is gone, is re-parented
to this process instead of to init, so we can find it: every direct child that
nobody here waits for is an orphan. It is attributed to its invocation by
FN_REQUEST_ID, which every function process inherits (its /proc/PID/environ is
readable by the same uid). An orphan of an invocation still running is left
alone; of one that has ended, or that cannot be attributed, it is killed and
reaped. At exit, every orphan left is killed.

Reaping never takes the exit status of a child someone else waits for (the
executor's function processes, `go build`): there is no waitpid(-1); only pids
found to be orphans are waited for. Whoever starts a child it will wait for
registers it here, inside `spawning()`, so a sweep never mistakes a child being
started (no FN_REQUEST_ID in its environment yet) for an orphan:

    with reaper.spawning():
        proc = subprocess.Popen(...)
        reaper.adopt(proc.pid)
    ...
    proc.wait(); reaper.release(proc.pid)

A short-lived child can simply run inside spawning() (`with REAPER.spawning():
subprocess.run(...)`): no sweep judges an unknown child meanwhile.

The gunicorn master is a subreaper too: when a worker dies without its
worker_exit (SIGKILL, a crash), the functions it was running are re-parented to
the master, which kills them and their process groups (kill_adopted_children).

What still escapes: a process that is no longer below a subreaper of ours when it
is looked for. A daemon that double-forks after the worker has exited, leaving a
process that the master adopts only after its last sweep, runs on until it ends
by itself (the master then reaps it); one that escapes `fnserve run` after it has
exited goes to init.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator

log = logging.getLogger("fnserve.reaper")

PR_SET_CHILD_SUBREAPER = 36
SWEEP_INTERVAL = 1.0  # seconds between sweeps while escapees may still be re-parented
SWEEP_PAUSE = 0.5  # seconds from the end of an invocation to its sweep: at most 2 a second
LATE_WINDOW = 5.0  # seconds after an invocation ended (or an orphan was found) to keep looking
KILL_WAIT = 1.0  # seconds a killed orphan gets to die before the next sweep reaps it
EXIT_SWEEP_LIMIT = 5.0  # seconds the final sweep keeps killing re-parented descendants
_REQUEST_ID = b"FN_REQUEST_ID="


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Reaper:
    """The children this process waits for, the invocations running, and the sweeps."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._known: set[int] = set()
        self._active: Counter[str] = Counter()
        self._spawning = 0
        self._spawn_epoch = 0
        self._started = False
        self._stopping = False
        self._stop_requested = threading.Event()
        self._last_end = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.killed = 0  # orphans killed so far, for logs and tests

    # -- called by whoever starts and waits for children -----------------------------

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around a Popen and its adopt(): no sweep judges an unknown child meanwhile."""
        with self._lock:
            self._spawning += 1
            self._spawn_epoch += 1
        try:
            yield
        finally:
            with self._lock:
                self._spawning -= 1

    def adopt(self, pid: int) -> None:
        with self._lock:
            self._known.add(pid)

    def release(self, pid: int) -> None:
        """After the child was waited for."""
        with self._lock:
            self._known.discard(pid)

    def invocation_started(self, request_id: str) -> None:
        with self._lock:
            self._active[request_id] += 1

    def invocation_ended(self, request_id: str) -> None:
        with self._lock:
            self._active[request_id] -= 1
            if self._active[request_id] <= 0:
                del self._active[request_id]
        if self._started:
            self._last_end = time.monotonic()
            self._wake.set()

    # -- the owner of the process: the gunicorn worker, `fnserve run` -----------------

    @property
    def started(self) -> bool:
        return self._started

    def start(self, background: bool = True) -> bool:
        """Become the subreaper; with `background`, sweep in a thread from now on."""
        if self._started:
            return True
        if not become_subreaper():
            log.warning("cannot become a child subreaper: processes that escape their "
                        "function's process group will not be reaped")
            return False
        self._started = True
        self._stopping = False
        self._stop_requested.clear()
        if background:
            self._thread = threading.Thread(target=self._sweep_loop, name="fnserve-reaper",
                                            daemon=True)
            self._thread.start()
        return True

    def stop(self) -> None:
        """Kill and reap every orphan left (the worker is exiting), and stop sweeping."""
        if not self._started:
            return
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=KILL_WAIT + 1)
        self._thread = None
        self.kill_all_orphans()
        self._started = False

    def kill_all_orphans(self, limit: float = EXIT_SWEEP_LIMIT) -> None:
        """Sweep until no orphan is left: killing one re-parents its own children to us."""
        deadline = time.monotonic() + limit
        while self.sweep(everything=True) and time.monotonic() < deadline:
            pass

    def _sweep_loop(self) -> None:
        # Sweeps cost CPU (a read per thread of the worker): one after invocations end,
        # at most one per SWEEP_PAUSE however many ended, then one per SWEEP_INTERVAL
        # while escapees may still be re-parented (LATE_WINDOW); none on an idle server.
        last_found = 0.0
        while not self._stopping:
            recent = time.monotonic() - max(self._last_end, last_found) < LATE_WINDOW
            self._wake.wait(SWEEP_INTERVAL if recent else None)
            if self._stopping or self._stop_requested.wait(SWEEP_PAUSE):
                return
            self._wake.clear()
            try:
                # killing one orphan re-parents its own children to us: sweep again
                deadline = time.monotonic() + EXIT_SWEEP_LIMIT
                while self.sweep() and not self._stopping and time.monotonic() < deadline:
                    last_found = time.monotonic()
            except Exception:  # a thread of our own: say why, never die silently
                log.exception("sweeping orphaned processes failed")

    # -- one sweep ----------------------------------------------------------------------

    def sweep(self, everything: bool = False) -> int:
        """Kill and reap the orphans that may go; `everything`: all of them. How many.

        A normal sweep lists children from /proc/self/task/*/children (1-5 ms for a
        worker's hundred-odd threads, where a scan of /proc costs 10-25 ms on a busy
        machine), which may miss a child re-parented meanwhile: the next sweep finds
        it. The final sweep (`everything`) scans /proc.
        """
        with self._lock:
            quiet = self._spawning == 0
            epoch = self._spawn_epoch
            # running when the scan starts or when it ends: a process of such an invocation
            # (its leader between fork and adopt() included) is never judged by this sweep
            running = set(self._active)
        orphans = []
        me = os.getpid()
        children = _children(me) if everything else _children_by_task(me)
        for pid, state in children:
            with self._lock:
                if pid in self._known:
                    continue
            if state == "":
                state = _state_of(pid)
                if state == "":
                    continue  # gone, reaped by no one but us: cannot be
            request_id = None if state == "Z" else _request_id_of(pid)
            orphans.append((pid, state, request_id))
        with self._lock:
            # a child whose Popen is still under way has no FN_REQUEST_ID yet, and is not
            # adopted yet: judge unattributed children only if no spawn overlapped the scan
            quiet = quiet and self._spawning == 0 and self._spawn_epoch == epoch
            running |= set(self._active)
        handled = 0
        for pid, state, request_id in orphans:
            if request_id is None and not quiet:
                continue
            if request_id is not None and request_id in running and not everything:
                continue  # its invocation still runs: it ends with it
            with self._lock:
                if pid in self._known:  # adopted since it was looked at
                    continue
            if state != "Z" and _kill(pid):
                self.killed += 1
                log.info("killed process %s left by %s", pid,
                         f"invocation {request_id}" if request_id else "an unknown parent",
                         extra={"request_id": request_id} if request_id else None)
            _reap(pid)
            handled += 1
        return handled


def kill_adopted_children(keep: Collection[int], limit: float = KILL_WAIT) -> int:
    """In the gunicorn master after a worker died: kill every child but `keep` (the
    workers) with its process group. Those are the dead worker's functions, adopted
    since the master is a subreaper; their own escapees are adopted in turn as they
    die, hence the short repeat. gunicorn's waitpid(-1) reaps them all. How many."""
    killed = 0
    deadline = time.monotonic() + limit
    while True:
        adopted = [pid for pid, state in _children(os.getpid())
                   if pid not in keep and state != "Z"]
        for pid in adopted:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # a function leader leads its group
            _kill(pid)
        killed += len(adopted)
        if not adopted or time.monotonic() >= deadline:
            return killed
        time.sleep(0.05)  # the killed die, and their children come to us


def _children_by_task(parent: int) -> list[tuple[int, str]]:
    """(pid, "") of the children of each thread of `parent` (the state is read later,
    only for the children nobody waits for); a full scan where the kernel has no
    children files (CONFIG_PROC_CHILDREN)."""
    found: list[tuple[int, str]] = []
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
        return _children(parent)
    for task in tasks:
        try:
            with open(f"/proc/{parent}/task/{task}/children", "rb") as handle:
                found.extend((int(pid), "") for pid in handle.read().split())
        except FileNotFoundError:
            if task == str(parent):  # the leader has no children file: no kernel support
                return _children(parent)
        except OSError:
            continue  # the thread ended meanwhile
    return found


def _state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[0].decode() if fields else ""


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, state) of every direct child of `parent`, zombies included."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # the command name is in parentheses and may hold anything, ')' included
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 2 and int(fields[1]) == parent:
            found.append((int(entry), fields[0].decode()))
    return found


def _request_id_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_REQUEST_ID):
            return entry[len(_REQUEST_ID):].decode("utf-8", "replace")
    return None


def kill_group(pgid: int) -> None:
    """SIGKILL a process group, gone or not. Safe from pid reuse only while its leader
    is unreaped (a zombie leader keeps the group id reserved): every caller reaps the
    leader itself, after this."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> bool:
    # safe from pid reuse: `pid` is our child and unreaped, and only we reap it
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    """Wait for one orphan (never -1): at most KILL_WAIT, else the next sweep reaps it."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = -1
    try:
        if pidfd >= 0:
            select.select([pidfd], [], [], KILL_WAIT)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)


REAPER = Reaper()
"""The process's one reaper: being a subreaper is a property of the whole process."""
