"""Async invocations on the in-memory queue (SPEC §11, no --queue), against a real server."""

from __future__ import annotations

import gc
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.async_helpers import CallbackReceiver
from tests.helpers import wait_until, write_function
from tests.live import LiveServer, invocation_records, running

HELLO = """
import json, os, sys
event = json.load(sys.stdin)
context = json.loads(os.environ["FN_CONTEXT"])
print(json.dumps({"hello": event.get("name", "world"), "request_id": context["request_id"],
                  "param": context["parameters"].get("p")}))
"""

# waits until the file named by the event exists: the test decides when it ends
GATED = """
import json, os, sys, time
gate = json.load(sys.stdin)["gate"]
while not os.path.exists(gate):
    time.sleep(0.01)
print("opened")
"""

FAIL = """
import sys
print("boom", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture
def functions(fn_dir: Path) -> Path:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "gated.py", GATED)
    write_function(fn_dir, "fail.py", FAIL)
    return fn_dir


def job_when(server: LiveServer, request_id: str, *statuses: str,
             timeout: float = 30.0) -> dict[str, Any]:
    """Poll GET /jobs/<id> until its status is one of `statuses`."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        response = server.get(f"/jobs/{request_id}")
        assert response.status_code == 200, response.text
        seen.update(response.json())
        return seen["status"] in statuses

    assert wait_until(reached, timeout, interval=0.05), f"job stuck: {seen}"
    return seen


