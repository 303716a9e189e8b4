"""Async invocations (SPEC §11): one tiny interface, two queues behind it.

- local.LocalQueue (no --queue): in the server's memory, run by the server's own
  executor within --concurrency; what is still waiting at shutdown is lost (logged).
- rq.RedisQueue (--queue redis://...): RQ jobs in Redis, run by `fnserve worker`
  processes anywhere; any serve instance answers /jobs/<id> for any job.

Both take an already checked InvocationRequest (auth, name, body size and JSON are
the transport's) and describe a job the same way (jobs.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..service import InvocationRequest, Service


class JobQueue(Protocol):
    def enqueue(self, request: InvocationRequest, callback_url: str | None = None) -> None:
        """Queue it or raise: TooManyRequests (full), Unavailable (draining),
        JobExists (that request id is taken), QueueUnavailable (Redis is down)."""

    def job(self, request_id: str) -> dict[str, Any] | None:
        """The job as GET /jobs/<id> shows it (SPEC §11), None when unknown."""

    def drain(self) -> None:
        """SIGTERM: start no more jobs; the running ones get --graceful-timeout."""

    def close(self) -> None:
        """Stop; running jobs and callbacks get what is left of the grace period."""


def make_queue(service: Service) -> JobQueue:
    config = service.config
    if config.queue:
        from .rq import RedisQueue

        return RedisQueue(config.queue, result_ttl=config.result_ttl)
    from .local import LocalQueue

    return LocalQueue(service, size=config.queue_size, result_ttl=config.result_ttl)
