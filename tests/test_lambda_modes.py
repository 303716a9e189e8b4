"""Lambda-style handlers in fork and warm mode (SPEC §8) behind the Lambda API (SPEC §9):
a Python exception comes back with its real type, message and frames; the handler's
context has Lambda's attributes; an import failure is Lambda's init error. Real boto3
against a real server."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.helpers import write_function, write_toml
from tests.live import LiveServer, running

NO_RETRIES = Config(retries={"max_attempts": 0}, connect_timeout=5, read_timeout=60)

# clients read no ~/.aws of the developer's (conftest.py)
pytestmark = pytest.mark.usefixtures("no_aws_profile")

HANDLER = """
import json

def lambda_handler(event, context):
    if event.get("fail"):
        return helper(event)
    if event.get("sleep"):
        import time
        time.sleep(event["sleep"])
    return {"aws_request_id": context.aws_request_id,
            "function_name": context.function_name,
            "arn": context.invoked_function_arn,
            "client_context": context.client_context,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "event": event}

def helper(event):
    print("about to raise")  # stdout: a log line, and in the Tail with the traceback
    raise ValueError(f"bad event {event['fail']}")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("lambda-modes")
    write_function(directory, "warmfn.py", HANDLER)
    write_function(directory, "forkfn.py", HANDLER)
    write_function(directory, "broken.py", "import no_such_module_for_fnserve\n"
                                           "def lambda_handler(event, context):\n"
                                           "    return 1\n")
    write_function(directory, "plain.py", "def handler(event, context):\n    return 1\n"
                                          "def lambda_handler(event, context):\n    return 2\n")
    write_function(directory, "named.py", "def serve(event, context):\n    return 3\n")
    write_toml(directory, """
        [functions.plain]
        mode = "fork"

        [functions.named]
        mode = "warm"
        handler = "serve"

        [functions.warmfn]
        mode = "warm"
        pool = 2
        timeout = "1s"

        [functions.forkfn]
        mode = "fork"
        timeout = "1s"

        [functions.broken]
        mode = "warm"
    """)
    with running(LiveServer(directory)) as live:
        yield live


def _client(server: LiveServer) -> Any:
    return boto3.client("lambda", endpoint_url=server.base, region_name="us-east-1",
                        aws_access_key_id="AKIDMODES", aws_secret_access_key="any",
                        config=NO_RETRIES)


@pytest.mark.parametrize("function", ["warmfn", "forkfn"])
def test_a_python_exception_has_its_real_type_message_and_frames(server: LiveServer,
                                                                 function: str) -> None:
    client = _client(server)
    response = client.invoke(FunctionName=function, Payload=b'{"fail": 7}', LogType="Tail")
    assert (response["StatusCode"], response["FunctionError"]) == (200, "Unhandled")
    body = json.loads(response["Payload"].read())
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "bad event 7"
    frames = body["stackTrace"]
    assert any(f'{function}.py", line' in frame and "in lambda_handler" in frame
               for frame in frames), frames
    assert "raise ValueError" in frames[-1] and "in helper" in frames[-1]
    tail = base64.b64decode(response["LogResult"]).decode()
    assert "\nabout to raise\n" in tail and "ValueError: bad event 7" in tail
    assert re.search(r"Max Memory Used: [1-9]\d* MB", tail), tail
    # the process survives its exception (warm) or was a fresh fork anyway: the next works
    after = json.loads(client.invoke(FunctionName=function, Payload=b'{"n": 1}')["Payload"]
                       .read())
    assert after["event"] == {"n": 1}


@pytest.mark.parametrize("function", ["warmfn", "forkfn"])
def test_the_handler_gets_a_lambda_context(server: LiveServer, function: str) -> None:
    client_context = {"client": {"app_title": "demo"}, "custom": {"k": "v"}, "env": {}}
    response = _client(server).invoke(
        FunctionName=f"arn:aws:lambda:us-east-1:123456789012:function:{function}",
        Payload=b'{"n": 2}',
        ClientContext=base64.b64encode(json.dumps(client_context).encode()).decode())
    got = json.loads(response["Payload"].read())
    assert got["aws_request_id"] == response["ResponseMetadata"]["RequestId"]
    assert got["function_name"] == function
    assert got["arn"] == f"arn:aws:lambda:local:000000000000:function:{function}"
    assert got["client_context"] == client_context
    assert 0 < got["remaining_ms"] <= 1_000


def test_a_module_that_does_not_import_is_lambdas_init_error(server: LiveServer) -> None:
    response = _client(server).invoke(FunctionName="broken")
    assert (response["StatusCode"], response["FunctionError"]) == (200, "Unhandled")
    body = json.loads(response["Payload"].read())
    assert body["errorType"] == "Runtime.ImportModuleError"
    assert body["errorMessage"].startswith("Unable to import module 'broken': ")
    assert "no_such_module_for_fnserve" in body["errorMessage"]


def test_fork_and_warm_handlers_are_listed_as_module_dot_function(server: LiveServer) -> None:
    functions = {f["FunctionName"]: f for f in _client(server).list_functions()["Functions"]}
    assert functions["warmfn"]["Handler"] == "warmfn.lambda_handler"
    assert functions["forkfn"]["Handler"] == "forkfn.lambda_handler"
    assert functions["plain"]["Handler"] == "plain.handler"
    assert functions["named"]["Handler"] == "named.serve"


@pytest.mark.parametrize("function", ["warmfn", "forkfn"])
def test_a_timeout_is_sandbox_timedout_and_the_next_call_works(server: LiveServer,
                                                               function: str) -> None:
    client = _client(server)
    response = client.invoke(FunctionName=function, Payload=b'{"sleep": 30}')
    assert (response["StatusCode"], response["FunctionError"]) == (200, "Unhandled")
    request_id = response["ResponseMetadata"]["RequestId"]
    assert json.loads(response["Payload"].read()) == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": f"RequestId: {request_id} Error: Task timed out after 1.00 seconds"}
    after = json.loads(client.invoke(FunctionName=function, Payload=b'{"n": 3}')["Payload"]
                       .read())
    assert after["event"] == {"n": 3}
