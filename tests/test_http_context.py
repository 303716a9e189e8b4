"""A successful invocation over HTTP and the full FN_CONTEXT (SPEC §2, §3), on one server.

`ctx` answers with its context, its whole process environment and its stdin; `cat`
writes its stdin back unchanged, so the request body chooses what stdout is.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from .helpers import write_function, write_toml
from .live import LiveServer, non_loopback_ipv4, running

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")
HEX16 = re.compile(r"[0-9a-f]{16}")
TIMEOUT = 7.0
CTX_SOURCE = """
    import json, os, sys
    json.dump({"context": json.loads(os.environ["FN_CONTEXT"]), "environ": dict(os.environ),
               "stdin": sys.stdin.read()}, sys.stdout)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("context-functions")
    write_function(directory, "ctx.py", CTX_SOURCE)
    write_function(directory, "configured.py", CTX_SOURCE)
    write_function(directory, "cat.py",
                   "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())\n")
    write_toml(directory, """
        [functions.configured]
        timeout = "3s"

        [functions.configured.env]
        HTTP_X_CUSTOM = "from-config"
        HTTP_X_API_KEY = "configured-key"
        GREETING = "Hello"
    """)
    env = {**os.environ, "SECRET_TOKEN": "server-secret", "PASSED_TOKEN": "passed-on"}
    with running(LiveServer(directory, "--forward-header", "X-Custom", "--pass-env",
                            "PASSED_TOKEN", "--timeout", f"{TIMEOUT:g}s", env=env)) as live:
        yield live


def invoke(server: LiveServer, name: str = "ctx", method: str = "POST",
           **kwargs: Any) -> tuple[requests.Response, dict[str, Any]]:
    response = server.request(method, f"/function/{name}", **kwargs)
    assert response.status_code == 200, response.text
    return response, response.json()


# -- the response ---------------------------------------------------------------------


@pytest.mark.parametrize(("body", "content_type"), [
    (b'{"a": 1}', "application/json"),
    (b'  [1, "two", null]\n', "application/json"),
    (b"123", "application/json"),
    (b"true", "application/json"),
    (b'"a string"', "application/json"),
    (b"hello, world\n", "text/plain; charset=utf-8"),
    (b'{"a": 1', "text/plain; charset=utf-8"),
    (b"nul", "text/plain; charset=utf-8"),
    ("h\u00e9llo \u2603\n".encode(), "text/plain; charset=utf-8"),
    (b"\xff\xfe\x00binary\r\n", "text/plain; charset=utf-8"),
    # what Python's json.dumps writes for nan and inf: not JSON for any other parser
    (b"[NaN]", "text/plain; charset=utf-8"),
    (b"-Infinity", "text/plain; charset=utf-8"),
], ids=["object", "array-spaces", "number", "true", "string", "text", "broken-json", "nul",
        "utf8", "binary", "nan", "infinity"])
