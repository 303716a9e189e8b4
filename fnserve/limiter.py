"""Admission: a BoundedSemaphore taken without blocking; one more than the limit gets 429."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TooManyRequests


class Limiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def acquire(self) -> None:
        """Take one slot now or raise TooManyRequests; the caller must release() it."""
        if not self._slots.acquire(blocking=False):
            raise TooManyRequests()

    def acquire_waiting(self, timeout: float) -> bool:
        """Take one slot, waiting up to `timeout` seconds for one (the async queue waits,
        where a request is refused); True when taken, and the caller must release() it."""
        return self._slots.acquire(timeout=timeout)

    def release(self) -> None:
        self._slots.release()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the body of the with-block, or raise TooManyRequests at once."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
