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

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the body of the with-block, or raise TooManyRequests at once."""
        if not self._slots.acquire(blocking=False):
            raise TooManyRequests()
        try:
            yield
        finally:
            self._slots.release()
