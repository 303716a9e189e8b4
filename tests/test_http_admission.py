"""Admission and queueing (SPEC §4): the 429 limit, non-limited routes, the worker queue.

The admission server also runs with `--log-format text`, checked at the end of its test.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import wait_until, write_function
from .live import LiveServer, running

CONCURRENCY = 4
SLOW_REQUESTS = 16
# kept responses keep their sockets open, and a stopping server waits ~2 s on an idle one
CLOSE = {"Connection": "close"}


def fire(count: int, send: Callable[[], requests.Response]) -> tuple[list[threading.Thread],
                                                                     list[requests.Response]]:
    """`count` requests at once, each on its own connection, released by one barrier."""
    barrier = threading.Barrier(count)
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait(10)
        response = send()
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


def test_concurrency_admits_exactly_n_and_refuses_the_rest(tmp_path: Path) -> None:
    directory = tmp_path / "functions"
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    # slow until released: exactly the admitted ones can be running when we look
    write_function(directory, "slow.py", f"""
        import os, time
        open(os.path.join({str(started)!r}, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print('{{"done": true}}')
    """)
    with running(LiveServer(directory, "--concurrency", str(CONCURRENCY),
                            "--log-format", "text")) as server:
        url = server.url("/function/slow")
        threads, answers = fire(SLOW_REQUESTS, lambda: requests.post(url, json={}, timeout=30,
                                                                     headers=CLOSE))
        try:
            refused = SLOW_REQUESTS - CONCURRENCY
            assert wait_until(lambda: len(answers) == refused, 10), [a.status_code for a in answers]
            for response in answers:
                assert response.status_code == 429
                assert response.headers["Content-Type"] == "application/json"
                assert int(response.headers["Retry-After"]) >= 1
                body = response.json()
                assert body == {"error": "too many requests", "code": "too_many_requests",
                                "request_id": response.headers["X-Request-Id"]}
            # --workers defaults to --concurrency: every admitted one runs at once
            assert wait_until(lambda: len(list(started.iterdir())) == CONCURRENCY, 10)
            # every slot is taken, and the other routes still answer at once
            for path in ("/healthz", "/stats", "/metrics", "/functions"):
                assert requests.get(server.url(path), timeout=2).status_code == 200, path
            stats = server.stats(timeout=2)
            assert stats["active_requests"] == CONCURRENCY
            assert stats["rejected_requests"] == refused
            assert requests.post(url, timeout=5, headers=CLOSE).status_code == 429
        finally:
            release.touch()
            for thread in threads:
                thread.join(30)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * CONCURRENCY + [429] * refused
        stats = server.stats()
        assert stats["rejected_requests"] == refused + 1
        assert stats["success_requests"] == CONCURRENCY
        assert stats["active_requests"] == 0
        text = server.stderr()

    # --log-format text: readable lines, none of them JSON
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d POST slow 200 [\d.]+ms", line) for line in lines)
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d POST slow 429 [\d.]+ms \(rejected\)", line)
               for line in lines)
    assert any("Booting worker" in line for line in lines)


def test_queued_invocations_spend_their_deadline_waiting(tmp_path: Path) -> None:
    """One worker, three admitted 3 s functions, a 4.5 s timeout: the queue eats the deadline.

    The first runs at once and answers 200 (1.5 s to spare); the second starts when it
    ends, with ~1.5 s left of its 4.5 s, and times out; the third's deadline passes
    while it waits: 200, 504, 504, whichever request is first."""
    directory = tmp_path / "functions"
    write_function(directory, "queued.py", """
        import json, os, sys, time
        context = json.loads(os.environ["FN_CONTEXT"])
        print(json.dumps({"deadline": context["deadline"]}), file=sys.stderr, flush=True)
        time.sleep(3)
        print(json.dumps({"deadline": context["deadline"]}))
    """)
    with running(LiveServer(directory, "--concurrency", "4", "--workers", "1",
                            "--timeout", "4.5s")) as server:
        url = server.url("/function/queued")
        threads, answers = fire(3, lambda: requests.post(url, timeout=30, headers=CLOSE))
        for thread in threads:
            thread.join(30)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 504, 504], statuses
        for response in answers:
            if response.status_code == 504:
                assert response.json()["error"] == "function timed out after 4.5s"
        # the deadlines the started functions saw (their first stderr line)
        deadlines = sorted(json.loads(r["message"])["deadline"] for r in server.log_records()
                           if r.get("stream") == "stderr")
        assert len(deadlines) >= 2, "no queued function started"
        assert deadlines[-1] > 4.0  # the first one ran at once: nearly all of its 4.5 s
        # whoever started after it had waited ~3 s in the queue
        assert all(deadline < 2.0 for deadline in deadlines[:-1]), deadlines
        stats: dict[str, Any] = server.stats()
        assert stats["timeouts"] == statuses.count(504)
        assert stats["rejected_requests"] == 0
