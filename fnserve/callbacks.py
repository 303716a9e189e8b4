"""X-Callback-Url (SPEC §11): POST the outcome of an async invocation to the caller.

Callbacks go out from threads of their own: a slow or dead receiver never holds an
executor slot, a queue runner or a request. A failed callback (no connection, a
timeout, 408, 429 or 5xx) is retried RETRIES times with exponential backoff; any
other answer is final. Retries wait in a heap, not in a sleeping thread, so one
dead receiver does not delay the callbacks of others.
"""

from __future__ import annotations

import heapq
import http.client
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import InvalidCallbackUrl

log = logging.getLogger("fnserve.callbacks")

RETRIES = 3  # after the first attempt
BACKOFF = 1.0  # seconds before the first retry; doubled for each further one
POST_TIMEOUT = 10.0  # connect and read, per attempt
SENDERS = 4
MAX_PENDING = 10_000  # beyond this a callback is dropped (and logged), never queued forever
_RETRY_STATUSES = {408, 429}


def check_callback_url(url: str) -> str:
    """The URL, if FnServe can POST to it; else InvalidCallbackUrl (400)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048 \
            or any(ch in url for ch in "\r\n\0 "):
        raise InvalidCallbackUrl(f"X-Callback-Url must be an http or https URL, not {url[:200]!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidCallbackUrl(f"X-Callback-Url has a bad port: {url[:200]!r}") from None
    return url


@dataclass(frozen=True)
class Callback:
    url: str
    body: bytes
    headers: Mapping[str, str]
    request_id: str = ""


@dataclass(order=True)
class _Attempt:
    due: float
    seq: int
    attempt: int = field(compare=False)
    callback: Callback = field(compare=False)


def post(callback: Callback, timeout: float = POST_TIMEOUT) -> int:
    """One POST; the receiver's status (redirects are not followed)."""
    parts = urlsplit(callback.url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" \
        else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", path, body=callback.body, headers=dict(callback.headers))
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        connection.close()


class CallbackSender:
    def __init__(self, senders: int = SENDERS, retries: int = RETRIES,
                 backoff: float = BACKOFF, timeout: float = POST_TIMEOUT) -> None:
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="fnserve-callback")
        self._due: list[_Attempt] = []
        self._in_flight = 0
        self._seq = 0
        self._closed = False
        self._changed = threading.Condition()
        self._timer = threading.Thread(target=self._dispatch, name="fnserve-callback-timer",
                                       daemon=True)
        self._timer.start()

    def send(self, callback: Callback) -> None:
        """Queue a callback; returns at once."""
        self._schedule(callback, 0, 0.0)

    def pending(self) -> int:
        with self._changed:
            return len(self._due) + self._in_flight

    def close(self, wait: float = 0.0) -> int:
        """Stop; give pending callbacks up to `wait` seconds. Returns how many were dropped."""
        deadline = time.monotonic() + wait
        with self._changed:
            while (self._due or self._in_flight) and time.monotonic() < deadline:
                self._changed.wait(min(0.1, max(deadline - time.monotonic(), 0.001)))
            dropped = len(self._due) + self._in_flight
            self._closed = True
            self._due.clear()
            self._changed.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return dropped

    # -- inside -----------------------------------------------------------------------

    def _schedule(self, callback: Callback, attempt: int, delay: float) -> None:
        with self._changed:
            if self._closed:
                return
            if len(self._due) + self._in_flight >= MAX_PENDING:
                log.error("callback to %s dropped: %d callbacks pending", callback.url,
                          MAX_PENDING, extra={"request_id": callback.request_id})
                return
            self._seq += 1
            heapq.heappush(self._due, _Attempt(time.monotonic() + delay, self._seq, attempt,
                                               callback))
            self._changed.notify_all()

    def _dispatch(self) -> None:
        with self._changed:
            while not self._closed:
                if not self._due:
                    self._changed.wait()
                    continue
                wait = self._due[0].due - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                item = heapq.heappop(self._due)
                self._in_flight += 1
                try:
                    self._pool.submit(self._attempt, item)
                except RuntimeError:  # the pool was shut down by close()
                    self._in_flight -= 1

    def _attempt(self, item: _Attempt) -> None:
        callback = item.callback
        try:
            try:
                status = post(callback, self.timeout)
                problem = "" if status < 500 and status not in _RETRY_STATUSES \
                    else f"answered {status}"
            except (OSError, http.client.HTTPException) as exc:
                status, problem = 0, f"{type(exc).__name__}: {exc}"
            extra = {"request_id": callback.request_id, "callback_url": callback.url,
                     "attempt": item.attempt + 1, "callback_status": status}
            if not problem:
                log.info("callback to %s answered %d", callback.url, status, extra=extra)
            elif item.attempt < self.retries:
                delay = self.backoff * 2 ** item.attempt
                log.warning("callback to %s failed (%s); retrying in %gs", callback.url,
                            problem, delay, extra=extra)
                self._schedule(callback, item.attempt + 1, delay)
            else:
                log.error("callback to %s failed (%s); giving up after %d attempts",
                          callback.url, problem, item.attempt + 1, extra=extra)
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()
