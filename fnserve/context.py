"""The invocation context (SPEC §2): request id, deadline, parameters, env, tracing.

Everything here takes plain values (a header getter, a dict of query values), so
the HTTP app and `fnserve run` build contexts the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

HeaderGetter = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Tracing:
    trace_id: str
    span_id: str
    parent_id: str = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"


@dataclass(frozen=True)
class Context:
    request_id: str
    function: str
    deadline: float
    tracing: Tracing
    parameters: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    timestamp: str = ""
    deadline_ms: int = 0
    client_context: Any = None  # Lambda's ClientContext (SPEC §9); in FN_CONTEXT when set

    def started(self, remaining: float, now: float | None = None) -> Context:
        """The context as the function sees it: stamped when its process starts."""
        now = time.time() if now is None else now
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return dataclasses.replace(
            self, timestamp=stamp, deadline=round(max(remaining, 0.0), 3),
            deadline_ms=int((now + max(remaining, 0.0)) * 1000))

    def to_json(self) -> str:
        document = {
            "request_id": self.request_id,
            "function": self.function,
            "timestamp": self.timestamp,
            "deadline": self.deadline,
            "deadline_ms": self.deadline_ms,
            "parameters": dict(self.parameters),
            "env": dict(self.env),
            # not dataclasses.asdict: it deep-copies, a tenth of a warm call's own time
            "tracing": {"trace_id": self.tracing.trace_id, "span_id": self.tracing.span_id,
                        "parent_id": self.tracing.parent_id},
        }
        if self.client_context is not None:
            document["client_context"] = self.client_context
        return json.dumps(document, separators=(",", ":"))


def new_span_id() -> str:
    return os.urandom(8).hex()


def request_id_from(header: str | None) -> str:
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return str(uuid.uuid4())


def tracing_from(get: HeaderGetter) -> Tracing:
    """W3C traceparent, else B3, else a new trace; malformed headers are ignored."""
    span = new_span_id()
    traceparent = (get("traceparent") or "").strip()
    match = _TRACEPARENT.fullmatch(traceparent)
    if match:
        version, trace_id, parent_id, _flags, rest = match.groups()
        valid_version = version != "ff" and (version != "00" or rest is None)
        if valid_version and trace_id != _ZERO_TRACE and parent_id != _ZERO_SPAN:
            return Tracing(trace_id, span, parent_id)
    b3_trace = (get("X-B3-TraceId") or "").strip().lower()
    b3_span = (get("X-B3-SpanId") or "").strip().lower()
    if _HEX16.fullmatch(b3_trace):
        b3_trace = "0" * 16 + b3_trace
    if _HEX32.fullmatch(b3_trace) and b3_trace != _ZERO_TRACE:
        parent = b3_span if _HEX16.fullmatch(b3_span) and b3_span != _ZERO_SPAN else ""
        return Tracing(b3_trace, span, parent)
    return Tracing(os.urandom(16).hex(), span, "")


def header_env_name(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def forwarded_env(get: HeaderGetter, headers: Iterable[str]) -> dict[str, str]:
    env = {}
    for header in headers:
        value = get(header)
        if value is not None and "\0" not in value:
            env[header_env_name(header)] = value
    return env


def make_context(
    function: str,
    timeout: float,
    *,
    request_id: str | None = None,
    parameters: Mapping[str, str] | None = None,
    forwarded: Mapping[str, str] | None = None,
    configured_env: Mapping[str, str] | None = None,
    tracing: Tracing | None = None,
    client_context: Any = None,
) -> Context:
    # configured env is applied last: a client never overrides a function's configuration
    env = {**(forwarded or {}), **(configured_env or {})}
    return Context(
        request_id=request_id or str(uuid.uuid4()),
        function=function,
        deadline=timeout,
        tracing=tracing or tracing_from(lambda _name: None),
        parameters=dict(parameters or {}),
        env=env,
        client_context=client_context,
    ).started(timeout)


def base_environment(environ: Mapping[str, str], pass_env: Iterable[str] = ()) -> dict[str, str]:
    """The part of a function's environment taken from the server's (read once at startup)."""
    base = {"PATH": environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
            "LANG": environ.get("LANG") or "C.UTF-8"}
    for name in ("TZ", "HOME"):
        if name in environ:
            base[name] = environ[name]
    for name in pass_env:
        if name in environ:
            base[name] = environ[name]
    return base


def function_environment(context: Context, base: Mapping[str, str]) -> dict[str, str]:
    """Built from scratch: server secrets never reach a function."""
    env = dict(base)
    env.update(context.env)
    env["FN_CONTEXT"] = context.to_json()
    env["FN_FUNCTION"] = context.function
    env["FN_REQUEST_ID"] = context.request_id
    return env
