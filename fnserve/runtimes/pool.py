"""warm mode (SPEC §8): a pool of long-lived bootstrap processes per function.

Each process (_bootstrap.py) imported the module once and serves one invocation
at a time over a socket channel: a length-prefixed request frame in, a response
frame out; its fd 1 and 2 are pipes logged as the invocation's lines. Processes
are started on first use, up to `pool`; an invocation that finds all of them busy
waits for one within its deadline. On the deadline, a cancel, an oversize answer
or a death, the process's whole group is killed and reaped and a replacement is
started by a later invocation; `max_requests` retires a process after N answers.

The hot path runs in the calling thread: no hand-off, one poll loop.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..reaper import kill_group
from ..registry import FunctionSpec
from .channel import (
    ERROR,
    OK,
    TOO_LARGE,
    Booted,
    attach_cancel,
    boot,
    outcome_result,
    request_frame,
)

if TYPE_CHECKING:
    from ..executor import Job, Result

WAIT_SLICE = 0.1  # seconds between looks at a cancel while waiting for a free process


class WarmPool:
    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.size = spec.settings.pool
        self.max_requests = spec.settings.max_requests
        self.init_error: str | None = None
        self._cond = threading.Condition()
        self._idle: list[Booted] = []
        self._busy: set[Booted] = set()
        self._live = 0  # idle + busy + starting
        self._closed = False

    # -- the Runner interface --------------------------------------------------------

    def run(self, job: Job) -> Result:
        wake_fd, cancelled = attach_cancel(job)
        try:
            if cancelled:
                return outcome_result(job, "cancelled", None, 0.0)
            process, failure = self._acquire(job, wake_fd)
            if failure is not None:
                return failure
            assert process is not None
            started = time.monotonic()
            why, reply = process.exchange(job, wake_fd, request_frame(job))
            duration = time.monotonic() - started
            if why is None and reply is not None and reply.kind in (OK, ERROR, TOO_LARGE):
                self._release(process)
                return outcome_result(job, why, reply, duration)
            returncode = self._retire(process)
            if self._closed:  # killed by the shutdown, not by its own doing
                why = "cancelled"
            return outcome_result(job, why, reply, duration, returncode=returncode)
        finally:
            job.run._detach()

    def kill_all(self) -> None:
        with self._cond:
            self._closed = True
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
            self._live -= len(idle)
            self._cond.notify_all()
        for process in busy:  # its invocation's thread sees it die, and reaps it
            kill_group(process.proc.pid)
        for process in idle:
            process.kill()

    # -- the pool ----------------------------------------------------------------------

    def _acquire(self, job: Job, wake_fd: int) -> tuple[Booted | None, Result | None]:
        start = False
        with self._cond:
            while True:
                if self._closed or job.run.cancelled:
                    return None, outcome_result(job, "cancelled", None, 0.0)
                while self._idle:
                    process = self._idle.pop()
                    if process.alive():
                        self._busy.add(process)
                        return process, None
                    self._live -= 1  # died while idle (killed from outside): replace it
                    process.kill()
                if self._live < self.size:
                    self._live += 1
                    start = True
                    break
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    return None, outcome_result(job, "timeout", None, 0.0)
                self._cond.wait(min(remaining, WAIT_SLICE))
        assert start
        booted, failure = boot(job, "warm", wake_fd)
        with self._cond:
            if booted is None:
                self._live -= 1
                self._cond.notify()
                if failure is not None and failure.outcome == "init_failed":
                    self.init_error = failure.error
                return None, failure
            self.init_error = None
            if self._closed:
                self._live -= 1
            else:
                self._busy.add(booted)
                return booted, None
        booted.kill()
        return None, outcome_result(job, "cancelled", None, 0.0)

    def _release(self, process: Booted) -> None:
        process.served += 1
        if self.max_requests and process.served >= self.max_requests:
            self._retire(process)
            return
        with self._cond:
            self._busy.discard(process)
            if self._closed:
                self._live -= 1
            else:
                self._idle.append(process)
                self._cond.notify()
                return
        process.kill()

    def _retire(self, process: Booted) -> int:
        returncode = process.kill()
        with self._cond:
            self._busy.discard(process)
            self._live -= 1
            self._cond.notify()
        return returncode


