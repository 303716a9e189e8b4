"""The OpenAPI document (fnserve/openapi.yaml) against a live server, with schemathesis.

Every route and method of /openapi.json gets generated inputs (examples, coverage
and fuzzing phases, valid and invalid data); every answer must be one the
document declares: its status, content type, headers and body schema. A 500 is
always a failure; 502 and 504 are the documented answers of functions that fail
or time out, so the functions directory has such functions on purpose, and the
name of the function to call is drawn from it half of the time (a generated name
is almost never a function, and would only ever test the 404).

Run twice: without a key, and with --api-key, where every protected case is
also sent without the key and must be a conforming 401.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import fnserve
from tests.helpers import write_function, write_toml
from tests.live import LiveServer, running

API_KEY = "k-openapi-0123456789"
MAX_EXAMPLES = 15  # per operation and phase: ~10 operations x 2 servers stay well under 30 s
FUNCTIONS = ("hello", "echo", "fail", "crash", "slow", "big", "binary")
PROTECTED = ("/function/{name}", "/functions", "/stats", "/metrics", "/async-function/{name}",
             "/jobs/{request_id}", "/invocations", "/invocations/{request_id}",
             "/invocations/{request_id}/replay")
# the Lambda API refuses with 403 and Lambda's error shape (SPEC §9)
LAMBDA_PROTECTED = ("/2015-03-31/functions/{FunctionName}/invocations",
                    "/2015-03-31/functions", "/2015-03-31/functions/",
                    "/2015-03-31/functions/{FunctionName}")

# Not negative_data_rejection: FnServe accepts any query string, header value and
# body (that is the contract), so schemathesis' "invalid" values there are valid.
# The one input it does refuse, a name outside the pattern, is checked in _exercise.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

# 502 and 504 are what a failing function gets (SPEC §3), not a fault of the server
CONFIG = schemathesis.Config.from_dict({
    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "502", "504"]}},
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "mode": "all"},
    "phases": {"stateful": {"enabled": False}},
})


def _functions(directory: Path) -> None:
    write_function(directory, "hello.py", """
        import json, sys
        event = json.loads(sys.stdin.read() or "{}")
        name = event.get("name", "world") if isinstance(event, dict) else "world"
        print(json.dumps({"message": f"Hello, {name}!"}))
    """)
    write_function(directory, "echo.py", """
        import sys
        sys.stdout.buffer.write(sys.stdin.buffer.read())
    """)
    write_function(directory, "fail.py", """
        import sys
        print("this goes to the logs only", file=sys.stderr)
        sys.exit(3)
    """)
    write_function(directory, "crash.py", """
        import os, signal
        os.kill(os.getpid(), signal.SIGSEGV)
    """)
    write_function(directory, "slow.py", "import time; time.sleep(30)\n")
    write_function(directory, "big.py", """
        import sys
        sys.stdout.write("x" * (256 * 1024))
    """)
    write_function(directory, "binary.py", """
        import sys
        sys.stdout.buffer.write(bytes(range(256)))
    """)
    write_toml(directory, """
        [functions.slow]
        timeout = "300ms"
    """)


def _serve(factory: pytest.TempPathFactory, *extra: str) -> LiveServer:
    directory = factory.mktemp("openapi-functions")
    _functions(directory)
    return LiveServer(directory, "--max-output", "128KB", "--max-body", "64KB",
                      "--concurrency", "8", *extra)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running(_serve(tmp_path_factory)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running(_serve(tmp_path_factory, "--api-key", API_KEY)) as server:
        yield server


@pytest.fixture(scope="module", params=["open", "keyed"])
def live(request: pytest.FixtureRequest) -> LiveServer:
    server: LiveServer = request.getfixturevalue(f"{request.param}_server")
    return server


# The shipped file, loaded at collection time (schemathesis' lazy from_fixture loader
# does not work with pytest 9); test_document_is_the_shipped_yaml shows the server
# serves exactly this document.
schema = schemathesis.openapi.from_path(Path(fnserve.__file__).parent / "openapi.yaml",
                                        config=CONFIG)


def _exercise(case: Any, live: LiveServer) -> None:
    invoking = case.operation.path in ("/function/{name}", "/async-function/{name}")
    bad_name = invoking and case.meta is not None and case.meta.is_negative_at(
        ParameterLocation.PATH)
    parameter = "FunctionName" if case.operation.path in LAMBDA_PROTECTED else "name"
    if parameter in (case.path_parameters or {}) and not bad_name:
        # a pure function of the case, so hypothesis replays and shrinks it faithfully
        generated = str((case.path_parameters or {}).get(parameter, ""))
        pick = (None, *FUNCTIONS)[zlib.crc32(generated.encode()) % (len(FUNCTIONS) + 1)]
        if pick is not None:
            case.path_parameters = {**(case.path_parameters or {}), parameter: pick}
    keyed = "--api-key" in live.argv
    headers = {"X-API-Key": API_KEY} if keyed else None
    response = case.call_and_validate(base_url=live.base, headers=headers, checks=CHECKS)
    # the coverage phase also sends methods the path does not have (405, or Flask's OPTIONS)
    declared = case.method.upper() == case.operation.method.upper()
    if bad_name and declared:
        assert response.status_code == 404, (case.path_parameters, response.text)
    if keyed and declared and case.operation.path in PROTECTED:
        stripped = {k: v for k, v in (case.headers or {}).items()
                    if k.lower() not in ("x-api-key", "authorization")}
        case.headers = stripped
        response = case.call(base_url=live.base)
        assert response.status_code == 401, (case.operation.label, response.text)
        assert response.json()["code"] == "unauthorized"
        case.validate_response(response, checks=CHECKS)
    if keyed and declared and case.operation.path in LAMBDA_PROTECTED:
        case.headers = {k: v for k, v in (case.headers or {}).items()
                        if k.lower() not in ("x-api-key", "authorization")}
        response = case.call(base_url=live.base)
        assert response.status_code == 403, (case.operation.label, response.text)
        headers = {name.lower(): value for name, value in response.headers.items()}
        assert "UnrecognizedClientException" in headers["x-amzn-errortype"]
        case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_every_route_answers_as_documented(case: Any, open_server: LiveServer) -> None:
    _exercise(case, open_server)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_every_route_answers_as_documented_with_a_key(case: Any,
                                                      keyed_server: LiveServer) -> None:
    _exercise(case, keyed_server)


def test_document_is_the_shipped_yaml(live: LiveServer) -> None:
    import yaml

    served = requests.get(live.url("/openapi.json"), timeout=10).json()
    shipped = yaml.safe_load((Path(fnserve.__file__).parent / "openapi.yaml").read_text())
    assert served == shipped
    assert served["openapi"].startswith("3.1")
    invoke = served["paths"]["/function/{name}"]
    assert {"get", "post", "put", "patch", "delete"} <= set(invoke)
    assert set(served["paths"]) == {"/function/{name}", "/functions", "/stats", "/metrics",
                                    "/healthz", "/openapi.json", "/async-function/{name}",
                                    "/jobs/{request_id}", "/invocations",
                                    "/invocations/{request_id}",
                                    "/invocations/{request_id}/replay", *LAMBDA_PROTECTED}
    # every status of the SPEC's error table is declared for every method
    for method in ("get", "post", "put", "patch", "delete"):
        assert {"200", "400", "401", "404", "413", "429", "500", "502", "504"} <= \
            set(invoke[method]["responses"])
    schemes = served["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header",
                                 "name": "X-API-Key"}
    assert schemes["bearer"]["scheme"] == "bearer"


def test_documented_failures_really_happen(live: LiveServer) -> None:
    """The generated run may or may not hit each failure; these always do, and conform."""
    keyed = "--api-key" in live.argv
    headers = {"X-API-Key": API_KEY} if keyed else {}
    operation = schema["/function/{name}"]["POST"]
    seen = {}
    for name, body, content_type, status in [
        ("hello", {"name": "Ada"}, "application/json", 200),
        ("binary", "", None, 200),
        ("fail", "", None, 502),
        ("crash", "", None, 502),
        ("big", "", None, 502),
        ("slow", "", None, 504),
        ("nope", "", None, 404),
    ]:
        case = operation.Case(path_parameters={"name": name}, body=body,
                              media_type=content_type or "text/plain", headers=headers)
        response = case.call(base_url=live.base)
        assert response.status_code == status, (name, response.text)
        case.validate_response(response, checks=CHECKS)
        seen[name] = response
    assert seen["fail"].json()["exit_code"] == 3
    assert seen["crash"].json()["signal"] == 11
    assert seen["big"].json()["code"] == "output_too_large"
    assert seen["slow"].json()["code"] == "timeout"
    # 400 and 413 need bodies the schema calls invalid or too big: send them directly
    bad = requests.post(live.url("/function/echo"), data=b"{nope", headers={
        **headers, "Content-Type": "application/json"}, timeout=10)
    big = requests.post(live.url("/function/echo"), data=b"x" * (64 * 1024 + 1),
                        headers=headers, timeout=10)
    for response, status in ((bad, 400), (big, 413)):
        assert response.status_code == status
        case = operation.Case(path_parameters={"name": "echo"}, headers=headers)
        case.validate_response(response, checks=CHECKS[1:])
