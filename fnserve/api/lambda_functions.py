"""Lambda's view of the functions directory (SPEC §9): names and ARNs in, configurations out.

A Lambda client names a function by its name, a partial ARN (ACCOUNT:function:NAME)
or a full ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME), each with an optional
qualifier. FnServe has one version of each function, $LATEST: any other qualifier
names nothing.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from ..registry import FunctionSpec
from ..runtimes import Runtime

LATEST = "$LATEST"
REGION = "local"
ACCOUNT = "000000000000"
_FULL_ARN = re.compile(r"arn:[^:]+:lambda:[^:]*:[^:]*:function:([^:]*)(?::(.*))?")
_PARTIAL_ARN = re.compile(r"[^:]*:function:([^:]*)(?::(.*))?")
_NAME = re.compile(r"([^:]*)(?::(.*))?")


def function_arn(name: str) -> str:
    """The ARN FnServe gives a function (the same as the handler's invoked_function_arn)."""
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


@dataclass(frozen=True)
class FunctionName:
    name: str
    qualifier: str | None

    @property
    def arn(self) -> str:
        arn = function_arn(self.name[:140])
        return f"{arn}:{self.qualifier[:140]}" if self.qualifier is not None else arn

    @property
    def latest(self) -> bool:
        return self.qualifier in (None, LATEST)


def parse_function_name(given: str, qualifier: str | None = None) -> FunctionName:
    """NAME, NAME:QUALIFIER, ACCOUNT:function:NAME[:Q] or a full ARN[:Q].

    The path was percent-decoded once by the server; a client that encoded it twice
    still names its function (a function name has no '%').
    """
    if "%" in given:
        given = unquote(given)
    match = (_FULL_ARN.fullmatch(given) or _PARTIAL_ARN.fullmatch(given)
             or _NAME.fullmatch(given))
    assert match is not None  # _NAME matches any string without a newline
    name, own_qualifier = match.group(1), match.group(2)
    if own_qualifier is not None and qualifier is not None and own_qualifier != qualifier:
        # two different qualifiers name no version at all
        return FunctionName(name, f"{own_qualifier}/{qualifier}")
    return FunctionName(name, own_qualifier if own_qualifier is not None else qualifier)


def _runtime_name(spec: FunctionSpec) -> str:
    if spec.runtime == "python":
        if spec.settings.python:
            return "python3"
        return f"python{sys.version_info.major}.{sys.version_info.minor}"
    if spec.runtime == "go":
        return "go1.x"
    return "provided"


_DEFINES_HANDLER = re.compile(r"^(?:async\s+)?def\s+handler\b|^handler\s*=", re.M)


def _handler(spec: FunctionSpec) -> str:
    """MODULE.FUNCTION for a fork/warm handler, as Lambda writes it; the file that runs
    for any other function (process mode runs the file itself)."""
    settings = spec.settings
    if spec.runtime != "python" or settings.mode not in ("fork", "warm"):
        return spec.entry.name
    handler = settings.handler
    if handler is None:  # the bootstrap's rule: `handler`, else `lambda_handler`
        try:
            source = spec.entry.read_text(errors="replace")
        except OSError:
            source = ""
        handler = "handler" if _DEFINES_HANDLER.search(source) or \
            "lambda_handler" not in source else "lambda_handler"
    return f"{spec.entry.stem}.{handler}"


def _last_modified(spec: FunctionSpec) -> str:
    try:
        mtime = spec.entry.stat().st_mtime
    except OSError:  # removed since the scan: the configuration is still shown
        mtime = 0.0
    stamp = datetime.fromtimestamp(mtime, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}+0000"


def memory_size_mb(spec: FunctionSpec) -> int:
    """The configured memory limit in MiB, 0 when there is none (as the handler's
    context.memory_limit_in_mb)."""
    memory = spec.settings.memory
    return max(1, memory // (1024 * 1024)) if memory else 0


def configuration(spec: FunctionSpec, runtime: Runtime, server_timeout: float) -> dict[str, Any]:
    """A FunctionConfiguration as ListFunctions and GetFunction answer it."""
    problem = runtime.problem(spec)
    config: dict[str, Any] = {
        "FunctionName": spec.name,
        "FunctionArn": function_arn(spec.name),
        "Runtime": _runtime_name(spec),
        "Handler": _handler(spec),
        # Lambda's Timeout is whole seconds; a 300ms deadline shows as 1
        "Timeout": max(1, math.ceil(spec.deadline(server_timeout))),
        "MemorySize": memory_size_mb(spec),
        "Version": LATEST,
        "LastModified": _last_modified(spec),
        "PackageType": "Zip",
        "State": "Active" if problem is None else "Failed",
        "LastUpdateStatus": "Successful",
    }
    if problem is not None:
        config["StateReason"] = problem
    return config
