"""Slow and idle clients against `fnserve serve`: how long a normal request waits. By hand.

    .venv/bin/python bench/slowloris.py --mode slow --connections 40 --concurrency 4
    .venv/bin/python bench/slowloris.py --mode idle --connections 300

gunicorn's gthread worker reads a request's headers in one of its threads
(--concurrency + 16), blocking. `slow` opens CONNECTIONS connections that each send
their request headers one byte every --interval seconds (slowloris); `idle` opens
CONNECTIONS connections that send nothing. Once they are open, a normal request
(GET /healthz on a fresh connection) is timed, up to --timeout seconds. The figures
in docs/reliability.md come from this script.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from live import LiveServer  # noqa: E402

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 2000 + b"\r\n\r\n"


def drip(port: int, interval: float, stop: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for byte in REQUEST:
                if stop.wait(interval):
                    return
                sock.sendall(bytes([byte]))
    except OSError:
        return  # refused or reset by the server: that is its answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("slow", "idle"), default="slow")
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="fnserve-slowloris-"))
    (directory / "ok.py").write_text("print('ok')\n")
    server = LiveServer(directory, "--concurrency", str(args.concurrency))
    stop = threading.Event()
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []
    with server:
        try:
            for _ in range(args.connections):
                if args.mode == "slow":
                    thread = threading.Thread(target=drip, args=(server.port, args.interval,
                                                                 stop), daemon=True)
                    thread.start()
                    threads.append(thread)
                else:
                    sockets.append(socket.create_connection(("127.0.0.1", server.port)))
            time.sleep(1.0)  # let the worker's threads pick the connections up
            started = time.monotonic()
            try:
                status = str(requests.get(server.url("/healthz"), timeout=args.timeout,
                                          headers={"Connection": "close"}).status_code)
            except requests.RequestException as exc:
                status = f"no answer ({type(exc).__name__})"
            waited = time.monotonic() - started
            threads_total = args.concurrency + 16
            print(f"{args.mode}: {args.connections} connections against {threads_total} "
                  f"threads (--concurrency {args.concurrency}): a normal request waited "
                  f"{waited:.1f} s, {status}")
        finally:
            stop.set()
            for sock in sockets:
                sock.close()
            for thread in threads:
                thread.join(5)
            server.session.close()


if __name__ == "__main__":
    main()
