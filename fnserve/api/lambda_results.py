"""What Lambda clients get back from a run (SPEC §9): the function-error body, the log tail.

A function's own failure is not an API error: Lambda answers 200 with
X-Amz-Function-Error: Unhandled and a body saying what went wrong, and an SDK does
not retry it (it would retry a 5xx, running a function that already failed again).
"""

from __future__ import annotations

import base64
import math
import signal
from typing import Any

from ..executor import Result
from ..outcome import Outcome
from .lambda_functions import LATEST

TAIL_BYTES = 4096
# outcomes that are the function's own failure: 200 + X-Amz-Function-Error
FUNCTION_ERRORS = ("failed", "timeout", "output_too_large", "build_failed", "init_failed")


def _signal_name(number: int) -> str:
    try:
        return (signal.strsignal(number) or f"signal {number}").lower()
    except ValueError:
        return f"signal {number}"


def function_error(outcome: Outcome, request_id: str, deadline: float,
                   max_output: int) -> dict[str, Any]:
    """Lambda's {"errorMessage", "errorType", "stackTrace"} for a function's failure."""
    result = outcome.result
    prefix = f"RequestId: {request_id} Error: "
    if outcome.outcome == "timeout":
        return {"errorType": "Sandbox.Timedout",
                "errorMessage": f"{prefix}Task timed out after {deadline:.2f} seconds"}
    if outcome.outcome == "output_too_large":
        return {"errorType": "Function.ResponseSizeTooLarge",
                "errorMessage": f"Response payload size exceeded maximum allowed payload "
                                f"size ({max_output} bytes).", "stackTrace": []}
    message = str(outcome.error) if outcome.error is not None else "function failed"
    if outcome.outcome == "build_failed":
        return {"errorType": "Runtime.BuildFailed", "errorMessage": prefix + message,
                "stackTrace": []}
    if result is not None and result.error_type:  # a handler's exception (fork/warm)
        error_type = result.error_type
        if outcome.outcome == "init_failed":
            return _init_error(result)
        return {"errorMessage": result.error_message, "errorType": error_type,
                "requestId": request_id, "stackTrace": list(result.stack_trace)}
    if outcome.outcome == "init_failed":
        return {"errorType": "Runtime.InitError", "errorMessage": prefix + message,
                "stackTrace": []}
    if result is not None and result.signal is not None:
        detail = f"signal: {_signal_name(result.signal)}"
    elif result is not None and result.exit_code is not None:
        detail = f"exit status {result.exit_code}"
    else:
        detail = message
    return {"errorType": "Runtime.ExitError",
            "errorMessage": f"{prefix}Runtime exited with error: {detail}", "stackTrace": []}


def _init_error(result: Result) -> dict[str, Any]:
    """A module that does not import, or has no handler, as Lambda's Python runtime says it."""
    module = result.context.function
    if result.error_type == "HandlerNotFound":
        error_type, message = "Runtime.HandlerNotFound", result.error_message
    elif result.error_type in ("SyntaxError", "IndentationError", "TabError"):
        error_type = "Runtime.UserCodeSyntaxError"
        message = f"Syntax error in module '{module}': {result.error_message}"
    else:
        error_type = "Runtime.ImportModuleError"
        message = f"Unable to import module '{module}': {result.error_message}"
    return {"errorMessage": message, "errorType": error_type,
            "stackTrace": list(result.stack_trace)}


def log_tail(outcome: Outcome, request_id: str, deadline: float, memory_mb: int) -> str:
    """X-Amz-Log-Result: base64 of the last 4 KB of START, the function's lines, END,
    REPORT, as Lambda writes them to CloudWatch."""
    result: Result | None = outcome.result
    lines = [f"START RequestId: {request_id} Version: {LATEST}"]
    logged = (result.log_tail or result.stderr_tail) if result is not None else b""
    if logged:  # fork/warm: print() lines and stderr in order; process mode: stderr
        lines.extend(logged[-TAIL_BYTES:].decode("utf-8", "replace").rstrip("\n").split("\n"))
    if outcome.outcome == "timeout":
        lines.append(f"{request_id} Task timed out after {deadline:.2f} seconds")
    duration_ms = (result.duration if result is not None else 0.0) * 1000
    max_rss_kb = result.max_rss_kb if result is not None else None
    used_mb = math.ceil(max_rss_kb / 1024) if max_rss_kb else 0
    lines.append(f"END RequestId: {request_id}")
    lines.append(f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
                 f"Billed Duration: {max(1, math.ceil(duration_ms))} ms\t"
                 f"Memory Size: {memory_mb} MB\tMax Memory Used: {used_mb} MB\t")
    text = ("\n".join(lines) + "\n").encode("utf-8")
    return base64.b64encode(text[-TAIL_BYTES:]).decode("ascii")
