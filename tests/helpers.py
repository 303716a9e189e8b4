"""Plain helpers shared by the test modules: writing functions, polling, process checks.

Fixtures live in conftest.py; everything here is an ordinary function so a test
(or another conftest) can call it with its own arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from fnserve.context import Context, make_context
from fnserve.executor import DEFAULT_MAX_OUTPUT, Invocation
from fnserve.registry import FunctionSpec

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


def write_function(directory: Path, relpath: str, source: str, *, executable: bool = False,
                   dedent: bool = True) -> Path:
    """Write DIR/relpath (parents created); the source is dedented so tests can indent it."""
    path = directory / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip("\n") if dedent else source)
    if executable:
        path.chmod(0o755)
    return path


def write_held(directory: Path, state: Path, limit: float = 60.0) -> Path:
    """`held`: writes its pid to STATE/held.pid, then runs until the test creates
    STATE/release (a handshake, not a sleep; `limit` seconds at most)."""
    return write_function(directory, "held.py", f"""
        import os, time
        with open({str(state / "held.pid")!r}, "w") as f:
            f.write(f"{{os.getpid()}}\\n")
        deadline = time.monotonic() + {limit}
        while not os.path.exists({str(state / "release")!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print('{{"finished": true}}')
    """)


def in_background(send: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Call `send` in a daemon thread; its answer, or the exception it raised, lands in
    the list once the thread is done."""
    answer: list[Any] = []

    def run() -> None:
        try:
            answer.append(send())
        except Exception as exc:
            answer.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answer


def write_toml(directory: Path, text: str) -> Path:
    return write_function(directory, "fnserve.toml", text)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0,
               interval: float = 0.01) -> Any:
    """Poll until predicate() is truthy; its value, or False when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    # a killed orphan may linger as a zombie until its new parent reaps it: it runs no code
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pid(path: Path, timeout: float = 5.0) -> int:
    """The pid a function wrote to `path` (it may not have written it yet)."""
    def content() -> str:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return ""
        return text if text.endswith("\n") else ""

    text = wait_until(content, timeout)
    assert text, f"{path} was not written within {timeout}s"
    return int(text)


def invocation(spec: FunctionSpec, event: bytes = b"{}", timeout: float = 10.0, *,
               base_env: Mapping[str, str] | None = None,
               max_output: int = DEFAULT_MAX_OUTPUT,
               context: Context | None = None, **context_args: Any) -> Invocation:
    """An Invocation built the way fnserve.invoke.run_function builds one."""
    if context is None:
        context = make_context(spec.name, timeout, **context_args)
    if base_env is None:
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return Invocation(spec, context, event, time.monotonic() + timeout, base_env, max_output)


def fnserve_cli(*args: str, env: Mapping[str, str], cwd: Path | None = None,
                input: bytes | None = None, timeout: float = 60.0,
                ) -> subprocess.CompletedProcess[bytes]:
    """`python -m fnserve ARGS` in a subprocess; stdin is /dev/null unless input is given."""
    return subprocess.run(
        [PYTHON, "-m", "fnserve", *args], env=dict(env), cwd=cwd, input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True, timeout=timeout,
    )


def json_stdout(stdout: bytes) -> Any:
    return json.loads(stdout)
