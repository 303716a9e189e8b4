"""Async invocations on Redis (SPEC §11, --queue): real redis-server, real `fnserve serve`
instances and separate `fnserve worker` processes, all on free loopback ports.

In CI (CI set) a skipped test here fails the run (tests/conftest.py, marker `redis`).
"""

from __future__ import annotations

import gc
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.async_helpers import REDIS_SERVER, CallbackReceiver, flush, redis_server
from tests.helpers import (
    PYTHON,
    fnserve_cli,
    process_gone,
    read_pid,
    wait_until,
    write_function,
    write_toml,
)
from tests.live import LiveServer, free_port, invocation_records, running
from tests.test_async_local import GATED, HELLO, job_when

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

# appends its request id to a file: each line is one run
COUNTED = """
import json, os, sys
ledger = json.load(sys.stdin)["ledger"]
with open(ledger, "a") as handle:
    handle.write(os.environ["FN_REQUEST_ID"] + "\\n")
print("counted")
"""

# leaves a grandchild in its group and writes its pid; never ends by itself
FORKS = """
import json, subprocess, sys
pids = json.load(sys.stdin)["pids"]
child = subprocess.Popen(["sleep", "300"])
with open(pids, "w") as handle:
    handle.write(f"{child.pid}\\n")
child.wait()
"""

# fails on its first run, succeeds on the next (a counter file)
FLAKY = """
import json, os, sys
counter = json.load(sys.stdin)["counter"]
runs = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(runs + 1))
if runs == 0:
    sys.exit(1)
print(f"run {runs + 1}")
"""

# like GATED, but writes its pid first so the test can see it run (and clean it up)
GATED_PID = """
import json, os, sys, time
event = json.load(sys.stdin)
with open(event["pid"], "w") as handle:
    handle.write(f"{os.getpid()}\\n")
while not os.path.exists(event["gate"]):
    time.sleep(0.01)
print("opened")
"""


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def queue_url(redis_url: str) -> str:
    flush(redis_url)
    return redis_url


@pytest.fixture
def functions(fn_dir: Path) -> Path:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "gated.py", GATED)
    write_function(fn_dir, "counted.py", COUNTED)
    write_function(fn_dir, "forks.py", FORKS)
    write_function(fn_dir, "flaky.py", FLAKY)
    write_function(fn_dir, "stuck.py", GATED_PID)
    write_function(fn_dir, "stuck_once.py", GATED_PID)
    write_toml(fn_dir, """
        [functions.forks]
        timeout = "1s"

        [functions.flaky]
        retries = 2

        [functions.stuck]
        retries = 1
    """)
    return fn_dir


def worker(functions: Path, queue_url: str, *args: str) -> LiveServer:
    """`fnserve worker` as a LiveServer: ready when its --metrics-port /healthz answers."""
    port = free_port()
    return LiveServer(functions, port=port, command=[
        PYTHON, "-m", "fnserve", "worker", str(functions), "--queue", queue_url,
        "--metrics-port", str(port), *args])


def serve(functions: Path, queue_url: str, *args: str) -> LiveServer:
    return LiveServer(functions, "--queue", queue_url, *args)


def stop_cleanly(process: LiveServer) -> None:
    process.session.close()
    gc.collect()
    assert process.stop() == 0, process.stderr()


