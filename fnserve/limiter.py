"""Admission: a BoundedSemaphore taken without blocking; one more than the limit gets 429.

It also knows how many slots are taken, so a draining worker can wait until the
invocations it admitted are done (server.py's drain).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TooManyRequests


class Limiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._changed = threading.Condition()
        self._taken = 0

    def acquire(self) -> None:
        """Take one slot now or raise TooManyRequests; the caller must release() it."""
        if not self._slots.acquire(blocking=False):
            raise TooManyRequests()
        with self._changed:
            self._taken += 1

    def acquire_waiting(self, timeout: float) -> bool:
        """Take one slot, waiting up to `timeout` seconds for one (the async queue waits,
        where a request is refused); True when taken, and the caller must release() it."""
        if not self._slots.acquire(timeout=timeout):
            return False
        with self._changed:
            self._taken += 1
        return True

    def release(self) -> None:
        with self._changed:
            self._taken -= 1
            self._changed.notify_all()
        self._slots.release()

    @property
    def taken(self) -> int:
        return self._taken

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no slot is taken; False if some still are after `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._taken == 0, max(timeout, 0.0))

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the body of the with-block, or raise TooManyRequests at once."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
