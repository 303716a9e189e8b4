"""The invocation service: one path from an invocation request to an Outcome, whatever
the transport (the /function route, the Lambda API, the queue, replay).

    InvocationRequest → (draining: 503) → limiter (429) → context → executor → Outcome
                      → statistics, the one log line, listeners (history)

Transports check what is theirs before calling it (auth, name, body size, body JSON)
and turn the Outcome into their own wire format; they never count, log or record an
invocation themselves, so every invocation is counted, logged and recorded once, from
the same Outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from .config import Config
from .context import Tracing, make_context
from .errors import FnServeError, TooManyRequests, Unavailable
from .executor import Executor, Invocation, Result, Run
from .limiter import Limiter
from .logs import function_log, invocation_log
from .outcome import Outcome, from_error, from_result
from .queue import JobQueue, make_queue
from .registry import FunctionSpec, Registry, load_registry
from .runtimes import Runtime, make_runtimes
from .sandbox import find_bwrap
from .stats import Stats, StatsCollector

log = logging.getLogger("fnserve.service")

SOURCES = ("http", "lambda", "async", "replay")


@dataclass(frozen=True)
class InvocationRequest:
    """One invocation, as every transport hands it over: already checked, not yet admitted."""

    spec: FunctionSpec
    event: bytes
    request_id: str
    tracing: Tracing
    parameters: Mapping[str, str] = field(default_factory=dict)
    forwarded: Mapping[str, str] = field(default_factory=dict)  # header env, key stripped
    source: str = "http"
    method: str = "POST"
    client_context: Any = None
    replay_of: str | None = None
    received_at: float = field(default_factory=time.monotonic)


class Slot:
    """An admission taken before the event is read (a large upload, app.py), so a
    request that will be refused 429 does not cost its upload. Hand it to
    Service.invoke(), which then owns it; release() it if the invocation never comes
    (the body turned out too large, not JSON, or the client went away): a slot
    taken and released without a run is neither counted nor logged."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._held = True

    def hand_over(self) -> None:
        if not self._held:
            raise RuntimeError("this slot was already used or released")
        self._held = False

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release()


# called once per finished invocation, with its duration in seconds (from admission)
Listener = Callable[[InvocationRequest, Outcome, float], None]
# waits for a submitted run, and may cancel it (the HTTP route watches its client)
Watch = Callable[[Run], Result]


def _log_stderr(invocation: Invocation, line: str) -> None:
    function_log.info(line, extra={"function": invocation.spec.name, "stream": "stderr",
                                   "request_id": invocation.context.request_id})


def _log_stdout(invocation: Invocation, line: str) -> None:
    # what a fork/warm handler prints (SPEC §8): a log line, never part of the result
    function_log.info(line, extra={"function": invocation.spec.name, "stream": "stdout",
                                   "request_id": invocation.context.request_id})


def _wait(run: Run) -> Result:
    try:
        return run.result()
    except BaseException:  # never let a function run on after its slot is given back
        run.cancel()
        raise


def log_invocation(outcome: Outcome, *, function: str, request_id: str, trace_id: str,
                   method: str, source: str, received_at: float) -> None:
    """The one line per invocation (SPEC §7), for runs and for refusals alike."""
    elapsed = time.monotonic() - received_at
    where = f"/function/{function}" if source == "http" else f"{source} {function}"
    invocation_log.info(
        f"{method} {where} {outcome.status}",
        extra={"request_id": request_id, "function": function, "method": method,
               "source": source, "status": outcome.status, "outcome": outcome.outcome,
               "duration_ms": round(elapsed * 1000, 3), "trace_id": trace_id},
    )