def test_twenty_jobs_through_a_worker_run_exactly_once(functions: Path, queue_url: str,
                                                       tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    with running(serve(functions, queue_url)) as server:
        ids = []
        for i in range(20):
            response = server.post("/async-function/counted", json={"ledger": str(ledger)},
                                   headers={"X-Request-Id": f"job-{i}"})
            assert response.status_code == 202, response.text
            ids.append(response.json()["request_id"])
        assert server.get("/jobs/job-0").json()["status"] == "queued"  # no worker yet
        with running(worker(functions, queue_url)) as runner:
            for request_id in ids:
                job = job_when(server, request_id, "finished", "failed")
                assert job["status"] == "finished", job
                assert job["result"] == "counted\n" and job["http_status"] == 200
            assert runner.get("/stats").json()["functions"]["counted"]["success_requests"] \
                == 20
            assert "fnserve_requests_total" in runner.get("/metrics").text
        # any serve instance answers for any job
        with running(serve(functions, queue_url)) as other:
            assert other.get("/jobs/job-7").json()["status"] == "finished"
    assert sorted(ledger.read_text().split()) == sorted(ids)
    lines = invocation_records(runner.log_records())
    assert len(lines) == 20
    assert {line["source"] for line in lines} == {"async"}
    assert {line["request_id"] for line in lines} == set(ids)


def test_a_worker_sends_the_callback(functions: Path, queue_url: str) -> None:
    with CallbackReceiver() as receiver, running(serve(functions, queue_url)) as server, \
            running(worker(functions, queue_url)):
        response = server.post("/async-function/hello?p=x", json={"name": "Cy"},
                               headers={"X-Callback-Url": receiver.url,
                                        "X-Request-Id": "cb-redis"})
        assert response.status_code == 202
        [call] = receiver.wait_for(1)
    assert call.headers["X-Request-Id"] == "cb-redis"
    assert call.headers["X-Function-Name"] == "hello"
    assert call.headers["X-Function-Status"] == "200"
    assert float(call.headers["X-Duration-Seconds"]) > 0
    assert json.loads(call.body) == {"hello": "Cy", "request_id": "cb-redis", "param": "x"}


def test_the_deadline_in_a_worker_kills_the_process_group(functions: Path, queue_url: str,
                                                          tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with running(serve(functions, queue_url)) as server, \
            running(worker(functions, queue_url)):
        request_id = server.post("/async-function/forks",
                                 json={"pids": str(pids)}).json()["request_id"]
        grandchild = read_pid(pids, timeout=30)
        job = job_when(server, request_id, "finished", "failed")
        assert job["status"] == "failed"
        assert job["http_status"] == 504
        assert job["error"]["code"] == "timeout"
        assert wait_until(lambda: process_gone(grandchild), 10)


def test_retries_run_a_failed_job_again(functions: Path, queue_url: str,
                                        tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    with running(serve(functions, queue_url)) as server, \
            running(worker(functions, queue_url)):
        request_id = server.post("/async-function/flaky",
                                 json={"counter": str(counter)}).json()["request_id"]
        job = job_when(server, request_id, "finished", "failed")
    assert job["status"] == "finished", job
    assert job["result"] == "run 2\n"
    assert counter.read_text() == "2"


def test_a_job_without_retries_fails_once(functions: Path, queue_url: str) -> None:
    write_function(functions, "fail.py", "import sys\nsys.exit(4)\n")
    with running(serve(functions, queue_url)) as server, \
            running(worker(functions, queue_url)):
        request_id = server.post("/async-function/fail").json()["request_id"]
        job = job_when(server, request_id, "finished", "failed")
    assert job["status"] == "failed" and job["http_status"] == 502
    assert job["error"]["code"] == "function_failed" and job["error"]["exit_code"] == 4


def _kill_with_its_functions(process: LiveServer) -> None:
    """SIGKILL a worker, as the OOM killer would; its function processes go too."""
    children = process.descendants()
    for child in children:
        child.kill()
    assert process.proc is not None
    process.proc.kill()
    process.proc.wait()
    assert wait_until(lambda: all(process_gone(child.pid) for child in children), 10)


def test_a_worker_killed_mid_job_loses_no_job(functions: Path, queue_url: str,
                                              tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with CallbackReceiver() as receiver, running(serve(functions, queue_url)) as server:
        # `stuck` has retries = 1, `stuck_once` none
        retried = server.post("/async-function/stuck", json={
            "gate": str(gate), "pid": str(tmp_path / "a.pid")}).json()["request_id"]
        failed = server.post("/async-function/stuck_once", json={
            "gate": str(gate), "pid": str(tmp_path / "b.pid")},
            headers={"X-Callback-Url": receiver.url}).json()["request_id"]
        first, second = worker(functions, queue_url), worker(functions, queue_url)
        try:
            first.start()
            second.start()
            for request_id in (retried, failed):
                job_when(server, request_id, "running")
        finally:
            _kill_with_its_functions(first)
            _kill_with_its_functions(second)
        gate.write_text("open")
        # nobody is left to notice: /jobs itself finds the abandoned jobs once their
        # heartbeat is older than HEARTBEAT_TTL (15 s)
        job = job_when(server, failed, "failed", timeout=40)
        assert job["error"]["code"] == "worker_died", job
        assert "worker died" in job["error"]["error"]
        [call] = receiver.wait_for(1)
        assert call.headers["X-Request-Id"] == failed
        assert call.headers["X-Function-Status"] == "503"
        assert json.loads(call.body)["code"] == "worker_died"
        assert job_when(server, retried, "queued", timeout=40)["status"] == "queued"
        with running(worker(functions, queue_url)):
            job = job_when(server, retried, "finished", "failed")
        assert job["status"] == "finished" and job["result"] == "opened\n"


def test_sigterm_lets_the_running_job_finish(functions: Path, queue_url: str,
                                             tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with running(serve(functions, queue_url)) as server:
        runner = worker(functions, queue_url).start()
        request_id = server.post("/async-function/stuck_once", json={
            "gate": str(gate), "pid": str(tmp_path / "pid")}).json()["request_id"]
        job_when(server, request_id, "running")
        assert runner.proc is not None
        runner.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: runner.get("/healthz").status_code == 503)
        gate.write_text("open")
        stop_cleanly(runner)
        assert job_when(server, request_id, "finished")["result"] == "opened\n"


def test_sigterm_past_the_grace_period_puts_the_job_back(functions: Path, queue_url: str,
                                                         tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pid_file = tmp_path / "pid"
    with running(serve(functions, queue_url)) as server:
        runner = worker(functions, queue_url, "--graceful-timeout", "1s").start()
        request_id = server.post("/async-function/stuck_once", json={
            "gate": str(gate), "pid": str(pid_file)}).json()["request_id"]
        job_when(server, request_id, "running")
        function_pid = read_pid(pid_file)
        stop_cleanly(runner)  # SIGTERM; the run is killed after 1 s, the job put back
        assert process_gone(function_pid)
        assert server.get(f"/jobs/{request_id}").json()["status"] == "queued"
        gate.write_text("open")
        with running(worker(functions, queue_url)):
            job = job_when(server, request_id, "finished", "failed")
        assert job["status"] == "finished", job


def test_redis_down_is_a_503_not_a_hang(functions: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with running(serve(functions, dead)) as server:
        response = server.post("/async-function/hello", timeout=30)
        assert response.status_code == 503
        assert response.json()["code"] == "queue_unavailable"
        assert response.headers["Retry-After"]
        status = server.get("/jobs/anything", timeout=30)
        assert status.status_code == 503 and status.json()["code"] == "queue_unavailable"
        assert server.post("/function/hello").status_code == 200  # sync calls go on


def test_worker_usage_errors_are_one_line(functions: Path, environ: dict[str, str]) -> None:
    no_queue = fnserve_cli("worker", str(functions), env=environ)
    assert no_queue.returncode == 2
    assert b"--queue" in no_queue.stderr and b"Traceback" not in no_queue.stderr
    dead = fnserve_cli("worker", str(functions), "--queue",
                       f"redis://127.0.0.1:{free_port()}/0", env=environ)
    assert dead.returncode == 2
    assert b"cannot reach Redis" in dead.stderr and b"Traceback" not in dead.stderr
    bad = fnserve_cli("worker", str(functions), "--queue", "amqp://x", env=environ)
    assert bad.returncode == 2 and b"not a Redis URL" in bad.stderr



def test_a_request_id_in_use_is_a_409(functions: Path, queue_url: str) -> None:
    with running(serve(functions, queue_url)) as server:
        headers = {"X-Request-Id": "taken"}
        assert server.post("/async-function/hello", headers=headers).status_code == 202
        response = server.post("/async-function/hello", headers=headers)
        assert response.status_code == 409
        assert response.json()["code"] == "conflict"
        assert server.get("/jobs/taken").json()["status"] == "queued"


def test_results_expire_after_the_result_ttl(functions: Path, queue_url: str) -> None:
    with running(serve(functions, queue_url, "--result-ttl", "2s")) as server, \
            running(worker(functions, queue_url)):
        request_id = server.post("/async-function/hello").json()["request_id"]
        assert job_when(server, request_id, "finished")["http_status"] == 200
        assert wait_until(lambda: server.get(f"/jobs/{request_id}").status_code == 404, 15)


HANDLER = """
def handler(event, context):
    return {"mode": event.get("mode"), "request_id": context["request_id"]}
"""


def test_a_worker_runs_fork_and_warm_functions(functions: Path, queue_url: str) -> None:
    write_function(functions, "forked.py", HANDLER)
    write_function(functions, "warmed.py", HANDLER)
    toml = (functions / "fnserve.toml").read_text()
    write_toml(functions, toml + """
        [functions.forked]
        mode = "fork"

        [functions.warmed]
        mode = "warm"
        pool = 1
    """)
    with running(serve(functions, queue_url)) as server, \
            running(worker(functions, queue_url)):
        ids = {mode: server.post(f"/async-function/{name}", json={"mode": mode}).json()[
            "request_id"] for mode, name in (("fork", "forked"), ("warm", "warmed"))}
        for mode, request_id in ids.items():
            job = job_when(server, request_id, "finished", "failed")
            assert job["status"] == "finished", job
            assert json.loads(job["result"]) == {"mode": mode, "request_id": request_id}
