"""The drain of one worker after SIGTERM (or SIGINT in serve): SPEC §4.

While it drains, the worker keeps accepting and answering, new connections included,
so a load balancer sees it: /healthz answers 503 and a new invocation 503
`unavailable` with Retry-After (Service refuses it while `draining`). The invocations
already admitted get until --graceful-timeout; then every one still running is killed
(its whole process group, and any build), so each of their clients gets an answer.
Only then does the worker stop accepting (gunicorn's own graceful exit), finish the
responses it is writing and exit.

gunicorn's arbiter closes its copies of the listening sockets when it is signalled;
the worker holds its own, inherited at the fork, so it can still accept. The arbiter
SIGKILLs a worker still there one second after --graceful-timeout (server.py sets
gunicorn's graceful_timeout so): by then ours is done.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable

from .service import Service

log = logging.getLogger("fnserve.drain")

# after the kill at --graceful-timeout: how long the killed runs get to be answered
ANSWER_GRACE = 0.5

# One shared byte, mapped in the master at import (before any fork), so its workers
# see it: 1 once the master itself is stopping. The arbiter sends its workers SIGTERM
# on shutdown and on a reload (SIGHUP) alike; on a reload the new worker already
# accepts, so the old one must stop accepting at once, as gunicorn does.
_server_stopping = mmap.mmap(-1, 1)


def mark_server_stopping() -> None:
    """In the master, when SIGTERM/SIGINT makes it stop (server.py's when_ready)."""
    _server_stopping[0] = 1


def server_stopping() -> bool:
    return _server_stopping[0] == 1


class Drain:
    """One worker's drain: the first signal starts it, a repeated one changes nothing."""

    def __init__(self, service: Service, stop_accepting: Callable[[], None]) -> None:
        self.service = service
        self.stop_accepting = stop_accepting
        self.started = False

    def start(self, keep_accepting: bool) -> None:
        """Keep accepting and refuse new invocations 503 (the server stops), or, on a
        reload (another worker takes the new connections), stop accepting at once and
        serve what this worker has accepted already. Either way the runs in flight get
        --graceful-timeout, in a thread, then the worker stops accepting."""
        if self.started:
            return
        self.started = True
        if keep_accepting:
            self.service.draining = True
        else:
            self.stop_accepting()
        if self.service.started_queue is not None:  # start no more queued jobs; the
            self.service.started_queue.drain()  # running ones hold slots: waited for
        threading.Thread(target=self._run, name="fnserve-drain", daemon=True).start()

    def _run(self) -> None:
        service = self.service
        started = time.monotonic()
        timeout = service.config.graceful_timeout
        try:
            log.info("draining: %d invocation(s) running, up to %ss for them to finish",
                     service.limiter.taken, timeout)
            if not service.limiter.wait_idle(timeout):
                log.warning("draining: %d invocation(s) still running after %ss: killing "
                            "them", service.limiter.taken, timeout)
                service.draining = True  # their clients get 503, not "you went away"
                service.executor.kill_all()
                service.limiter.wait_idle(ANSWER_GRACE)
            log.info("drained in %.3fs: no longer accepting connections",
                     time.monotonic() - started)
        finally:
            self.stop_accepting()