class Service:
    """Everything one app instance owns; the server's hooks reach it through the app."""

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else load_registry(
            config.functions_dir, isolation=config.isolation)
        self.runtimes: dict[str, Runtime] = make_runtimes(config.cache_dir, config.build_env)
        self.executor = Executor(config.workers, self.runtimes, stderr_sink=_log_stderr,
                                 stdout_sink=_log_stdout,
                                 bwrap=find_bwrap(config.base_env.get("PATH")))
        self.limiter = Limiter(config.concurrency)
        self.stats = Stats()
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(StatsCollector(self.stats))
        self.draining = False
        self.listeners: list[Listener] = []
        self._queue: JobQueue | None = None
        self._queue_lock = threading.Lock()

    # -- the two ways in ------------------------------------------------------------

    def invoke(self, request: InvocationRequest, watch: Watch | None = None,
               slot: Slot | None = None, *, holding_slot: bool = False) -> Outcome:
        """Run it now and answer: never raises for the function's or the limiter's sake.

        With a `slot` from reserve(), admission was decided already and is not redone.
        holding_slot: the caller (the queue) already holds a limiter slot for it, taken
        with limiter.acquire_waiting(); it is released here like any other.
        """
        if slot is not None:
            slot.hand_over()
        elif not holding_slot:
            try:
                self._admit(request)
            except FnServeError as refusal:
                return self._report(request, from_error(refusal, request.request_id), 0.0)
        try:
            admitted, deadline = self._admitted(request)
            result: Result | None = None
            try:
                result = (watch or _wait)(self._submit(request, admitted, deadline,
                                                       inline=True))
            except Exception:
                log.exception("internal error invoking %s", request.spec.name)
            except BaseException:  # still counted: /stats must not show it active forever
                self._complete(request, admitted, deadline, None)
                raise
            return self._complete(request, admitted, deadline, result)
        finally:
            self.limiter.release()

    def reserve(self, request: InvocationRequest) -> Slot | Outcome:
        """Admission alone, before the event is read: a Slot for invoke(), or the
        refusal (429, or 503 while draining), reported like invoke() reports it.
        `request.event` is not looked at (the body has not been read)."""
        try:
            self._admit(request)
        except FnServeError as refusal:
            return self._report(request, from_error(refusal, request.request_id), 0.0)
        return Slot(self.limiter)

    def enqueue(self, request: InvocationRequest, callback_url: str | None = None) -> None:
        """Queue it (SPEC §11); it runs later through invoke() with source "async".

        Raises TooManyRequests (the in-memory queue is full), Unavailable (draining),
        JobExists (that request id is taken), QueueUnavailable (Redis is down).
        """
        if self.draining:
            raise Unavailable("server is shutting down; retry on another instance")
        self.queue.enqueue(request, callback_url)

    @property
    def queue(self) -> JobQueue:
        """The async queue (fnserve/queue/): made on first use, so a server that never
        queues starts no queue thread and opens no Redis connection."""
        with self._queue_lock:  # two first requests at once must not make two queues
            if self._queue is None:
                self._queue = make_queue(self)
            return self._queue

    @property
    def started_queue(self) -> JobQueue | None:
        """The queue if anything made it, for the shutdown (never makes one)."""
        return self._queue

    # -- the steps --------------------------------------------------------------------

    def _admit(self, request: InvocationRequest) -> None:
        if self.draining:  # refused before admission: not counted, like a 404
            raise Unavailable("server is shutting down; retry on another instance")
        try:
            self.limiter.acquire()
        except TooManyRequests:
            self.stats.rejected(request.spec.name)
            raise

    def _admitted(self, request: InvocationRequest) -> tuple[float, float]:
        self.stats.admitted(request.spec.name)
        return time.monotonic(), request.spec.deadline(self.config.timeout)

    def _submit(self, request: InvocationRequest, admitted: float, deadline: float,
                inline: bool = False) -> Run:
        spec = request.spec
        context = make_context(
            spec.name, deadline, request_id=request.request_id, tracing=request.tracing,
            parameters=request.parameters, forwarded=request.forwarded,
            configured_env=spec.settings.env, client_context=request.client_context)
        # the deadline runs from admission: reading a slow upload does not use it up
        invocation = Invocation(spec, context, request.event, admitted + deadline,
                                self.config.base_env, self.config.max_output,
                                request.client_context)
        # invoke() waits at once: a fork/warm run then needs no pool thread (one hand-off
        # less per request); enqueue() does not wait, so its runs go to the pool
        return self.executor.submit(invocation, inline=inline)

    def _complete(self, request: InvocationRequest, admitted: float, deadline: float,
                  result: Result | None) -> Outcome:
        """Map the result to its Outcome; count, log and record that one Outcome."""
        if result is None:  # a fault of FnServe itself, logged with its traceback
            outcome = from_error(FnServeError(), request.request_id)
        else:
            if result.outcome == "unavailable":  # the server is out of fds, memory
                log.error("%s (the server is out of resources)", result.error,
                          extra={"function": request.spec.name,
                                 "request_id": request.request_id})
            outcome = from_result(result, request.spec, deadline=deadline,
                                  max_output=self.config.max_output, dev=self.config.dev,
                                  draining=self.draining)
        duration = time.monotonic() - admitted
        self.stats.finished(request.spec.name, outcome.outcome, duration)
        return self._report(request, outcome, duration)

    def _report(self, request: InvocationRequest, outcome: Outcome, duration: float) -> Outcome:
        log_invocation(outcome, function=request.spec.name, request_id=request.request_id,
                       trace_id=request.tracing.trace_id, method=request.method,
                       source=request.source, received_at=request.received_at)
        for listener in self.listeners:
            try:
                listener(request, outcome, duration)
            except Exception:  # a listener (history) never fails an invocation
                log.exception("invocation listener %r failed", listener)
        return outcome
