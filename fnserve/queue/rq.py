"""The Redis queue (--queue redis://HOST:PORT/DB): jobs are RQ jobs, run by `fnserve worker`.

A job is `fnserve.worker.run_job(payload)` with the request id as RQ's job id, so
any serve instance finds any job by its id. The payload is JSON (RQ's
JSONSerializer, not pickle: a job read from Redis cannot run code by being
loaded), and a worker runs no other callable.

RQ statuses map to the SPEC's: queued, deferred and scheduled (a retry waiting for
its backoff) are `queued`; started is `running`; finished and failed are ours. A
run that ends in anything but ok is a failed RQ job, so `retries = N` (RQ's Retry,
with backoff) applies to it; the worker stores its error JSON in the job's meta.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback as RQCallback
from rq import Queue, Retry
from rq.exceptions import AbandonedJobError, DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty

from ..callbacks import CallbackSender
from ..errors import JobExists, QueueUnavailable, Unavailable
from .jobs import FAILED, FINISHED, QUEUED, RUNNING, callback_for, describe, timestamp

if TYPE_CHECKING:
    from ..service import InvocationRequest

log = logging.getLogger("fnserve.queue")

QUEUE_NAME = "fnserve"
JOB_FUNCTION = "fnserve.worker.run_job"
RETRY_BACKOFF = (1, 2, 4, 8, 16, 32, 60)  # seconds before retry 1, 2, ...; then 60 each
# a worker refreshes the heartbeat of its running job every HEARTBEAT_INTERVAL; a job
# whose heartbeat is older than HEARTBEAT_TTL was abandoned (its worker died)
HEARTBEAT_INTERVAL = 5
HEARTBEAT_TTL = 15
WORKER_DIED = ("worker died while running the job (no heartbeat for "
               f"{HEARTBEAT_TTL}s); it was not retried")
REDIS_TIMEOUT = 5.0  # connect and each command: a hung Redis is a 503, not a hung request
ABANDONED_CALLBACK = "fnserve.queue.rq.on_abandoned"


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's SIGALRM is never armed: deadlines are the executor's (it kills the process
    group), and RQ's cleanup may run in a request thread, where no alarm can be set."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


def connect(url: str) -> Redis:
    # (RQ's worker raises socket_timeout above its blocking dequeue's own timeout)
    return Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT,
                          socket_timeout=REDIS_TIMEOUT, health_check_interval=30)


def make_rq_queue(connection: Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)


def payload_of(request: InvocationRequest, callback_url: str | None) -> dict[str, Any]:
    """The InvocationRequest as JSON for the worker (which finds the spec by name)."""
    return {
        "function": request.spec.name,
        "event": base64.b64encode(request.event).decode("ascii"),
        "request_id": request.request_id,
        "trace_id": request.tracing.trace_id,
        "parent_id": request.tracing.parent_id,
        "parameters": dict(request.parameters),
        "forwarded": dict(request.forwarded),
        "method": request.method,
        "client_context": request.client_context,
        "callback_url": callback_url,
    }


def retry_of(retries: int) -> Retry | None:
    if retries <= 0:
        return None
    intervals = [RETRY_BACKOFF[min(i, len(RETRY_BACKOFF) - 1)] for i in range(retries)]
    return Retry(max=retries, interval=intervals)


def _iso(moment: Any) -> str | None:
    return timestamp(moment.timestamp()) if moment is not None else None


class RedisQueue:
    def __init__(self, url: str, *, result_ttl: float,
                 connection: Redis | None = None) -> None:
        self.url = url
        self.result_ttl = result_ttl
        self.connection = connection or connect(url)
        self.queue = make_rq_queue(self.connection)
        self._draining = False

    # -- JobQueue -------------------------------------------------------------------

    def enqueue(self, request: InvocationRequest, callback_url: str | None = None) -> None:
        if self._draining:
            raise Unavailable("server is shutting down; retry on another instance")
        spec = request.spec
        ttl = max(1, math.ceil(self.result_ttl))
        try:
            self.queue.enqueue_call(
                JOB_FUNCTION, args=(payload_of(request, callback_url),),
                job_id=request.request_id,
                # RQ's own timeout is not a deadline here (the worker's executor kills
                # the process group): -1 so RQ never arms an alarm of its own
                timeout=-1, result_ttl=ttl, failure_ttl=ttl,
                description=f"fnserve {spec.name}",
                meta={"function": spec.name, "enqueued_at": timestamp()},
                retry=retry_of(spec.settings.retries),
                # the worker sends the callback of a run; this one, of a dead worker's job
                on_failure=RQCallback(ABANDONED_CALLBACK) if callback_url else None,
                unique=True)  # one Lua script: no second job can take the id meanwhile
        except DuplicateJobError:
            raise JobExists(f"a job with request id {request.request_id!r} exists") from None
        except RedisError as exc:
            log.error("cannot queue %s in Redis: %s", request.request_id, exc,
                      extra={"request_id": request.request_id, "function": spec.name})
            raise QueueUnavailable(f"the job queue is unavailable: {exc}") from None

    def job(self, request_id: str) -> dict[str, Any] | None:
        try:
            job = Job.fetch(request_id, connection=self.connection, serializer=JSONSerializer)
            status = job.get_status()
            if status == JobStatus.STARTED:
                # no worker may be left to look: find a worker that died mid-job now
                # (RQ retries the job or fails it), rather than never
                find_abandoned(self.queue)
                status = job.get_status()
            return describe_job(job, status)
        except NoSuchJobError:
            return None
        except RedisError as exc:
            raise QueueUnavailable(f"the job queue is unavailable: {exc}") from None

    def drain(self) -> None:
        self._draining = True

    def close(self) -> None:
        self._draining = True
        self.connection.close()


def find_abandoned(queue: Queue) -> None:
    """Retry or fail the jobs whose worker stopped sending heartbeats (one cleaner at a time)."""
    if queue.acquire_maintenance_lock():
        try:
            StartedJobRegistry(queue=queue, serializer=JSONSerializer,
                               death_penalty_class=NoDeathPenalty).cleanup()
        finally:
            queue.release_maintenance_lock()  # type: ignore[no-untyped-call]


_abandoned_callbacks: CallbackSender | None = None


def on_abandoned(job: Job, connection: Redis, exc_type: Any, exc_value: Any,
                 traceback: Any) -> None:
    """RQ's failure callback: a job whose worker died, not retried, tells its X-Callback-Url."""
    global _abandoned_callbacks
    if exc_type is not AbandonedJobError or job.retries_left:
        return  # a run that failed (the worker sent its callback), or one to be retried
    payload = job.args[0] if job.args else {}
    url = payload.get("callback_url") if isinstance(payload, dict) else None
    if not url:
        return
    body = json.dumps({"error": WORKER_DIED, "code": "worker_died", "request_id": job.id})
    if _abandoned_callbacks is None:
        _abandoned_callbacks = CallbackSender()
    _abandoned_callbacks.send(callback_for(url, job.id, str(payload.get("function", "")),
                                           503, body.encode(), "application/json", 0.0))


