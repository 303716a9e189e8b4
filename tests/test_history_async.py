"""Async invocations reach the history: run by the server's in-memory queue, or by a
`fnserve worker` from Redis (its own process, the same file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.async_helpers import REDIS_SERVER, flush, redis_server
from tests.helpers import PYTHON, wait_until, write_function
from tests.live import LiveServer, free_port, running

HELLO = "import sys\nsys.stdin.read()\nprint('{\"hello\": \"async\"}')\n"


def stored(server: LiveServer, request_id: str) -> dict[str, object]:
    def fetch() -> dict[str, object] | None:
        response = server.get(f"/invocations/{request_id}")
        return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]

    record = wait_until(fetch, timeout=30)
    assert record, f"{request_id} was not recorded"
    return record  # type: ignore[no-any-return]


def test_in_memory_async_is_recorded(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    with running(LiveServer(fn_dir, "--history", str(tmp_path / "h.sqlite3"))) as server:
        response = server.post("/async-function/hello?x=1", json={"a": 1},
                               headers={"X-Request-Id": "async-1"})
        assert response.status_code == 202
        record = stored(server, "async-1")
        assert record["source"] == "async" and record["status"] == 200
        assert record["request"] == '{"a": 1}' and record["parameters"] == {"x": "1"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.mark.redis
@pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")
def test_a_worker_records_its_jobs_in_the_same_file(fn_dir: Path, tmp_path: Path,
                                                    redis_url: str) -> None:
    flush(redis_url)
    write_function(fn_dir, "hello.py", HELLO)
    path = str(tmp_path / "h.sqlite3")
    port = free_port()
    worker = LiveServer(fn_dir, port=port, command=[
        PYTHON, "-m", "fnserve", "worker", str(fn_dir), "--queue", redis_url,
        "--metrics-port", str(port), "--history", path])
    with running(LiveServer(fn_dir, "--queue", redis_url, "--history", path)) as server, \
            running(worker):
        response = server.post("/async-function/hello", json={"b": 2},
                               headers={"X-Request-Id": "redis-job-1"})
        assert response.status_code == 202
        record = stored(server, "redis-job-1")  # written by the worker's process
        assert record["source"] == "async" and record["outcome"] == "ok"
        assert record["response"] == '{"hello": "async"}\n'
