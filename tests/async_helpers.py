"""Real things the async tests need: a callback receiver on a free port, a redis-server.

    with CallbackReceiver() as receiver:          # a tiny HTTP server in the test
        ... X-Callback-Url: receiver.url ...
        call = receiver.wait_for(1)[0]            # (headers, body) of each POST

    with RedisServer(tmp_path) as redis_url:      # redis-server on a free loopback port
        ...
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.helpers import wait_until
from tests.live import free_port

REDIS_SERVER = shutil.which("redis-server")


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class CallbackReceiver:
    """Records every POST; answers `statuses` in turn (then 200), e.g. (500, 500) to fail twice."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.calls: list[Received] = []
        self.statuses = list(statuses)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.calls.append(Received(self.path, dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CallbackReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        assert wait_until(lambda: len(self.calls) >= count, timeout), \
            f"expected {count} callbacks in {timeout}s, got {len(self.calls)}"
        with self._lock:
            return list(self.calls)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port, nothing on disk; yields its URL."""
    assert REDIS_SERVER is not None
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
                return False

        assert wait_until(ready, 10.0), "redis-server did not answer PING in 10s"
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


