"""Call one function without a server: what `fnserve run` does, as a library call."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from .config import build_environment, cache_dir
from .context import base_environment, make_context
from .errors import NotFound, UsageError
from .executor import Executor, Invocation, Result, StderrSink
from .outcome import parse_json
from .registry import FunctionSpec, load_registry, spec_for_path
from .runtimes import make_runtimes
from .sandbox import check_sandboxes, find_bwrap

RUN_TIMEOUT = 30.0


def resolve(target: str, directory: str | Path = ".") -> FunctionSpec:
    """TARGET is a path to a function file or directory, or a function name in DIR."""
    path = Path(target)
    try:
        if os.sep in target or path.suffix in (".py", ".go", ".sh") or \
                (path.exists() and not Path(directory, target).exists()):
            return spec_for_path(path)
        return load_registry(directory).get(target)
    except NotFound as exc:
        raise UsageError(str(exc)) from None


def parse_event(data: str | bytes | None) -> bytes:
    """--data JSON, or @FILE; the JSON is checked before anything runs."""
    if data is None:
        return b"{}"
    if isinstance(data, str) and data.startswith("@"):
        try:
            raw = Path(data[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"--data {data}: {exc.strerror}") from None
    else:
        raw = data.encode() if isinstance(data, str) else data
    if not raw.strip():
        return b"{}"
    try:
        parse_json(raw)
    except ValueError as exc:
        raise UsageError(f"--data is not valid JSON: {exc}") from None
    return raw


def run_function(
    target: str | FunctionSpec,
    event: bytes = b"{}",
    *,
    directory: str | Path = ".",
    parameters: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    stderr_sink: StderrSink | None = None,
    stdout_sink: StderrSink | None = None,
) -> Result:
    """Run one function once, through the same executor the server uses."""
    spec = target if isinstance(target, FunctionSpec) else resolve(target, directory)
    environ = os.environ if environ is None else environ
    # the function's own timeout (30s unless set), which --timeout can only shorten
    deadline = spec.settings.timeout or RUN_TIMEOUT
    if timeout is not None:
        deadline = min(deadline, timeout)
    context = make_context(spec.name, deadline,
                           parameters=parameters,
                           configured_env={**spec.settings.env, **(env or {})})
    bwrap = find_bwrap(environ.get("PATH"))
    check_sandboxes([spec], bwrap)
    executor = Executor(1, make_runtimes(cache_dir(environ), build_environment(environ)),
                        stderr_sink=stderr_sink, stderr_log_limit=None,
                        stdout_sink=stdout_sink, bwrap=bwrap)
    invocation = Invocation(spec, context, event, time.monotonic() + deadline,
                            base_environment(environ))
    try:
        return executor.run(invocation)
    finally:  # fork/warm: the fork server or warm process started for this one call
        executor.shutdown()
