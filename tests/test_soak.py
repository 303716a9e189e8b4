"""Soak: thousands of mixed invocations at concurrency 32, then nothing lost, nothing leaked.

Runs in CI by default at a small size (the marker selects it, it does not skip it):

    .venv/bin/pytest -m soak -s                                   # 1500 requests, ~20 s on 2 cores
    FNSERVE_SOAK_REQUESTS=50000 .venv/bin/pytest -m soak -s       # the long run

The mix: ok, crash (exit 1), timeout (504), oversize output (502) and a slow
function that keeps slots busy, so that 32 client threads against --concurrency
24 also get 429s (a client waits 250 ms after a 429, as a polite one would).
Afterwards: only the expected statuses; the statistics invariants hold exactly
and match what the client saw; every request was logged exactly once with its
status; no process is left but the worker; the worker's open fds and RSS are
back near where they started; every log line is JSON.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import wait_until, write_function, write_toml
from tests.live import LiveServer, invocation_records, running, the_worker

REQUESTS = int(os.environ.get("FNSERVE_SOAK_REQUESTS", "1500"))
CLIENTS = int(os.environ.get("FNSERVE_SOAK_CONCURRENCY", "32"))
SLOTS = 24
BACKOFF = 0.25  # a client answered 429 waits this long: a polite one, not a spinning one
MiB = 1024 * 1024
FD_SLACK = 10  # the worker's open fds after the soak, over the count after warm-up
RSS_SLACK = 30 * MiB  # its RSS after the soak, over the RSS after warm-up

# function -> (weight in the mix, statuses it may answer)
MIX: dict[str, tuple[int, set[int]]] = {
    "ok": (55, {200, 429}),
    "crash": (15, {502, 429}),
    "sleepy": (5, {504, 429}),
    "oversize": (10, {502, 429}),
    "hold": (15, {200, 429}),
}
OUTCOME = {200: "ok", 429: "rejected", 502: "failed", 504: "timeout"}

pytestmark = pytest.mark.soak


def _functions(directory: Path) -> None:
    write_function(directory, "ok.py", """
        import json, os, sys
        event = sys.stdin.read()
        print(json.dumps({"ok": True, "n": len(event), "id": os.environ["FN_REQUEST_ID"]}))
    """)
    write_function(directory, "crash.py", """
        import sys
        print("crashing on purpose", file=sys.stderr)
        sys.exit(1)
    """)
    write_function(directory, "sleepy.py", "import time; time.sleep(10)\n")
    write_function(directory, "oversize.py", """
        import sys
        sys.stdout.write("x" * (200 * 1024))
    """)
    write_function(directory, "hold.py", """
        import time
        time.sleep(0.3)
        print("held")
    """)
    write_toml(directory, """
        [functions.sleepy]
        timeout = "200ms"
    """)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("soak-functions")
    _functions(directory)
    with running(LiveServer(directory, "--concurrency", str(SLOTS), "--max-output", "64KB",
                            "--timeout", "5s")) as live:
        yield live


def _plan(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = list(MIX)
    return rng.choices(names, weights=[MIX[n][0] for n in names], k=count)


def _drive(server: LiveServer, plan: list[str], prefix: str) -> list[tuple[str, str, int, str]]:
    """Send the plan from CLIENTS threads; (request id, function, status, code) per request."""
    local = threading.local()

    def call(item: tuple[int, str]) -> tuple[str, str, int, str]:
        index, name = item
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        request_id = f"{prefix}-{index:06d}"
        response = session.post(server.url(f"/function/{name}"), json={"i": index},
                                headers={"X-Request-Id": request_id}, timeout=30)
        code = response.json().get("code", "") if response.status_code != 200 else ""
        assert response.headers["X-Request-Id"] == request_id
        if response.status_code == 429:
            time.sleep(BACKOFF)
        return request_id, name, response.status_code, code

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(call, enumerate(plan)))


def _settled(server: LiveServer) -> dict[str, object]:
    stats: dict[str, object] = {}

    def idle() -> bool:
        stats.update(server.stats())
        return stats["active_requests"] == 0 and server.function_processes() == []

    assert wait_until(idle, timeout=15, interval=0.1), f"not idle: {stats}"
    return stats


def test_soak(server: LiveServer) -> None:
    worker = the_worker(server)
    # warm-up: every code path once, so the baseline includes imports and pools
    _drive(server, _plan(200, seed=1), "warm")
    _settled(server)
    baseline = server.stats()
    fds_start, rss_start = worker.num_fds(), worker.memory_info().rss

    started = time.monotonic()
    seen = _drive(server, _plan(REQUESTS, seed=2), "soak")
    elapsed = time.monotonic() - started
    stats = _settled(server)
    fds_end, rss_end = worker.num_fds(), worker.memory_info().rss

    # only expected statuses, with the codes that go with them
    for request_id, name, status, code in seen:
        assert status in MIX[name][1], (request_id, name, status, code)
        if status == 502:
            assert code == ("output_too_large" if name == "oversize" else "function_failed")
        if status == 504:
            assert code == "timeout"
    by_status = Counter(status for _, _, status, _ in seen)
    assert set(by_status) == {200, 429, 502, 504}, by_status

    # the statistics: exact invariants, and exactly what the client saw
    def delta(counters: dict[str, int], before: dict[str, int] | None, key: str) -> int:
        return counters[key] - (before or {}).get(key, 0)

    keys = ("total_requests", "success_requests", "failed_requests", "rejected_requests",
            "timeouts")
    functions: dict[str, dict[str, int]] = stats["functions"]  # type: ignore[assignment]
    for counters in (stats, *functions.values()):
        assert counters["total_requests"] == (  # type: ignore[index]
            counters["active_requests"] + counters["success_requests"]  # type: ignore[index]
            + counters["failed_requests"] + counters["rejected_requests"])  # type: ignore[index]
    for key in keys:
        assert stats[key] == sum(c[key] for c in functions.values()), key
    for name in MIX:
        mine = Counter(OUTCOME[status] for _, fn, status, _ in seen if fn == name)
        before = baseline["functions"].get(name)
        now = functions[name]
        assert delta(now, before, "success_requests") == mine["ok"], name
        assert delta(now, before, "rejected_requests") == mine["rejected"], name
        assert delta(now, before, "failed_requests") == mine["failed"] + mine["timeout"], name
        assert delta(now, before, "timeouts") == mine["timeout"], name
        assert delta(now, before, "total_requests") == sum(mine.values()), name
    assert stats["total_requests"] - baseline["total_requests"] == REQUESTS  # type: ignore[operator]

    # nothing lost: each request logged once, with the status the client got
    records = server.log_records()  # raises if any line is not JSON
    logged = Counter((r["request_id"], r["status"]) for r in invocation_records(records)
                     if str(r.get("request_id", "")).startswith("soak-"))
    assert logged == Counter((request_id, status) for request_id, _, status, _ in seen)

    # nothing leaked
    assert [p.pid for p in server.descendants()] == [worker.pid]
    assert fds_end <= fds_start + FD_SLACK, f"worker fds {fds_start} -> {fds_end}"
    assert rss_end <= rss_start + RSS_SLACK, \
        f"worker RSS {rss_start / MiB:.1f} -> {rss_end / MiB:.1f} MiB"

    statuses = dict(sorted(by_status.items()))
    print(f"\nsoak: {REQUESTS} requests from {CLIENTS} clients, --concurrency {SLOTS}, "
          f"{elapsed:.1f} s, {REQUESTS / elapsed:.0f} req/s; statuses {statuses}; worker fds "
          f"{fds_start} -> {fds_end}, RSS {rss_start / MiB:.1f} -> {rss_end / MiB:.1f} MiB")
