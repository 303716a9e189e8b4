"""Peak worker memory when large uploads meet a full server. Run by hand.

    .venv/bin/python bench/uploads.py [--uploads 20] [--size 5MB] [--concurrency 4]

Starts `fnserve serve` on a temporary functions directory with --concurrency N,
fills every slot with a function that waits for a release file, then sends U
uploads of SIZE bytes at once, each on its own connection (once with Content-Length,
once chunked). All of them must be refused 429, since the server is full: the
question is what that costs. It prints the statuses and the gunicorn worker's RSS
before and its peak (VmHWM, reset through /proc/PID/clear_refs before each round).

The server and the held functions are stopped on exit.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from live import LiveServer  # noqa: E402

MB = 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _chunks(size: int) -> Iterator[bytes]:
    piece = b"x" * (64 * 1024)
    sent = 0
    while sent < size:
        chunk = piece[:size - sent]
        sent += len(chunk)
        yield chunk


def _upload(port: int, size: int, chunked: bool, statuses: list[int | str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/octet-stream", "Connection": "close"}
        if chunked:
            connection.request("POST", "/function/ok", body=_chunks(size), headers=headers,
                               encode_chunked=True)
        else:
            connection.request("POST", "/function/ok", body=b"x" * size, headers=headers)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    except OSError as exc:  # a refusal may reset the connection while it still sends
        statuses.append(type(exc).__name__)
    finally:
        connection.close()


def _round(server: LiveServer, worker: int, uploads: int, size: int, chunked: bool) -> None:
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb(worker, "VmRSS")
    statuses: list[int | str] = []
    threads = [threading.Thread(target=_upload, args=(server.port, size, chunked, statuses))
               for _ in range(uploads)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    peak = _status_kb(worker, "VmHWM")
    kind = "chunked" if chunked else "Content-Length"
    print(f"{uploads} x {size / MB:g} MB, {kind:14}: statuses "
          f"{dict(collections.Counter(statuses))} in {elapsed:.2f} s; worker RSS "
          f"{before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB "
          f"(+{(peak - before) / 1024:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--size", type=float, default=5.0, help="MB per upload")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    size = int(args.size * MB)

    with tempfile.TemporaryDirectory(prefix="fnserve-uploads-") as tmp:
        directory, release = Path(tmp) / "functions", Path(tmp) / "release"
        directory.mkdir()
        (directory / "ok.py").write_text("import sys\nsys.stdin.buffer.read()\nprint('{}')\n")
        (directory / "held.py").write_text(
            "import os, time\n"
            f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.01)\n"
            "print('{}')\n")
        server = LiveServer(directory, "--concurrency", str(args.concurrency),
                            "--max-body", "6MB").start()
        held: list[threading.Thread] = []
        try:
            worker = server.workers()[0].pid
            for _ in range(args.concurrency):
                thread = threading.Thread(target=server.post, args=("/function/held",),
                                          kwargs={"headers": {"Connection": "close"}},
                                          daemon=True)
                thread.start()
                held.append(thread)
            deadline = time.monotonic() + 30
            while server.stats()["active_requests"] < args.concurrency:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not fill up")
                time.sleep(0.05)
            print(f"server full: --concurrency {args.concurrency}, every slot held")
            for chunked in (False, True):
                _round(server, worker, args.uploads, size, chunked)
        finally:
            release.touch()
            for thread in held:
                thread.join(30)
            server.session.close()
            server.stop()


if __name__ == "__main__":
    main()
