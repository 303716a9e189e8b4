"""Statistics, /metrics and the JSON logs (SPEC §5, §7) after one known mixed load.

The module's server gets exactly this load, once (the `load` fixture), and the tests
only read: 6 ok, 3 crashes, 2 timeouts, 4 held slots then released, 3 rejected (429),
plus one 400 and one 404 that must not be counted. Concurrency stays at or below the
limit on the client side until the deliberate 429s, so every number is exact.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .helpers import wait_until, write_function, write_toml
from .live import LiveServer, invocation_records, running

CONCURRENCY = 4
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


@dataclass
class Load:
    server: LiveServer
    responses: list[requests.Response] = field(default_factory=list)
    during: dict[str, Any] = field(default_factory=dict)  # /stats with every slot taken
    during_metrics: str = ""
    after: dict[str, Any] = field(default_factory=dict)


def _post(server: LiveServer, name: str, **kwargs: Any) -> requests.Response:
    return requests.post(server.url(f"/function/{name}"), timeout=30, **kwargs)


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    directory = tmp_path_factory.mktemp("stats-functions")
    release = tmp_path_factory.mktemp("stats-state") / "release"
    write_function(directory, "ok.py", """
        import os, sys
        print(f"ok-stderr {os.environ['FN_REQUEST_ID']}", file=sys.stderr)
        print("second line", file=sys.stderr)
        print('{"ok": true}')
    """)
    write_function(directory, "crash.py", "import sys; sys.exit(3)\n")
    write_function(directory, "slow.py", "import time; time.sleep(30)\n")
    write_function(directory, "block.py", f"""
        import os, time
        deadline = time.monotonic() + 20
        while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("released")
    """)
    write_toml(directory, """
        [functions.slow]
        timeout = "500ms"
    """)
    with running(LiveServer(directory, "--concurrency", str(CONCURRENCY))) as server:
        result = Load(server)
        names = ["ok"] * 6 + ["crash"] * 3 + ["slow"] * 2
        # at most CONCURRENCY in flight: a slot is free again before its answer is sent
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            result.responses += pool.map(lambda name: _post(server, name), names)
        result.responses.append(_post(server, "ok", data=b"{",
                                      headers={"Content-Type": "application/json"}))
        result.responses.append(_post(server, "nope"))

        answers: list[requests.Response] = []
        blockers = [threading.Thread(target=lambda: answers.append(_post(server, "block")))
                    for _ in range(CONCURRENCY)]
        for thread in blockers:
            thread.start()
        try:
            assert wait_until(lambda: server.stats()["active_requests"] == CONCURRENCY, 10)
            result.responses += [_post(server, "ok") for _ in range(3)]
            result.during = server.stats()
            result.during_metrics = server.get("/metrics").text
        finally:
            release.touch()
            for thread in blockers:
                thread.join(30)
        result.responses += answers
        result.after = server.stats()
        yield result
        result.responses.clear()  # their sockets would hold up the server's stop
        answers.clear()


def test_the_load_got_the_expected_answers(load: Load) -> None:
    statuses = sorted(r.status_code for r in load.responses)
    assert statuses == sorted([200] * 10 + [502] * 3 + [504] * 2 + [429] * 3 + [400, 404])


def _same_keys(stats: dict[str, Any]) -> None:
    assert stats["total_requests"] == (stats["active_requests"] + stats["success_requests"]
                                       + stats["failed_requests"] + stats["rejected_requests"])
    completed = stats["success_requests"] + stats["failed_requests"]
    expected = stats["total_execution_ms"] / completed if completed else 0
    assert stats["average_execution_ms"] == pytest.approx(expected, abs=0.01)


def test_stats_are_exact(load: Load) -> None:
    stats = load.after
    assert {k: v for k, v in stats.items() if k not in ("functions", "total_execution_ms",
                                                          "average_execution_ms")} == {
        "active_requests": 0, "total_requests": 18, "success_requests": 10,
        "failed_requests": 5, "rejected_requests": 3, "timeouts": 2}
    _same_keys(stats)
    # two timeouts of 500 ms at least
    assert stats["total_execution_ms"] >= 1000
    functions = stats["functions"]
    assert set(functions) == {"ok", "crash", "slow", "block"}  # no entry for 404's "nope"
    expected = {  # total, success, failed, rejected, timeouts
        "ok": (9, 6, 0, 3, 0), "crash": (3, 0, 3, 0, 0), "slow": (2, 0, 2, 0, 2),
        "block": (4, 4, 0, 0, 0)}
    for name, (total, success, failed, rejected, timeouts) in expected.items():
        entry = functions[name]
        assert (entry["total_requests"], entry["success_requests"], entry["failed_requests"],
                entry["rejected_requests"], entry["timeouts"], entry["active_requests"]
                ) == (total, success, failed, rejected, timeouts, 0), name
        _same_keys(entry)
    assert sum(f["total_execution_ms"] for f in functions.values()) == pytest.approx(
        stats["total_execution_ms"], abs=0.01)


def test_stats_while_every_slot_is_taken(load: Load) -> None:
    stats = load.during
    assert stats["active_requests"] == CONCURRENCY
    assert stats["rejected_requests"] == 3
    assert stats["functions"]["block"]["active_requests"] == CONCURRENCY
    _same_keys(stats)
    assert stats["total_requests"] == 11 + CONCURRENCY + 3
    families = {f.name: f for f in text_string_to_metric_families(load.during_metrics)}
    assert [s.value for s in families["fnserve_active_requests"].samples] == [CONCURRENCY]


def _metrics(load: Load) -> dict[str, Any]:
    response = load.server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def test_metrics_parse_and_match_the_stats(load: Load) -> None:
    families = _metrics(load)
    requests_total = families["fnserve_requests"]
    assert requests_total.type == "counter"
    counts = {(s.labels["function"], s.labels["outcome"]): s.value
              for s in requests_total.samples if s.name == "fnserve_requests_total"}
    assert counts == {("ok", "ok"): 6, ("ok", "rejected"): 3, ("crash", "failed"): 3,
                      ("slow", "timeout"): 2, ("block", "ok"): 4}
    functions = load.after["functions"]
    for name, entry in functions.items():
        mine = {outcome: value for (function, outcome), value in counts.items()
                if function == name}
        assert sum(mine.values()) == entry["total_requests"]
        assert mine.get("ok", 0) == entry["success_requests"]
        assert mine.get("rejected", 0) == entry["rejected_requests"]
        assert mine.get("timeout", 0) == entry["timeouts"]

    histogram = families["fnserve_request_duration_seconds"]
    assert histogram.type == "histogram"
    for name, entry in functions.items():
        samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples
                   if s.labels["function"] == name}
        completed = entry["success_requests"] + entry["failed_requests"]
        assert samples[("fnserve_request_duration_seconds_count", None)] == completed
        assert samples[("fnserve_request_duration_seconds_bucket", "+Inf")] == completed
        assert samples[("fnserve_request_duration_seconds_sum", None)] == pytest.approx(
            entry["total_execution_ms"] / 1000, abs=0.002)
        buckets = [v for (n, le), v in samples.items() if n.endswith("_bucket")]
        assert buckets == sorted(buckets)  # cumulative
    slow = {s.labels.get("le"): s.value for s in histogram.samples
            if s.labels["function"] == "slow" and s.name.endswith("_bucket")}
    assert slow["0.25"] == 0 and slow["1.0"] == 2  # two runs cut at 500 ms

    assert [s.value for s in families["fnserve_active_requests"].samples] == [0]


# -- logs -------------------------------------------------------------------------------


def test_serve_logs_are_json_lines_on_stderr_only(load: Load) -> None:
    assert load.server.stdout() == ""
    records = load.server.log_records()  # raises on any line that is not JSON
    assert records
    for record in records:
        assert isinstance(record, dict)
        for key in ("timestamp", "level", "logger", "message"):
            assert key in record, record
    booting = [r for r in records if r["message"].startswith("Booting worker")]
    assert booting and booting[0]["logger"] == "gunicorn.error"
    assert booting[0]["level"] == "INFO"


def test_each_invocation_logs_exactly_one_line(load: Load) -> None:
    lines = invocation_records(load.server.log_records())
    for response in load.responses:
        request_id = response.headers["X-Request-Id"]
        mine = [r for r in lines if r.get("request_id") == request_id]
        assert len(mine) == 1, (request_id, mine)
        line = mine[0]
        assert line["status"] == response.status_code
        match = TRACEPARENT.fullmatch(response.headers["traceparent"])
        assert match and line["trace_id"] == match.group(1)
        assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
        assert line["function"] in ("ok", "crash", "slow", "block", "nope")
        expected_outcome = {200: "ok", 502: "failed", 504: "timeout", 429: "rejected",
                            400: "invalid_json", 404: "not_found"}[response.status_code]
        assert line["outcome"] == expected_outcome
    assert len(lines) == len(load.responses)


def test_function_stderr_lines_are_records(load: Load) -> None:
    records = load.server.log_records()
    ok_ids = [r.headers["X-Request-Id"] for r in load.responses
              if r.status_code == 200 and r.url.endswith("/function/ok")]
    assert len(ok_ids) == 6
    for request_id in ok_ids:
        mine = [r for r in records if r.get("stream") == "stderr"
                and r.get("request_id") == request_id]
        assert [r["message"] for r in mine] == [f"ok-stderr {request_id}", "second line"]
        assert all(r["function"] == "ok" for r in mine)
    # a stderr line is never mistaken for the function's result
    assert all(b"ok-stderr" not in r.content for r in load.responses)

