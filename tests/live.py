"""A real server for end-to-end tests: `fnserve serve|dev DIR` (or any command) on a free
loopback port, its output in files, its process tree watched with psutil.

    with LiveServer(fn_dir, "--concurrency", "4") as server:
        response = server.post("/function/hello", json={"name": "Ada"})
    # leaving the block sends SIGTERM, waits for exit 0 and checks no child is left
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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
            except requests.ConnectionError:
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
