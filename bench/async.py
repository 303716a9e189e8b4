"""Async invocations on Redis: enqueue rate, and end-to-end jobs/s with 1 and 2 workers. By hand.

    .venv/bin/python bench/async.py [--enqueue 5000] [--clients 8] [--jobs 1000]

In one run, on a temporary functions directory with an exec no-op function
(`#!/bin/sh`, `exit 0`) and a redis-server started on a free loopback port:

1. enqueue: `fnserve serve --queue redis://...` with no worker running; --clients
   keep-alive clients POST --enqueue requests to /async-function/noop -> accepted/s
   (goal >= 1,000/s) and latency; then the same clients on GET /healthz, the HTTP
   layer alone, as the ceiling on this machine; with wrk installed, both again
   with wrk (whose client takes less of the 2 cores than Python threads do);
2. end to end, for 1 and then 2 `fnserve worker` processes: --jobs jobs are queued
   first, then the workers start; once RQ's finished registry holds every job, the
   clock is the first job's start to the last job's end (RQ's own timestamps, so a
   worker's start-up is not counted) -> jobs/s.

Everything this script started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.live import LiveServer, free_port  # noqa: E402

PYTHON = sys.executable
GOAL_ENQUEUE = 1000.0


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("bench/async.py needs redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.05)
    return proc, url


def enqueue_load(port: int, total: int, clients: int, method: str = "POST",
                 path: str = "/async-function/noop", ok: int = 202,
                 ) -> tuple[float, list[float], int]:
    """`total` requests from `clients` keep-alive connections: (seconds, latencies, refused)."""
    latencies: list[float] = []
    refused = [0]
    lock = threading.Lock()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def client(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request(method, path, body=b"{}" if method == "POST" else None,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if response.status != ok:
                with lock:
                    refused[0] += 1
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, refused[0]


def wrk_rate(port: int, path: str, method: str, seconds: float, connections: int,
             script_dir: Path) -> tuple[float, int, str]:
    """wrk (a C load generator: the client costs less CPU than Python's) for `seconds`:
    (requests/s, non-2xx answers, wrk's latency line)."""
    script = script_dir / f"{method.lower()}.lua"
    script.write_text(f'wrk.method = "{method}"\n'
                      + ('wrk.body = "{}"\nwrk.headers["Content-Type"] = "application/json"\n'
                         if method == "POST" else ""))
    wrk = shutil.which("wrk")
    assert wrk is not None
    output = subprocess.run(
        [wrk, "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s", "-s", str(script),
         f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s*([\d.]+)", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    latency = next((line.strip() for line in output.splitlines()
                    if line.strip().startswith("Latency")), "")
    return rate, int(bad.group(1)) if bad else 0, latency


def end_to_end(functions: Path, url: str, server: LiveServer, jobs: int,
               workers: int) -> float:
    import redis
    from rq import Queue
    from rq.job import Job
    from rq.registry import FinishedJobRegistry
    from rq.serializers import JSONSerializer

    connection = redis.Redis.from_url(url)
    connection.flushdb()
    _seconds, _latencies, refused = enqueue_load(server.port, jobs, 4)
    assert refused == 0, f"{refused} jobs refused"
    queue = Queue("fnserve", connection=connection, serializer=JSONSerializer)
    finished = FinishedJobRegistry(queue=queue)
    procs = []
    started = time.perf_counter()
    for _ in range(workers):
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "fnserve", "worker", str(functions), "--queue", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO))
    try:
        while finished.count < jobs:
            if time.perf_counter() - started > 600:
                raise SystemExit(f"only {finished.count} of {jobs} jobs finished in 600 s")
            time.sleep(0.02)
        done = [job for job in Job.fetch_many(finished.get_job_ids(), connection=connection,
                                              serializer=JSONSerializer) if job is not None]
        first = min(job.started_at for job in done if job.started_at)
        last = max(job.ended_at for job in done if job.ended_at)
        elapsed = (last - first).total_seconds()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    connection.close()
    return jobs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enqueue", type=int, default=5000, help="requests for phase 1")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, phase 1")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs for phase 2")
    parser.add_argument("--seconds", type=float, default=5.0, help="each wrk run, phase 1")
    args = parser.parse_args()

    temp = Path(tempfile.mkdtemp(prefix="fnserve-bench-async-"))
    functions = temp / "functions"
    functions.mkdir()
    noop = functions / "noop"
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)
    redis_proc, url = start_redis(temp)
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"{platform.platform()}")
    try:
        env = dict(os.environ)
        with LiveServer(functions, "--queue", url, "--concurrency", "64", env=env) as server:
            seconds, latencies, refused = enqueue_load(server.port, args.enqueue, args.clients)
            rate = (args.enqueue - refused) / seconds
            latencies.sort()
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
            verdict = "met" if rate >= GOAL_ENQUEUE else "NOT met"
            floor_seconds, _, _ = enqueue_load(server.port, args.enqueue, args.clients,
                                               "GET", "/healthz", 200)
            floor = args.enqueue / floor_seconds
            print(f"\nenqueue into Redis, {args.clients} clients, {args.enqueue} requests: "
                  f"{rate:,.0f}/s (goal >= {GOAL_ENQUEUE:,.0f}/s: {verdict}), "
                  f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, refused {refused}")
            print(f"  the same client on GET /healthz (HTTP alone, no Redis): {floor:,.0f}/s; "
                  f"load average {os.getloadavg()[0]:.1f}")
            if shutil.which("wrk"):
                for path, method in (("/async-function/noop", "POST"), ("/healthz", "GET")):
                    rate, bad, latency = wrk_rate(server.port, path, method, args.seconds,
                                                  args.clients, temp)
                    print(f"  wrk -c {args.clients} {args.seconds:g}s, {method} {path}: "
                          f"{rate:,.0f}/s, non-2xx {bad}; {latency}")
            results: dict[int, Any] = {}
            for workers in (1, 2):
                results[workers] = end_to_end(functions, url, server, args.jobs, workers)
                print(f"end to end, exec no-op, {workers} worker(s), {args.jobs} jobs: "
                      f"{results[workers]:,.0f} jobs/s")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
