"""A real server for end-to-end tests: `fnserve serve|dev DIR` (or any command) on a free
loopback port, its output in files, its process tree watched with psutil.

    with LiveServer(fn_dir, "--concurrency", "4") as server:
        response = server.post("/function/hello", json={"name": "Ada"})
    # leaving the block sends SIGTERM, waits for exit 0 and checks no child is left
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import requests

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    def __init__(
        self,
        directory: Path | str,
        *args: str,
        mode: str = "serve",
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        port: int | None = None,
        ready_timeout: float = 30.0,
        check_clean_exit: bool = True,
    ) -> None:
        """`command` replaces `python -m fnserve MODE DIR --port P ARGS` (port in env)."""
        self.directory = Path(directory)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.environ = dict(os.environ if env is None else env)
        self.environ.setdefault("FNSERVE_PORT", str(self.port))
        self.environ.setdefault("FNSERVE_FUNCTIONS_DIR", str(self.directory))
        self.argv = list(command) if command is not None else [
            PYTHON, "-m", "fnserve", mode, str(self.directory), "--port", str(self.port), *args]
        self.ready_timeout = ready_timeout
        self.check_clean_exit = check_clean_exit
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.stdout_path = self.stderr_path = Path()
        self.known_pids: set[int] = set()

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> LiveServer:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="fnserve-live-"))
        self.stdout_path, self.stderr_path = out / "stdout", out / "stderr"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(self.argv, stdout=stdout, stderr=stderr,
                                         stdin=subprocess.DEVNULL, env=self.environ,
                                         cwd=REPO)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()}"
                                   f"\n{self.stdout()}")
            try:
                if self.session.get(self.url("/healthz"), timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not up, or a loaded machine
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {self.ready_timeout}s:\n{self.stderr()}")

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the server (workers, functions, builds); zombies excluded."""
        if self.proc is None:
            return []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
                    self.known_pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def function_processes(self) -> list[psutil.Process]:
        """Descendants that are not gunicorn workers (a function, its children, a build)."""
        workers = {p.pid for p in self.workers()}
        return [p for p in self.descendants() if p.pid not in workers]

    def workers(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server, wait for it, and check that nothing it started is left."""
        if self.proc is None:
            return 0
        self.descendants()  # remember who to look for afterwards
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        leftovers = [pid for pid in self.known_pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not leftovers, f"processes left after stop: {leftovers}"
        return code

    def kill(self) -> None:
        """Last resort for a test that failed half-way: end the server and what it started."""
        for process in self.descendants():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.kill()
            return
        code = self.stop()
        if self.check_clean_exit:
            assert code == 0, f"server exited with {code}:\n{self.stderr()}"

    # -- talking to it --------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base + path

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.request(method, self.url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def stats(self, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/stats", **kwargs).json()
        return body

    # -- its output -------------------------------------------------------------------

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.name else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.name else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Every stderr line parsed as JSON (raises on a line that is not JSON)."""
        return [json.loads(line) for line in self.stderr().splitlines() if line.strip()]


# -- raw HTTP, for what requests would normalise or hide (added for the HTTP suite) -------


def raw_request(server: LiveServer, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float = 30.0,
                ) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, the path sent byte for byte (`..` is not resolved).

    Header names in the answer are lower-cased.
    """
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def invocation_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The one-per-invocation log lines among a server's JSON records."""
    return [r for r in records if r.get("logger") == "fnserve.invocation"]


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


@contextlib.contextmanager
def running(server: LiveServer) -> Iterator[LiveServer]:
    """`with LiveServer(...)`, but the test's idle kept-alive connections are closed before
    the stop: a stopping gunicorn worker waits ~2 s for a request on each.

    requests leaves a finished response's socket open until the garbage collector takes
    it (it sits in a reference cycle), hence the collect: drop the responses you keep first.
    """
    with server:
        try:
            yield server
        finally:
            server.session.close()
            gc.collect()


# -- after a fault: is the server still whole? (added for the fault and hostile suites) ----


def the_worker(server: LiveServer) -> psutil.Process:
    """The one gunicorn worker of `fnserve serve` (workers = 1)."""
    workers = server.workers()
    assert len(workers) == 1, f"expected one worker, found {workers}"
    return workers[0]


def assert_serving(server: LiveServer, function: str, body: bytes | None = None) -> None:
    """/healthz answers 200 and `function` (a normal one) answers 200, on fresh connections."""
    health = requests.get(server.url("/healthz"), timeout=10)
    assert health.status_code == 200, health.text
    response = requests.post(server.url(f"/function/{function}"), timeout=30)
    assert response.status_code == 200, response.text
    if body is not None:
        assert response.content == body
