"""Lambda Invoke API benchmark: what the Lambda route costs over /function/<name>. Run by hand.

    .venv/bin/python bench/lambda.py [--requests 2000] [--threads 8] [--rounds 4]

One `fnserve serve` (and one with --api-key, for the signed figures) on a temporary
functions directory with one exec function that prints `{}`: the cheapest function
there is, so the route's own cost is not lost in the function's start. Each round
measures, in turn and on the same server:

1. a keep-alive HTTP client (http.client), sequential: POST /function/noop, then the
   same request to POST /2015-03-31/functions/noop/invocations; client-observed
   latency and the server's own X-Duration-Seconds;
2. the same with --threads client threads;
3. boto3 `invoke()` sequential and with --threads threads (one client, retries off):
   what a Lambda user's code sees, boto3's own client-side work included;
4. --api-key: /function/noop with X-API-Key vs Invoke with a SigV4 signature made once
   by botocore and resent (valid for 15 minutes): the cost of verifying it.

The goal (issue 10): the Lambda route costs at most 0.2 ms more per call than
/function/<name> at the median. Figures pool every round; rounds alternate the routes
so both see the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from live import LiveServer  # noqa: E402

KEY = "k-bench-lambda"
HTTP_PATH = "/function/noop"
LAMBDA_PATH = "/2015-03-31/functions/noop/invocations"
Sample = tuple[float, float]  # (client seconds, server X-Duration-Seconds)


def _functions(directory: Path) -> None:
    noop = directory / "noop"
    noop.write_text("#!/bin/sh\necho '{}'\n")
    noop.chmod(0o755)


def _http_loop(port: int, path: str, headers: dict[str, str], count: int,
               out: list[Sample]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", path, body=b"{}", headers=headers)
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status}")
            out.append((elapsed, float(response.getheader("X-Duration-Seconds") or "nan")))
    finally:
        connection.close()


def _boto3_loop(client: Any, count: int, out: list[Sample]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        response = client.invoke(FunctionName="noop", Payload=b"{}")
        response["Payload"].read()
        elapsed = time.perf_counter() - started
        server = response["ResponseMetadata"]["HTTPHeaders"].get("x-duration-seconds", "nan")
        out.append((elapsed, float(server)))


def _threads(target: Callable[[int, list[Sample]], None], count: int, threads: int,
             out: list[Sample]) -> float:
    """Run target(count / threads, out) in `threads` threads; the wall time."""
    started = time.perf_counter()
    workers = [threading.Thread(target=target, args=(count // threads, out))
               for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def _ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _row(name: str, samples: list[Sample], wall: float, cpu: float) -> dict[str, float]:
    client = [c for c, _ in samples]
    server = [s for _, s in samples]
    row = {"median": _ms(client, 0.5), "p90": _ms(client, 0.9),
           "server": statistics.median(server) * 1000, "rps": len(samples) / wall,
           "cpu": cpu / len(samples) * 1000}
    print(f"  {name:<44} {row['median']:7.3f} {row['p90']:7.3f} {row['server']:8.3f} "
          f"{row['rps']:8.0f} {row['cpu']:10.3f}")
    return row


def _server_cpu(servers: Sequence[LiveServer]) -> float:
    """CPU seconds the servers' own processes (master, worker) used: not the functions'."""
    total = 0.0
    for server in servers:
        assert server.proc is not None
        for process in (psutil.Process(server.proc.pid), *server.workers()):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _signed_headers(port: int) -> dict[str, str]:
    request = AWSRequest("POST", f"http://127.0.0.1:{port}{LAMBDA_PATH}", data=b"{}",
                         headers={"Host": f"127.0.0.1:{port}"})
    SigV4Auth(Credentials("AKIDBENCH", KEY), "lambda", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def _client(server: LiveServer, key: str = "unused") -> Any:
    return boto3.client("lambda", endpoint_url=server.base, region_name="us-east-1",
                        aws_access_key_id="AKIDBENCH", aws_secret_access_key=key,
                        config=Config(retries={"max_attempts": 0},
                                      max_pool_connections=64))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per phase and round")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    count, threads = args.requests, args.threads
    directory = Path(tempfile.mkdtemp(prefix="fnserve-bench-lambda-"))
    _functions(directory)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {count} requests per "
          f"phase and round, {args.rounds} rounds, {threads} threads")
    pools: dict[str, list[Sample]] = {}
    walls: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def measure(name: str, run: Callable[[list[Sample]], float]) -> None:
        out: list[Sample] = []
        before = _server_cpu(servers)
        walls[name] = walls.get(name, 0.0) + run(out)
        cpu[name] = cpu.get(name, 0.0) + _server_cpu(servers) - before
        pools.setdefault(name, []).extend(out)

    json_headers = {"Content-Type": "application/json"}
    with _serving(directory) as server, _serving(directory, "--api-key", KEY) as keyed:
        servers = (server, keyed)
        client, signed_client = _client(server), _client(keyed, KEY)
        signed = _signed_headers(keyed.port)
        for _ in range(args.rounds):
            for label, path in (("http.client /function", HTTP_PATH),
                                ("http.client Invoke", LAMBDA_PATH)):
                measure(f"{label}, sequential", lambda out, path=path: _timed(
                    lambda: _http_loop(server.port, path, json_headers, count, out)))
                measure(f"{label}, {threads} threads", lambda out, path=path: _threads(
                    lambda n, o: _http_loop(server.port, path, json_headers, n, o),
                    count, threads, out))
            measure("boto3 invoke, sequential",
                    lambda out: _timed(lambda: _boto3_loop(client, count, out)))
            measure(f"boto3 invoke, {threads} threads", lambda out: _threads(
                lambda n, o: _boto3_loop(client, n, o), count, threads, out))
            measure("--api-key: /function + X-API-Key, sequential", lambda out: _timed(
                lambda: _http_loop(keyed.port, HTTP_PATH, {**json_headers, "X-API-Key": KEY},
                                   count, out)))
            measure("--api-key: Invoke + SigV4, sequential", lambda out: _timed(
                lambda: _http_loop(keyed.port, LAMBDA_PATH, signed, count, out)))
            measure("--api-key: boto3 invoke signed, sequential",
                    lambda out: _timed(lambda: _boto3_loop(signed_client, count, out)))
        print(f"\n  {'':<44} {'client ms':>15} {'server':>8} {'req/s':>8} {'server CPU':>10}")
        print(f"  {'':<44} {'median':>7} {'p90':>7} {'median':>8} {'':>8} {'ms/call':>10}")
        rows = {name: _row(name, samples, walls[name], cpu[name]) for name, samples
                in pools.items()}
    print()
    for base, lam in (("http.client /function, sequential", "http.client Invoke, sequential"),
                      (f"http.client /function, {threads} threads",
                       f"http.client Invoke, {threads} threads"),
                      ("--api-key: /function + X-API-Key, sequential",
                       "--api-key: Invoke + SigV4, sequential")):
        client_delta = rows[lam]["median"] - rows[base]["median"]
        server_delta = rows[lam]["server"] - rows[base]["server"]
        cpu_delta = rows[lam]["cpu"] - rows[base]["cpu"]
        print(f"  Invoke - /function ({base.split(',')[-1].strip()}"
              f"{', keyed' if 'api-key' in base else ''}): client {client_delta:+.3f} ms, "
              f"server {server_delta:+.3f} ms at the median (goal <= 0.2 ms); "
              f"server CPU {cpu_delta:+.3f} ms per call")
    return 0


@contextlib.contextmanager
def _serving(directory: Path, *args: str) -> Iterator[LiveServer]:
    """A started server, stopped on the way out; one that fails to start is killed, not
    left running (a loaded machine can make its readiness check time out)."""
    server = LiveServer(directory, "--concurrency", "64", *args, ready_timeout=120)
    try:
        server.start()
    except BaseException:
        server.kill()
        raise
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    server.stop()


def _timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
