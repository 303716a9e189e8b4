"""What an invocation came to: the ONE mapping from an executor Result, or an error, to
the HTTP status, the statistics outcome, the log line's fields and the response body.

Every caller (the /function route, the Lambda API, the queue, replay) turns its run
into an `Outcome` here and reports that same object to the statistics, the log and
the history, so the three can never disagree. Building an Outcome cannot fail: a
function's output that cannot be classified is sent as text, never turned into a 500
after the statistics have counted a success.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import format_duration
from .errors import (
    BuildFailed,
    ClientClosed,
    FnServeError,
    FunctionFailed,
    FunctionTimeout,
    InitFailed,
    OutputTooLarge,
    Unavailable,
)
from .executor import Result
from .registry import FunctionSpec

DEV_STDERR_TAIL = 4096
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
_FIRST_BYTE = re.compile(rb"\s*(\S)")


@dataclass(frozen=True)
class Outcome:
    outcome: str  # the one word stats, metrics, logs and history use
    status: int  # what a synchronous /function call answers
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    error: FnServeError | None = None
    result: Result | None = None  # None when refused before anything ran

    @property
    def ok(self) -> bool:
        return self.error is None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json(data: bytes | str) -> Any:
    """json.loads, strict: ValueError for NaN/Infinity (JSON.parse refuses them) and for
    nesting too deep to parse (RecursionError), which is bad input, not our fault."""
    try:
        return json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def output_type(body: bytes) -> str:
    """application/json when `body` parses as JSON, else text/plain. Never raises."""
    head = _FIRST_BYTE.match(body)  # not body.lstrip(): that copies up to --max-output
    if not head or head.group(1) not in b'{["-0123456789tfn':
        return TEXT_TYPE
    try:
        parse_json(body)
    except ValueError:  # UnicodeDecodeError included
        return TEXT_TYPE
    return JSON_TYPE


def from_error(error: FnServeError, request_id: str | None,
               result: Result | None = None) -> Outcome:
    return Outcome(error.outcome, error.status, json.dumps(error.body(request_id)).encode(),
                   JSON_TYPE, error.headers, error, result)


def error_for(result: Result, spec: FunctionSpec, *, deadline: float, max_output: int,
              dev: bool = False, draining: bool = False) -> FnServeError | None:
    """The error a Result stands for; None for a success."""
    outcome = result.outcome
    if outcome == "ok":
        return None
    if outcome == "timeout":
        return FunctionTimeout(f"function timed out after {format_duration(deadline)}")
    if outcome == "output_too_large":
        return OutputTooLarge(f"function output is larger than {max_output} bytes")
    if outcome == "build_failed":
        return BuildFailed(result.error or "function does not build")
    if outcome == "unavailable":  # the server could not start it: out of fds, memory
        return Unavailable(result.error or "server is out of resources")
    if outcome == "cancelled":
        # killed by the shutdown: the client is still there and deserves an answer
        return Unavailable() if draining else ClientClosed()
    extra: dict[str, Any] = {}
    if result.error_type:
        extra["error_type"] = result.error_type
        extra["error_message"] = result.error_message
    if outcome == "init_failed":
        return InitFailed(result.error or f"{result.error_type}: {result.error_message}", **extra)
    if result.signal is not None:
        extra["signal"] = result.signal
        message = f"function was killed by signal {result.signal}"
    elif result.error_type:
        message = result.error or f"function raised {result.error_type}"
    else:
        extra["exit_code"] = result.exit_code
        message = result.error or f"function exited with status {result.exit_code}"
    if dev:
        extra["stderr"] = result.stderr_tail[-DEV_STDERR_TAIL:].decode("utf-8", "replace")
    if _removed(spec.entry):
        # deleted since this worker scanned DIR (serve rescans only on SIGHUP): say so,
        # rather than only "exited with status 2" from an interpreter that could not
        # open its script; the path itself is not the client's business
        message += " (its file was removed from the functions directory)"
    return FunctionFailed(message, **extra)


def from_result(result: Result, spec: FunctionSpec, *, deadline: float, max_output: int,
                dev: bool = False, draining: bool = False) -> Outcome:
    error = error_for(result, spec, deadline=deadline, max_output=max_output, dev=dev,
                      draining=draining)
    if error is not None:
        return from_error(error, result.context.request_id, result)
    return Outcome("ok", 200, result.stdout, output_type(result.stdout), result=result)


def _removed(path: Path) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # unreadable is not gone: the start fails and says why
        return False
    return False