def describe_job(job: Job, status: Any) -> dict[str, Any]:
    """An RQ job as GET /jobs/<id> shows it."""
    meta: Mapping[str, Any] = job.get_meta(refresh=False) or {}
    function = str(meta.get("function") or "")
    ran: Mapping[str, Any] = meta.get("outcome") or {}
    fields: dict[str, Any] = {
        "enqueued_at": meta.get("enqueued_at") or _iso(job.enqueued_at),
        "started_at": ran.get("started_at") or _iso(job.started_at),
    }
    if status == JobStatus.FINISHED:
        value = job.return_value() or {}
        return describe(job.id, function, FINISHED, http_status=value.get("http_status"),
                        result=value.get("result"), error=None,
                        ended_at=value.get("ended_at") or _iso(job.ended_at), **fields)
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        if ran and status == JobStatus.FAILED and not _abandoned(job):
            return describe(job.id, function, FAILED, http_status=ran.get("http_status"),
                            result=None, error=ran.get("error"), ended_at=ran.get("ended_at"),
                            **fields)
        reason = WORKER_DIED if _abandoned(job) else f"job {status.value}"
        return describe(job.id, function, FAILED, http_status=None, result=None,
                        error={"error": reason, "code": "worker_died" if _abandoned(job)
                               else str(status.value)},
                        ended_at=_iso(job.ended_at) or timestamp(), **fields)
    if status == JobStatus.STARTED:
        return describe(job.id, function, RUNNING, **fields)
    return describe(job.id, function, QUEUED, **fields)


def _abandoned(job: Job) -> bool:
    result = job.latest_result()
    text = getattr(result, "exc_string", None) or ""
    return "AbandonedJobError" in text
