"""The in-memory queue (no --queue): bounded, run by the server itself, lost on restart.

One dispatcher thread starts the oldest waiting job as soon as the limiter has a
free slot (waiting for it: queued work is not refused because synchronous calls
are busy), then hands it to a runner thread that calls Service.invoke with that
slot. So async runs count against --concurrency like any other, and at most
--queue-size jobs wait; one more is a 429.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..callbacks import CallbackSender
from ..errors import JobExists, TooManyRequests, Unavailable
from .jobs import QUEUED, RUNNING, callback_for, describe, ended_fields, timestamp

if TYPE_CHECKING:
    from ..service import InvocationRequest, Service

log = logging.getLogger("fnserve.queue")

KEEP_ENDED = 10_000  # ended jobs kept for /jobs (each for --result-ttl at most)
SLOT_POLL = 0.1  # seconds between looks at the limiter while a job waits for a slot


@dataclass
class _Job:
    request: InvocationRequest
    callback_url: str | None
    view: dict[str, Any]
    ended: float = 0.0  # time.monotonic() when it ended; 0 while queued or running


class LocalQueue:
    def __init__(self, service: Service, *, size: int, result_ttl: float,
                 callbacks: CallbackSender | None = None) -> None:
        self.service = service
        self.size = size
        self.result_ttl = result_ttl
        self.callbacks = callbacks or CallbackSender()
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._ended: collections.deque[str] = collections.deque()
        self._running = 0
        self._draining = False
        self._drain_deadline = 0.0  # running jobs may finish until then (drain())
        self._closed = False
        self._runners = ThreadPoolExecutor(service.config.concurrency,
                                           thread_name_prefix="fnserve-async")
        self._dispatcher = threading.Thread(target=self._dispatch, name="fnserve-queue",
                                            daemon=True)
        self._dispatcher.start()

    # -- JobQueue -------------------------------------------------------------------

    def enqueue(self, request: InvocationRequest, callback_url: str | None = None) -> None:
        name = request.spec.name
        with self._lock:
            if self._draining or self._closed or self.service.draining:
                raise Unavailable("server is shutting down; retry on another instance")
            if request.request_id in self._jobs:
                raise JobExists(f"a job with request id {request.request_id!r} exists")
            if len(self._waiting) >= self.size:
                self.service.stats.rejected(name)
                raise TooManyRequests(f"too many requests: {self.size} jobs are waiting")
            job = _Job(request, callback_url,
                       describe(request.request_id, name, QUEUED, enqueued_at=timestamp()))
            self._jobs[request.request_id] = job
            self._waiting.append(job)
            self._lock.notify_all()

    def job(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._forget_expired()
            job = self._jobs.get(request_id)
            return dict(job.view) if job is not None else None

    def drain(self) -> None:
        with self._lock:
            if not self._draining:
                self._draining = True
                self._drain_deadline = time.monotonic() + self.service.config.graceful_timeout
            self._lock.notify_all()

    def close(self) -> None:
        deadline = self._drain_deadline
        with self._lock:
            self._draining = True
            while self._running and time.monotonic() < deadline:
                self._lock.wait(min(0.1, max(deadline - time.monotonic(), 0.001)))
            lost = len(self._waiting)
            running = self._running
            self._waiting.clear()
            self._closed = True
            self._lock.notify_all()
        self._runners.shutdown(wait=False, cancel_futures=True)
        dropped = self.callbacks.close(max(deadline - time.monotonic(), 0.0))
        if lost or running or dropped:
            log.warning("in-memory queue stopped: %d queued jobs lost, %d running, "
                        "%d callbacks not sent", lost, running, dropped,
                        extra={"jobs_lost": lost, "jobs_running": running,
                               "callbacks_dropped": dropped})
        else:
            log.info("in-memory queue stopped: no job lost", extra={"jobs_lost": 0})

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # -- inside -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        limiter = self.service.limiter
        while True:
            with self._lock:
                while not self._waiting and not self._draining:
                    self._lock.wait()
                if self._draining:
                    return
            if not limiter.acquire_waiting(SLOT_POLL):
                continue  # look at draining again, then keep waiting for a slot
            with self._lock:
                if self._draining or not self._waiting:
                    limiter.release()
                    if self._draining:
                        return
                    continue
                job = self._waiting.popleft()
                job.view.update(status=RUNNING, started_at=timestamp())
                self._running += 1
            try:
                self._runners.submit(self._run, job)
            except RuntimeError:  # closed meanwhile: the slot goes back
                limiter.release()
                with self._lock:
                    self._running -= 1
                return

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        request = dataclasses.replace(job.request, source="async", received_at=started)
        try:
            outcome = self.service.invoke(request, holding_slot=True)
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()
        duration = time.monotonic() - started
        with self._lock:
            job.view.update(ended_at=timestamp(), **ended_fields(outcome))
            job.ended = time.monotonic()
            self._ended.append(request.request_id)
            self._forget_expired()
        if job.callback_url:
            self.callbacks.send(callback_for(
                job.callback_url, request.request_id, request.spec.name, outcome.status,
                outcome.body, outcome.content_type, duration))

    def _forget_expired(self) -> None:
        """Ended jobs older than --result-ttl, and the oldest beyond KEEP_ENDED (lock held)."""
        now = time.monotonic()
        while self._ended:
            job = self._jobs.get(self._ended[0])
            if job is not None and len(self._ended) <= KEEP_ENDED and \
                    now - job.ended < self.result_ttl:
                break
            self._ended.popleft()
            if job is not None:
                del self._jobs[job.request.request_id]