def test_stdout_is_the_body_unchanged(server: LiveServer, body: bytes, content_type: str) -> None:
    response = server.post("/function/cat", data=body,
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["Content-Type"] == content_type


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_every_method_invokes_and_an_empty_body_is_sent_as_empty_object(
        server: LiveServer, method: str) -> None:
    response = server.request(method, "/function/cat")
    assert response.status_code == 200
    assert response.content == b"{}"
    assert response.headers["Content-Type"] == "application/json"


def test_success_carries_the_invocation_headers(server: LiveServer) -> None:
    response, result = invoke(server)
    context = result["context"]
    assert response.headers["X-Request-Id"] == context["request_id"]
    match = TRACEPARENT.fullmatch(response.headers["traceparent"])
    assert match
    assert match.groups() == (context["tracing"]["trace_id"], context["tracing"]["span_id"])
    assert 0 < float(response.headers["X-Duration-Seconds"]) < TIMEOUT
    assert context["function"] == "ctx"


# -- parameters and forwarded headers ------------------------------------------------


def test_query_parameters_take_the_first_value(server: LiveServer) -> None:
    _, result = invoke(server, params=[("name", "Ada"), ("name", "Bob"), ("empty", ""),
                                       ("spaced", "a b&c=d"), ("x", "1")])
    assert result["context"]["parameters"] == {"name": "Ada", "empty": "", "spaced": "a b&c=d",
                                               "x": "1"}
    _, result = invoke(server)
    assert result["context"]["parameters"] == {}


def test_forwarded_headers_reach_the_context_and_the_environment(server: LiveServer) -> None:
    headers = {"X-API-Key": "k-123", "Authorization": "Bearer tok", "X-Forwarded-For": "10.0.0.9",
               "X-Custom": "custom value", "X-Other": "not forwarded"}
    _, result = invoke(server, headers=headers)
    expected = {"HTTP_X_API_KEY": "k-123", "HTTP_AUTHORIZATION": "Bearer tok",
                "HTTP_X_FORWARDED_FOR": "10.0.0.9", "HTTP_X_CUSTOM": "custom value"}
    assert result["context"]["env"] == expected
    environ = result["environ"]
    for key, value in expected.items():
        assert environ[key] == value
    assert "HTTP_X_OTHER" not in environ
    assert not any("not forwarded" in value for value in environ.values())


def test_no_header_no_entry(server: LiveServer) -> None:
    _, result = invoke(server)
    assert result["context"]["env"] == {}
    assert not [key for key in result["environ"] if key.startswith("HTTP_")]


def test_configured_env_beats_a_header_of_the_same_name(server: LiveServer) -> None:
    _, result = invoke(server, "configured", headers={
        "X-Custom": "from-client", "X-API-Key": "client-key", "X-Forwarded-For": "10.1.1.1"})
    assert result["context"]["env"] == {
        "HTTP_X_CUSTOM": "from-config", "HTTP_X_API_KEY": "configured-key",
        "GREETING": "Hello", "HTTP_X_FORWARDED_FOR": "10.1.1.1"}
    assert result["environ"]["HTTP_X_CUSTOM"] == "from-config"
    assert result["environ"]["HTTP_X_API_KEY"] == "configured-key"
    assert result["environ"]["GREETING"] == "Hello"


# -- request id ------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc-123", "A.b_c:d-9", "x" * 128])
def test_valid_request_id_is_used_and_echoed(server: LiveServer, request_id: str) -> None:
    response, result = invoke(server, headers={"X-Request-Id": request_id})
    assert response.headers["X-Request-Id"] == request_id
    assert result["context"]["request_id"] == request_id
    assert result["environ"]["FN_REQUEST_ID"] == request_id


@pytest.mark.parametrize("request_id", ["has spaces", "x" * 200, "x" * 129, "semi;colon",
                                        "slash/y", ""])
def test_invalid_request_id_is_replaced_by_a_uuid(server: LiveServer, request_id: str) -> None:
    response, result = invoke(server, headers={"X-Request-Id": request_id})
    given = response.headers["X-Request-Id"]
    assert given != request_id
    assert uuid.UUID(given).version == 4
    assert result["context"]["request_id"] == given
    assert result["environ"]["FN_REQUEST_ID"] == given


def test_errors_echo_the_request_id_too(server: LiveServer) -> None:
    response = server.post("/function/nope", headers={"X-Request-Id": "req-404"})
    assert response.status_code == 404
    assert response.headers["X-Request-Id"] == "req-404"
    assert response.json()["request_id"] == "req-404"


# -- tracing ------------------------------------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _tracing(response: requests.Response, result: dict[str, Any]) -> dict[str, str]:
    tracing: dict[str, str] = result["context"]["tracing"]
    assert HEX16.fullmatch(tracing["span_id"])
    assert response.headers["traceparent"] == f"00-{tracing['trace_id']}-{tracing['span_id']}-01"
    return tracing


def test_traceparent_continues_the_trace(server: LiveServer) -> None:
    response, result = invoke(server, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    tracing = _tracing(response, result)
    assert tracing["trace_id"] == TRACE
    assert tracing["parent_id"] == PARENT
    assert tracing["span_id"] != PARENT


def test_b3_headers_when_no_traceparent(server: LiveServer) -> None:
    response, result = invoke(server, headers={"X-B3-TraceId": TRACE, "X-B3-SpanId": PARENT})
    tracing = _tracing(response, result)
    assert (tracing["trace_id"], tracing["parent_id"]) == (TRACE, PARENT)
    assert tracing["span_id"] != PARENT
    # a 64-bit B3 trace id is widened to 128 bits
    response, result = invoke(server, headers={"X-B3-TraceId": PARENT, "X-B3-SpanId": PARENT})
    assert _tracing(response, result)["trace_id"] == "0" * 16 + PARENT


def test_traceparent_wins_over_b3(server: LiveServer) -> None:
    response, result = invoke(server, headers={
        "traceparent": f"00-{TRACE}-{PARENT}-01",
        "X-B3-TraceId": "a" * 32, "X-B3-SpanId": "b" * 16})
    assert _tracing(response, result)["trace_id"] == TRACE


@pytest.mark.parametrize("traceparent", [
    "garbage", f"00-{TRACE.upper()}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01",
    f"00-{TRACE}-{'0' * 16}-01", f"ff-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}",
    f"00-{TRACE[:-1]}-{PARENT}-01",
], ids=["garbage", "upper", "zero-trace", "zero-parent", "version-ff", "no-flags", "short"])
def test_malformed_traceparent_starts_a_new_trace(server: LiveServer, traceparent: str) -> None:
    response, result = invoke(server, headers={"traceparent": traceparent})
    tracing = _tracing(response, result)
    assert tracing["trace_id"] != TRACE.lower()
    assert re.fullmatch(r"[0-9a-f]{32}", tracing["trace_id"])
    assert tracing["trace_id"] != "0" * 32
    assert tracing["parent_id"] == ""
    # and a malformed traceparent does not hide valid B3 headers
    response, result = invoke(server, headers={"traceparent": traceparent,
                                               "X-B3-TraceId": TRACE, "X-B3-SpanId": PARENT})
    assert _tracing(response, result)["trace_id"] == TRACE


def test_each_invocation_gets_a_new_trace_and_span(server: LiveServer) -> None:
    seen = {_tracing(*invoke(server))["trace_id"] for _ in range(3)}
    assert len(seen) == 3


# -- time -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "timeout"), [("ctx", TIMEOUT), ("configured", 3.0)])
def test_deadline_is_the_function_timeout(server: LiveServer, name: str, timeout: float) -> None:
    before = time.time()
    _, result = invoke(server, name)
    after = time.time()
    context = result["context"]
    assert timeout - 2.0 < context["deadline"] <= timeout
    # deadline_ms is the same deadline as an absolute time
    assert (before + context["deadline"]) * 1000 - 50 <= context["deadline_ms"]
    assert context["deadline_ms"] <= (after + context["deadline"]) * 1000 + 50
    stamp = datetime.strptime(context["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 0.05 <= stamp.timestamp() <= after + 0.05


# -- what the function's process gets ------------------------------------------------


def test_environment_is_built_from_scratch(server: LiveServer) -> None:
    _, result = invoke(server, headers={"X-API-Key": "k"})
    environ = result["environ"]
    assert "SECRET_TOKEN" not in environ
    assert "server-secret" not in json.dumps(result)
    assert environ["PASSED_TOKEN"] == "passed-on"  # --pass-env names it
    assert environ["FN_FUNCTION"] == "ctx"
    assert json.loads(environ["FN_CONTEXT"]) == result["context"]
    assert environ["LANG"]
    allowed = {"PATH", "LANG", "TZ", "HOME", "FN_CONTEXT", "FN_FUNCTION", "FN_REQUEST_ID",
               "PASSED_TOKEN", "HTTP_X_API_KEY",
               "LC_CTYPE"}  # Python's own locale coercion (PEP 538) under a C locale
    assert set(environ) <= allowed, set(environ) - allowed


def test_default_bind_is_loopback_only(server: LiveServer) -> None:
    assert server.proc is not None
    listening = [r["message"] for r in server.log_records()
                 if r["message"].startswith("Listening at:")]
    assert listening == [f"Listening at: http://127.0.0.1:{server.port} ({server.proc.pid})"]


def test_default_bind_is_not_reachable_on_another_interface(server: LiveServer) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError), socket.create_connection((address, server.port), timeout=2):
        pass