def test_a_job_is_accepted_run_and_reported(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        response = server.post("/async-function/hello?p=1", json={"name": "Ada"},
                               headers={"X-Request-Id": "job-1"})
        assert response.status_code == 202, response.text
        assert response.json() == {"request_id": "job-1", "status": "queued"}
        assert response.headers["X-Request-Id"] == "job-1"

        job = job_when(server, "job-1", "finished", "failed")
        assert job["status"] == "finished", job
        assert job["function"] == "hello"
        assert job["http_status"] == 200
        assert job["error"] is None
        assert json.loads(job["result"]) == {"hello": "Ada", "request_id": "job-1", "param": "1"}
        assert job["enqueued_at"] <= job["started_at"] <= job["ended_at"]

        stats = server.stats()["functions"]["hello"]
        assert stats["success_requests"] == 1 and stats["total_requests"] == 1
    [line] = [r for r in invocation_records(server.log_records()) if r["function"] == "hello"]
    assert line["source"] == "async" and line["outcome"] == "ok"
    assert line["request_id"] == "job-1" and line["status"] == 200


def test_a_failing_function_is_a_failed_job_with_its_error(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        request_id = server.post("/async-function/fail").json()["request_id"]
        job = job_when(server, request_id, "finished", "failed")
    assert job["status"] == "failed"
    assert job["http_status"] == 502
    assert job["result"] is None
    assert job["error"]["code"] == "function_failed"
    assert job["error"]["exit_code"] == 3


def test_any_invoke_method_queues(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            response = server.request(method, "/async-function/hello")
            assert response.status_code == 202, (method, response.text)
        assert server.request("HEAD", "/async-function/hello").status_code == 405


def test_the_checks_of_a_sync_call_come_first(functions: Path) -> None:
    with running(LiveServer(functions, "--api-key", "k-1", "--max-body", "1KB")) as server:
        key = {"X-API-Key": "k-1"}
        cases = [
            ({}, "/async-function/hello", b"{}", "application/json", 401, "unauthorized"),
            (key, "/async-function/nope", b"{}", "application/json", 404, "not_found"),
            (key, "/async-function/..%2fetc", b"{}", "application/json", 404, "not_found"),
            (key, "/async-function/hello", b"x" * 2048, "text/plain", 413,
             "payload_too_large"),
            (key, "/async-function/hello", b"{nope", "application/json", 400, "invalid_json"),
            ({**key, "X-Callback-Url": "ftp://example.test/x"}, "/async-function/hello",
             b"{}", "application/json", 400, "invalid_callback_url"),
        ]
        for i, (headers, path, body, content_type, status, code) in enumerate(cases):
            response = server.post(path, data=body, headers={
                **headers, "Content-Type": content_type, "X-Request-Id": f"refused-{i}"})
            assert response.status_code == status, (path, response.text)
            assert response.json()["code"] == code
            assert response.headers["X-Request-Id"] == f"refused-{i}"
            assert server.get(f"/jobs/refused-{i}", headers=key).status_code == 404
        assert server.get("/jobs/anything").status_code == 401
        assert server.stats(headers=key)["total_requests"] == 0


def test_unknown_jobs_are_404(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        for path in ("/jobs/no-such-job", "/jobs/a%20b", "/jobs/" + "x" * 200):
            response = server.get(path)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"


def test_a_request_id_in_use_is_a_409(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        headers = {"X-Request-Id": "same-id"}
        assert server.post("/async-function/hello", headers=headers).status_code == 202
        response = server.post("/async-function/hello", headers=headers)
        assert response.status_code == 409
        assert response.json()["code"] == "conflict"


def test_callbacks_carry_the_result_and_the_headers(functions: Path) -> None:
    with CallbackReceiver() as receiver, running(LiveServer(functions)) as server:
        ok = server.post("/async-function/hello", json={"name": "Bo"},
                         headers={"X-Callback-Url": receiver.url, "X-Request-Id": "cb-ok"})
        failed = server.post("/async-function/fail",
                             headers={"X-Callback-Url": receiver.url, "X-Request-Id": "cb-f"})
        assert ok.status_code == failed.status_code == 202
        calls = {call.headers["X-Request-Id"]: call for call in receiver.wait_for(2)}
    good, bad = calls["cb-ok"], calls["cb-f"]
    assert json.loads(good.body)["hello"] == "Bo"
    assert good.headers["X-Function-Name"] == "hello"
    assert good.headers["X-Function-Status"] == "200"
    assert good.headers["Content-Type"] == "application/json"
    assert float(good.headers["X-Duration-Seconds"]) > 0
    assert bad.headers["X-Function-Status"] == "502"
    assert json.loads(bad.body)["code"] == "function_failed"


def test_a_dead_callback_receiver_holds_no_slot(functions: Path, tmp_path: Path) -> None:
    # the receiver answers 500 every time: its retries must not hold the only slot
    with CallbackReceiver(statuses=(500,) * 10) as receiver, \
            running(LiveServer(functions, "--concurrency", "1")) as server:
        first = server.post("/async-function/hello",
                            headers={"X-Callback-Url": receiver.url}).json()["request_id"]
        job_when(server, first, "finished")
        receiver.wait_for(2)  # retrying
        assert server.post("/function/hello").status_code == 200
        second = server.post("/async-function/hello").json()["request_id"]
        assert job_when(server, second, "finished", "failed")["status"] == "finished"


def test_a_full_queue_is_a_429_and_jobs_share_the_concurrency(functions: Path,
                                                              tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    event = {"gate": str(gate)}
    args = ("--concurrency", "1", "--queue-size", "2")
    with running(LiveServer(functions, *args)) as server:
        first = server.post("/async-function/gated", json=event).json()["request_id"]
        job_when(server, first, "running")
        waiting = [server.post("/async-function/gated", json=event) for _ in range(2)]
        assert [r.status_code for r in waiting] == [202, 202]
        full = server.post("/async-function/gated", json=event)
        assert full.status_code == 429
        assert full.json()["code"] == "too_many_requests"
        assert full.headers["Retry-After"]
        # the running job holds the one slot of --concurrency 1
        assert server.post("/function/hello").status_code == 429
        for response in waiting:
            assert server.get(f"/jobs/{response.json()['request_id']}").json()["status"] \
                == "queued"
        gate.write_text("open")
        for request_id in [first] + [r.json()["request_id"] for r in waiting]:
            job = job_when(server, request_id, "finished", "failed")
            assert job["status"] == "finished" and job["result"] == "opened\n"
        assert server.stats()["functions"]["gated"]["rejected_requests"] == 1


def test_jobs_waiting_at_shutdown_are_counted_as_lost(functions: Path, tmp_path: Path) -> None:
    event = {"gate": str(tmp_path / "never")}
    server = LiveServer(functions, "--concurrency", "1", "--graceful-timeout", "1s")
    with running(server):
        first = server.post("/async-function/gated", json=event).json()["request_id"]
        job_when(server, first, "running")
        for _ in range(3):
            assert server.post("/async-function/gated", json=event).status_code == 202
        server.session.close()  # an idle kept-alive connection would hold the worker
        gc.collect()
        assert server.stop(signal.SIGTERM) == 0
    [stopped] = [r for r in server.log_records() if "jobs_lost" in r]
    assert stopped["jobs_lost"] == 3, stopped
    assert stopped["level"] == "WARNING"


def test_a_lambda_event_goes_through_the_queue(functions: Path) -> None:
    with running(LiveServer(functions)) as server:
        response = server.post("/2015-03-31/functions/hello/invocations",
                               json={"name": "Lambda"},
                               headers={"X-Amz-Invocation-Type": "Event"})
        assert response.status_code == 202, response.text
        request_id = response.headers["x-amzn-RequestId"]
        job = job_when(server, request_id, "finished", "failed")
    assert job["status"] == "finished", job
    assert json.loads(job["result"])["hello"] == "Lambda"
    [line] = [r for r in invocation_records(server.log_records())
              if r.get("request_id") == request_id]
    assert line["source"] == "async"


def test_ended_jobs_are_forgotten_after_the_result_ttl(functions: Path) -> None:
    with running(LiveServer(functions, "--result-ttl", "1s")) as server:
        request_id = server.post("/async-function/hello").json()["request_id"]
        assert job_when(server, request_id, "finished")["http_status"] == 200
        assert wait_until(lambda: server.get(f"/jobs/{request_id}").status_code == 404, 10)
