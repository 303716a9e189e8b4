"""`fnserve worker DIR --queue redis://...`: runs the async jobs that `serve` queued in Redis.

The RQ worker class is SimpleWorker: it runs each job in the worker's own process.
RQ's default Worker forks a work-horse per job, and a fork of a process that has
threads (FnServe's executor, its poll threads, the heartbeat thread below) copies
locks held by threads that do not exist in the child; SimpleWorker never forks.
RQ's death penalty (SIGALRM in the main thread, which native code can swallow) is
switched off: the job's deadline is the function's own, enforced by FnServe's
executor, which kills the function's whole process group.

Every job goes through Service.invoke with source "async": the same limits,
statistics, JSON log line and listeners as a call to `fnserve serve`.

Health: a heartbeat thread refreshes the running job's RQ heartbeat every
HEARTBEAT_INTERVAL seconds, moves due retries (RQ's scheduled registry) into the
queue, and looks for jobs whose worker died (no heartbeat for HEARTBEAT_TTL
seconds): RQ retries those, or fails them with the reason. SIGTERM or SIGINT: no
new job; the running one gets --graceful-timeout, then its process group is
killed and the job is put back at the front of the queue. `--metrics-port`
serves /metrics, /stats and /healthz on --metrics-host (127.0.0.1 by default).
"""

from __future__ import annotations

import base64
import logging
import logging.config
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.exceptions import InvalidJobOperation, NoSuchJobError, StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer

from .callbacks import CallbackSender
from .config import Config
from .context import Tracing, new_span_id
from .errors import FnServeError, QueueUnavailable
from .executor import Result, Run
from .logs import logging_config
from .outcome import Outcome, from_error
from .queue.jobs import callback_for, ended_fields, timestamp
from .queue.rq import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TTL,
    JOB_FUNCTION,
    NoDeathPenalty,
    connect,
    find_abandoned,
    make_rq_queue,
)
from .sandbox import check_sandboxes
from .service import InvocationRequest, Service
from .worker_http import serve_metrics

log = logging.getLogger("fnserve.worker")

SCHEDULER_TICK = 1.0  # seconds between moves of due retries into the queue


class JobFailed(Exception):
    """The function's run did not end ok; RQ retries the job or marks it failed."""


class WorkerStopped(Exception):
    """The worker stopped (SIGTERM) before the run ended; the job is put back."""


# -- the job ---------------------------------------------------------------------------

# the worker process's own Service, set by FnServeWorker before it takes a job
_current: FnServeWorker | None = None


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """One queued invocation, run in `fnserve worker` (RQ calls it by name)."""
    worker = _current
    if worker is None:
        raise RuntimeError("fnserve.worker.run_job runs only inside `fnserve worker`")
    return worker.run_payload(payload)


# -- the worker -------------------------------------------------------------------------


