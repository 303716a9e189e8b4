"""The context and the function's environment (SPEC §2), as the function sees them."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fnserve.config import load_config
from fnserve.context import (
    Tracing,
    base_environment,
    forwarded_env,
    make_context,
    request_id_from,
    tracing_from,
)
from fnserve.executor import Executor
from fnserve.invoke import run_function
from fnserve.registry import load_registry

from .helpers import invocation, write_function, write_toml

# prints what a function can see: its context and its whole environment
SHOW = """
    import json, os
    print(json.dumps({"context": json.loads(os.environ["FN_CONTEXT"]), "env": dict(os.environ)}))
"""
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# what the executor itself puts in every function's environment
OWN_KEYS = {"PATH", "LANG", "HOME", "FN_CONTEXT", "FN_FUNCTION", "FN_REQUEST_ID"}
# CPython may coerce a C locale by setting LC_CTYPE in its own environment
INTERPRETER_KEYS = {"LC_CTYPE"}


def seen(stdout: bytes) -> tuple[dict, dict]:  # type: ignore[type-arg]
    shown = json.loads(stdout)
    return shown["context"], shown["env"]


@pytest.fixture
def show(fn_dir: Path) -> Path:
    write_function(fn_dir, "show.py", SHOW)
    return fn_dir


def test_context_fields(show: Path, executor: Executor) -> None:
    spec = load_registry(show).get("show")
    tracing = Tracing("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "b7ad6b7169203331")
    before = time.time()
    result = executor.run(invocation(
        spec, timeout=12.0, request_id="req-42", parameters={"name": "Ada"},
        forwarded={"HTTP_X_API_KEY": "k-123"}, configured_env={"GREETING": "Hello"},
        tracing=tracing))
    after = time.time()
    assert result.outcome == "ok"
    context, env = seen(result.stdout)
    assert set(context) == {"request_id", "function", "timestamp", "deadline", "deadline_ms",
                            "parameters", "env", "tracing"}
    assert context["request_id"] == "req-42"
    assert context["function"] == "show"
    assert TIMESTAMP.fullmatch(context["timestamp"])
    stamp = datetime.strptime(context["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 0.01 <= stamp.timestamp() <= after
    assert isinstance(context["deadline"], float)
    assert 11.0 < context["deadline"] <= 12.0
    expected_ms = (stamp.timestamp() + context["deadline"]) * 1000
    assert abs(context["deadline_ms"] - expected_ms) < 5
    assert context["parameters"] == {"name": "Ada"}
    assert context["env"] == {"HTTP_X_API_KEY": "k-123", "GREETING": "Hello"}
    assert context["tracing"] == {"trace_id": tracing.trace_id, "span_id": tracing.span_id,
                                  "parent_id": tracing.parent_id}
    # the result carries the context the function was started with
    assert json.loads(result.context.to_json()) == context
    # every context env entry is also set directly
    assert env["HTTP_X_API_KEY"] == "k-123"
    assert env["GREETING"] == "Hello"
    assert env["FN_FUNCTION"] == "show"
    assert env["FN_REQUEST_ID"] == "req-42"


def test_a_new_context_has_fresh_ids(show: Path, environ: dict[str, str]) -> None:
    result = run_function("show", directory=show, environ=environ)
    context, _env = seen(result.stdout)
    uuid.UUID(context["request_id"], version=4)
    assert context["parameters"] == {}
    assert context["env"] == {}
    assert re.fullmatch(r"[0-9a-f]{32}", context["tracing"]["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", context["tracing"]["span_id"])
    assert context["tracing"]["parent_id"] == ""
    assert 29 < context["deadline"] <= 30.0


def test_configured_env_beats_forwarded_headers() -> None:
    context = make_context("f", 5.0, forwarded={"HTTP_AUTHORIZATION": "client", "GREETING": "x"},
                           configured_env={"GREETING": "Hello", "HTTP_AUTHORIZATION": "conf"})
    assert context.env == {"HTTP_AUTHORIZATION": "conf", "GREETING": "Hello"}


def test_configured_env_beats_a_header_in_the_process_env(show: Path, executor: Executor) -> None:
    write_toml(show, '[functions.show]\nenv = { HTTP_X_API_KEY = "configured" }\n')
    spec = load_registry(show).get("show")
    result = executor.run(invocation(spec, forwarded={"HTTP_X_API_KEY": "from-client"},
                                     configured_env=spec.settings.env))
    context, env = seen(result.stdout)
    assert context["env"]["HTTP_X_API_KEY"] == "configured"
    assert env["HTTP_X_API_KEY"] == "configured"


def test_context_env_cannot_replace_fnserve_variables(show: Path, executor: Executor) -> None:
    spec = load_registry(show).get("show")
    result = executor.run(invocation(spec, request_id="real",
                                     configured_env={"FN_REQUEST_ID": "fake", "FN_CONTEXT": "{}"}))
    context, env = seen(result.stdout)
    assert env["FN_REQUEST_ID"] == "real"
    assert context["request_id"] == "real"


def test_configured_env_from_fnserve_toml(show: Path, environ: dict[str, str]) -> None:
    write_toml(show, """
        [defaults]
        env = { REGION = "eu", GREETING = "Hi" }
        [functions.show]
        env = { GREETING = "Hello" }
    """)
    result = run_function("show", directory=show, environ=environ, env={"EXTRA": "1"})
    context, env = seen(result.stdout)
    assert context["env"] == {"REGION": "eu", "GREETING": "Hello", "EXTRA": "1"}
    assert (env["REGION"], env["GREETING"], env["EXTRA"]) == ("eu", "Hello", "1")


def test_server_environment_does_not_reach_the_function(
        show: Path, environ: dict[str, str]) -> None:
    environ = {**environ, "SECRET_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "y", "TZ": "UTC"}
    result = run_function("show", directory=show, environ=environ)
    _context, env = seen(result.stdout)
    assert "SECRET_TOKEN" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "XDG_CACHE_HOME" not in env
    assert set(env) - INTERPRETER_KEYS == OWN_KEYS | {"TZ"}
    assert env["PATH"] == environ["PATH"]
    assert env["TZ"] == "UTC"


def test_lang_defaults_to_c_utf8() -> None:
    assert base_environment({"PATH": "/bin"})["LANG"] == "C.UTF-8"
    assert base_environment({"PATH": "/bin", "LANG": "de_DE.UTF-8"})["LANG"] == "de_DE.UTF-8"
    assert base_environment({})["PATH"]  # a function always has a PATH


def test_pass_env_passes_a_named_variable(show: Path, executor: Executor) -> None:
    server = {"PATH": "/usr/bin:/bin", "SECRET_TOKEN": "x", "OTHER_SECRET": "y"}
    base = base_environment(server, ["SECRET_TOKEN", "NOT_SET"])
    spec = load_registry(show).get("show")
    result = executor.run(invocation(spec, base_env=base))
    _context, env = seen(result.stdout)
    assert env["SECRET_TOKEN"] == "x"
    assert "OTHER_SECRET" not in env
    assert "NOT_SET" not in env


def test_pass_env_through_the_config(fn_dir: Path) -> None:
    server = {"PATH": "/bin", "SECRET_TOKEN": "x", "OTHER": "y"}
    config = load_config(fn_dir, {"pass_env": ("SECRET_TOKEN",)}, server)
    assert config.base_env == {"PATH": "/bin", "LANG": "C.UTF-8", "SECRET_TOKEN": "x"}
    from_env = load_config(fn_dir, {}, {**server, "FNSERVE_PASS_ENV": "SECRET_TOKEN,OTHER"})
    assert from_env.base_env["OTHER"] == "y"


@pytest.mark.parametrize(("header", "expected"), [
    ("abc-123", "abc-123"),
    ("a.b_c:d-E", "a.b_c:d-E"),
    ("x" * 128, "x" * 128),
])
def test_request_id_from_a_valid_header(header: str, expected: str) -> None:
    assert request_id_from(header) == expected


@pytest.mark.parametrize("header", [None, "", "x" * 129, "has space", "new\nline", "ü", "a/b"])
def test_request_id_from_an_invalid_header_is_new(header: str | None) -> None:
    uuid.UUID(request_id_from(header), version=4)


def headers(**values: str):  # type: ignore[no-untyped-def]
    lowered = {key.replace("_", "-").lower(): value for key, value in values.items()}
    return lambda name: lowered.get(name.lower())


def test_tracing_from_traceparent() -> None:
    tracing = tracing_from(headers(
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    assert tracing.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.parent_id == "00f067aa0ba902b7"
    assert re.fullmatch(r"[0-9a-f]{16}", tracing.span_id)
    assert tracing.span_id != tracing.parent_id
    assert tracing.traceparent == f"00-{tracing.trace_id}-{tracing.span_id}-01"


def test_tracing_from_b3() -> None:
    tracing = tracing_from(headers(X_B3_TraceId="80f198ee56343ba864fe8b2a57d3eff7",
                                   X_B3_SpanId="e457b5a2e4d86bd1"))
    assert (tracing.trace_id, tracing.parent_id) == ("80f198ee56343ba864fe8b2a57d3eff7",
                                                     "e457b5a2e4d86bd1")
    short = tracing_from(headers(X_B3_TraceId="a3ce929d0e0e4736"))
    assert short.trace_id == "0" * 16 + "a3ce929d0e0e4736"
    assert short.parent_id == ""


def test_traceparent_wins_over_b3() -> None:
    tracing = tracing_from(headers(
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        X_B3_TraceId="80f198ee56343ba864fe8b2a57d3eff7"))
    assert tracing.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("traceparent", [
    "garbage",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has no extra
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
])
def test_malformed_traceparent_starts_a_new_trace(traceparent: str) -> None:
    tracing = tracing_from(headers(traceparent=traceparent))
    assert re.fullmatch(r"[0-9a-f]{32}", tracing.trace_id)
    assert tracing.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.parent_id == ""


def test_future_traceparent_version_may_carry_more_fields() -> None:
    tracing = tracing_from(headers(
        traceparent="01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever"))
    assert tracing.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_forwarded_headers_become_cgi_names() -> None:
    get = headers(X_Api_Key="k-123", Authorization="Bearer t", Cookie="nope")
    env = forwarded_env(get, ["X-API-Key", "Authorization", "X-Forwarded-For"])
    assert env == {"HTTP_X_API_KEY": "k-123", "HTTP_AUTHORIZATION": "Bearer t"}