class FnServeWorker(SimpleWorker):
    death_penalty_class = NoDeathPenalty

    def __init__(self, service: Service, queue: Queue, connection: Redis) -> None:
        super().__init__([queue], connection=connection, serializer=JSONSerializer,
                         default_worker_ttl=HEARTBEAT_TTL * 2,
                         maintenance_interval=HEARTBEAT_TTL)
        self.service = service
        self.rq_queue = queue
        self.callbacks = CallbackSender()
        self.last_contact = time.monotonic()
        self._run: Run | None = None
        self._job_lock = threading.Lock()
        self._current_job: tuple[Job, Any] | None = None
        self._stop_signals = 0
        self._stopped_run = False
        self._ticker_stop = threading.Event()

    # RQ's hooks ------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name != JOB_FUNCTION:  # Redis is not trusted to name what runs here
            log.error("job %s names %r, not an fnserve invocation: refused", job.id,
                      job.func_name)
            job.cancel()
            return
        super().execute_job(job, queue)

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        with self._job_lock:
            self._current_job = (job, execution)
        try:
            done: bool = super().perform_job(job, queue, execution)
        finally:
            with self._job_lock:
                self._current_job = None
        if self._stopped_run:
            try:  # from the failed registry back to the front of the queue
                job.requeue(at_front=True)
                log.warning("job %s put back in the queue: the worker stopped before it "
                            "ended", job.id, extra={"request_id": job.id})
            except InvalidJobOperation:  # RQ already scheduled a retry of it
                pass
        return done

    # the job itself -------------------------------------------------------------------

    def run_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        from rq import get_current_job

        job = get_current_job()
        started_at = timestamp()
        started = time.monotonic()
        request_id = str(payload["request_id"])
        try:
            request = self._request(payload)
        except FnServeError as exc:  # e.g. this worker's DIR has no such function
            outcome = from_error(exc, request_id)
            log.error("job %s: %s", request_id, exc, extra={"request_id": request_id})
        else:
            outcome = self.service.invoke(request, watch=self._watch)
        duration = time.monotonic() - started
        if self._stopped_run:
            raise WorkerStopped("the worker stopped before the job ended; it is put back")
        fields = {"started_at": started_at, "ended_at": timestamp(), **ended_fields(outcome)}
        final = outcome.ok or job is None or not job.retries_left
        callback_url = payload.get("callback_url")
        if callback_url and final:
            self.callbacks.send(callback_for(
                callback_url, request_id, str(payload["function"]), outcome.status,
                outcome.body, outcome.content_type, duration))
        if outcome.ok:
            return fields
        if job is not None:
            job.meta["outcome"] = fields
            job.save_meta()  # type: ignore[no-untyped-call]
        raise JobFailed(_error_line(outcome))

    def _request(self, payload: dict[str, Any]) -> InvocationRequest:
        spec = self.service.registry.get(str(payload["function"]))
        tracing = Tracing(str(payload.get("trace_id") or os.urandom(16).hex()), new_span_id(),
                          str(payload.get("parent_id") or ""))
        return InvocationRequest(
            spec, base64.b64decode(payload["event"]), str(payload["request_id"]), tracing,
            parameters=dict(payload.get("parameters") or {}),
            forwarded=dict(payload.get("forwarded") or {}), source="async",
            method=str(payload.get("method") or "POST"),
            client_context=payload.get("client_context"))

    def _watch(self, run: Run) -> Result:
        with self._job_lock:
            self._run = run
        try:
            if self._stop_signals and self._grace_over:
                run.cancel()
            return run.result()
        except BaseException:
            run.cancel()
            raise
        finally:
            with self._job_lock:
                self._run = None

    # stopping -------------------------------------------------------------------------

    _grace_over = False

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signals += 1
        self.service.draining = True
        if self._stop_signals > 1:
            log.warning("second stop signal: killing the running job now")
            self._cancel_running()
            return
        log.info("stop signal: taking no new job; the running one gets %ss",
                 self.service.config.graceful_timeout)
        timer = threading.Timer(self.service.config.graceful_timeout, self._cancel_running)
        timer.daemon = True
        timer.start()
        self._shutdown_requested_date = _utcnow()
        self._shutdown()  # type: ignore[no-untyped-call]  # RQ: stop after the current job, or at once when idle

    def _cancel_running(self) -> None:
        with self._job_lock:
            self._grace_over = True
            run = self._run
            if run is not None:
                self._stopped_run = True
        if run is not None:
            log.warning("grace period over: killing the running job")
            run.cancel()

    # the heartbeat thread -------------------------------------------------------------

    def start_ticker(self) -> threading.Thread:
        thread = threading.Thread(target=self._tick, name="fnserve-worker-heartbeat",
                                  daemon=True)
        thread.start()
        return thread

    def stop_ticker(self) -> None:
        self._ticker_stop.set()

    def _tick(self) -> None:
        last_beat = 0.0
        while not self._ticker_stop.wait(SCHEDULER_TICK):
            try:
                self._move_due_retries()
                if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                    last_beat = time.monotonic()
                    self._beat()
                    self._find_abandoned()
                self.last_contact = time.monotonic()
            except RedisError as exc:
                log.error("Redis: %s", exc)
            except Exception:
                log.exception("worker heartbeat failed")

    def _beat(self) -> None:
        with self._job_lock:
            current = self._current_job
        if current is not None:
            job, execution = current
            self.maintain_heartbeats(job, execution)
        else:
            self.connection.ping()

    def _move_due_retries(self) -> None:
        """Retries whose backoff is over go back to the queue. Not RQ's scheduler: its
        lock outlives a killed worker by a minute, holding every retry back as long."""
        registry = self.rq_queue.scheduled_job_registry
        for job_id in registry.get_jobs_to_schedule(int(time.time())):
            if not self.connection.zrem(registry.key, job_id):
                continue  # another worker took it
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            self.rq_queue._enqueue_job(job, at_front=job.should_enqueue_at_front())

    def _find_abandoned(self) -> None:
        find_abandoned(self.rq_queue)


def _utcnow() -> Any:
    from rq.utils import now

    return now()


def _error_line(outcome: Outcome) -> str:
    error = outcome.error
    return f"{error.code}: {error}" if error is not None else outcome.outcome


# -- the command ------------------------------------------------------------------------


def run_worker(config: Config, *, metrics_host: str = "127.0.0.1",
               metrics_port: int | None = None,
               on_ready: Callable[[FnServeWorker], None] | None = None) -> None:
    """Run jobs until SIGTERM/SIGINT. Raises ConfigError before taking any job."""
    global _current
    assert config.queue, "fnserve worker needs --queue"
    logging.config.dictConfig(_worker_logging(config.log_format))
    connection = connect(config.queue)
    try:
        connection.ping()
    except RedisError as exc:
        raise QueueUnavailable(f"cannot reach Redis at {_redacted(config.queue)}: "
                               f"{exc}") from None
    service = Service(config)
    for warning in service.registry.warnings:
        log.warning(warning)
    check_sandboxes(service.registry, service.executor.bwrap)  # as `serve` does (SPEC §12)
    from .recording import attach_history

    history = attach_history(service)  # jobs run here are recorded like any invocation
    worker = FnServeWorker(service, make_rq_queue(connection), connection)
    _current = worker
    metrics = serve_metrics(service, lambda: worker.last_contact, metrics_host,
                            metrics_port) if metrics_port is not None else None
    worker.start_ticker()
    if on_ready is not None:
        on_ready(worker)
    log.info("fnserve worker %s: %d functions from %s, queue %s", worker.name,
             len(service.registry), config.functions_dir, _redacted(config.queue),
             extra={"pid": os.getpid()})
    try:
        worker.work(logging_level="WARNING")
    except StopRequested:
        pass
    finally:
        worker.stop_ticker()
        if metrics is not None:
            metrics.shutdown()
        dropped = worker.callbacks.close(wait=5.0)
        service.executor.shutdown()
        if history.writer is not None:
            history.writer.close()
        connection.close()
        _current = None
        log.info("fnserve worker %s stopped", worker.name, extra={"callbacks_dropped": dropped})


def _redacted(url: str) -> str:
    """The Redis URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    _credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"


def _worker_logging(log_format: str) -> dict[str, Any]:
    config = logging_config(log_format)
    # RQ's INFO lines name each job with its arguments (the event, forwarded headers)
    config["loggers"]["rq"] = {"level": "WARNING", "handlers": ["fnserve"], "propagate": False}
    return config

