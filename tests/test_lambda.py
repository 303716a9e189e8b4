"""The AWS Lambda Invoke API (SPEC §9) with the real clients: boto3 and the `aws` CLI
against a real `fnserve serve`, no mocks.

Clients are made with retries off (`max_attempts: 0`) wherever a test must see the first
answer; the timeout test keeps botocore's default retries on purpose, to show that a
timed-out function runs exactly once (a 5xx would make the SDK run it again).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.helpers import wait_until, write_function, write_toml
from tests.live import LiveServer, invocation_records, raw_request, running

# clients read no ~/.aws of the developer's (conftest.py)
pytestmark = pytest.mark.usefixtures("no_aws_profile")

KEY = "k-lambda-0123456789"
AWS = Path(sys.executable).with_name("aws")
NO_RETRIES = Config(retries={"max_attempts": 0}, connect_timeout=5, read_timeout=60)


def _functions(directory: Path, marks: Path, gate: Path) -> None:
    write_function(directory, "hello.py", """
        import json, os, sys
        event = json.load(sys.stdin)
        context = json.loads(os.environ["FN_CONTEXT"])
        print(json.dumps({"event": event, "request_id": context["request_id"],
                          "client_context": context.get("client_context")}))
    """)
    write_function(directory, "environ.py", """
        import json, os, sys
        print(json.dumps({"stdin": sys.stdin.read(), "environ": dict(os.environ)}))
    """)
    write_function(directory, "size.py", """
        import json, sys
        print(json.dumps({"bytes": len(sys.stdin.buffer.read())}))
    """)
    write_function(directory, "mark.py", """
        import json, os, sys
        event = json.load(sys.stdin)
        with open(os.environ["MARKS"], "a") as marks:
            marks.write(json.dumps({"tag": event.get("tag"),
                                    "request_id": os.environ["FN_REQUEST_ID"]}) + "\\n")
        print(json.dumps({"marked": event.get("tag")}))
    """)
    write_function(directory, "slow.py", """
        import json, os, sys, time
        event = json.load(sys.stdin)
        with open(os.environ["MARKS"], "a") as marks:
            marks.write(json.dumps({"tag": event.get("tag")}) + "\\n")
        time.sleep(30)
    """)
    write_function(directory, "gate.py", """
        import os, time
        while not os.path.exists(os.environ["GATE"]):
            time.sleep(0.01)
        print('"opened"')
    """)
    write_function(directory, "fail.py", """
        import sys
        print("about to fail", file=sys.stderr)
        sys.exit(3)
    """)
    write_function(directory, "crash.py", """
        import os, signal
        os.kill(os.getpid(), signal.SIGSEGV)
    """)
    write_function(directory, "big.py", """
        import sys
        sys.stdout.write("x" * (300 * 1024))
    """)
    write_function(directory, "memory.py", """
        import json, sys
        size = json.load(sys.stdin).get("mb", 0)
        block = b"x" * (size * 1024 * 1024)  # written, so the pages are really used
        print("line one", file=sys.stderr)
        print("line two", file=sys.stderr)
        print(json.dumps({"held": len(block)}))
    """)
    write_toml(directory, f"""
        [defaults]
        env = {{ MARKS = "{marks}", GATE = "{gate}" }}

        [functions.slow]
        timeout = "1s"

        [functions.memory]
        memory = "512MB"
    """)


class Site:
    """A served functions directory, the file its functions mark, and a gate to open."""

    def __init__(self, server: LiveServer, marks: Path, gate: Path) -> None:
        self.server = server
        self.marks = marks
        self.gate = gate

    def client(self, *, key: str = "any-secret", config: Config = NO_RETRIES) -> Any:
        return boto3.client("lambda", endpoint_url=self.server.base, region_name="eu-west-1",
                            aws_access_key_id="AKIDFNSERVE", aws_secret_access_key=key,
                            config=config)

    def marked(self) -> list[dict[str, Any]]:
        if not self.marks.exists():
            return []
        return [json.loads(line) for line in self.marks.read_text().splitlines()]

    def tags(self) -> list[Any]:
        return [mark["tag"] for mark in self.marked()]


def _site(factory: pytest.TempPathFactory, *args: str) -> tuple[LiveServer, Path, Path]:
    directory = factory.mktemp("lambda-functions")
    state = factory.mktemp("lambda-state")
    marks, gate = state / "marks.jsonl", state / "gate"
    _functions(directory, marks, gate)
    return LiveServer(directory, "--max-output", "256KB", *args), marks, gate


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server, marks, gate = _site(tmp_path_factory, "--concurrency", "6")
    with running(server):
        yield Site(server, marks, gate)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server, marks, gate = _site(tmp_path_factory, "--api-key", KEY)
    with running(server):
        yield Site(server, marks, gate)


def _payload(response: dict[str, Any]) -> Any:
    return json.loads(response["Payload"].read())


def _error(info: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    error = info.value.response
    return (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"],
            error["Error"]["Message"])


# -- invocation types -----------------------------------------------------------------


def test_request_response_answers_the_result(site: Site) -> None:
    response = site.client().invoke(FunctionName="hello", Payload=b'{"name": "Ada"}')
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    body = _payload(response)
    assert body["event"] == {"name": "Ada"}
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert body["request_id"] == headers["x-amzn-requestid"] == headers["x-request-id"]
    assert response["ResponseMetadata"]["RequestId"] == body["request_id"]


def test_an_empty_payload_is_an_empty_object(site: Site) -> None:
    assert _payload(site.client().invoke(FunctionName="hello"))["event"] == {}


def test_event_answers_202_and_runs_in_the_background(site: Site) -> None:
    response = site.client().invoke(FunctionName="mark", InvocationType="Event",
                                    Payload=b'{"tag": "event-1"}')
    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    request_id = response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    marks = wait_until(lambda: [m for m in site.marked() if m["tag"] == "event-1"], timeout=20)
    assert marks == [{"tag": "event-1", "request_id": request_id}]
    # queued like /async-function (SPEC §11): counted and logged like any invocation,
    # as an async one, under the request id the client was given
    records = wait_until(lambda: [r for r in invocation_records(site.server.log_records())
                                  if r.get("request_id") == request_id], timeout=10)
    assert records and records[0]["source"] == "async" and records[0]["outcome"] == "ok"
    assert site.server.get(f"/jobs/{request_id}").json()["status"] == "finished"


def test_dry_run_answers_204_and_runs_nothing(site: Site) -> None:
    client = site.client()
    response = client.invoke(FunctionName="mark", InvocationType="DryRun",
                             Payload=b'{"tag": "dry"}')
    assert response["StatusCode"] == 204
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    with pytest.raises(ClientError) as info:
        client.invoke(FunctionName="nope", InvocationType="DryRun")
    assert _error(info)[:2] == (404, "ResourceNotFoundException")
    client.invoke(FunctionName="mark", Payload=b'{"tag": "after-dry"}')  # runs in order
    assert "after-dry" in site.tags() and "dry" not in site.tags()


# -- function errors: 200 + X-Amz-Function-Error, never a 5xx ---------------------------


def test_a_non_zero_exit_is_an_unhandled_function_error(site: Site) -> None:
    response = site.client().invoke(FunctionName="fail", LogType="Tail")
    assert "\nabout to fail\n" in _tail(response)
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    body = _payload(response)
    request_id = response["ResponseMetadata"]["RequestId"]
    assert body == {"errorType": "Runtime.ExitError", "stackTrace": [],
                    "errorMessage": f"RequestId: {request_id} Error: Runtime exited with "
                                    f"error: exit status 3"}


def test_a_crash_and_an_oversized_output_are_function_errors(site: Site) -> None:
    client = site.client()
    crash = client.invoke(FunctionName="crash")
    assert (crash["StatusCode"], crash["FunctionError"]) == (200, "Unhandled")
    assert _payload(crash)["errorMessage"].endswith("signal: segmentation fault")
    big = client.invoke(FunctionName="big")
    assert (big["StatusCode"], big["FunctionError"]) == (200, "Unhandled")
    body = _payload(big)
    assert body["errorType"] == "Function.ResponseSizeTooLarge"
    assert str(256 * 1024) in body["errorMessage"]


def test_a_timeout_runs_once_even_with_the_sdks_default_retries(site: Site) -> None:
    client = site.client(config=Config(read_timeout=60))  # botocore's retries left on
    before = site.tags().count("slow-once")
    response = client.invoke(FunctionName="slow", Payload=b'{"tag": "slow-once"}')
    assert (response["StatusCode"], response["FunctionError"]) == (200, "Unhandled")
    request_id = response["ResponseMetadata"]["RequestId"]
    assert _payload(response) == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": f"RequestId: {request_id} Error: Task timed out after 1.00 seconds"}
    assert response["ResponseMetadata"]["RetryAttempts"] == 0
    assert site.tags().count("slow-once") == before + 1
    assert site.server.stats()["functions"]["slow"]["timeouts"] >= 1


# -- logs, client context ------------------------------------------------------------------


def _tail(response: dict[str, Any]) -> str:
    return base64.b64decode(response["LogResult"]).decode()


def test_tail_logs_have_start_the_output_end_and_a_measured_report(site: Site) -> None:
    client = site.client()
    small = client.invoke(FunctionName="memory", LogType="Tail", Payload=b'{"mb": 0}')
    large = client.invoke(FunctionName="memory", LogType="Tail", Payload=b'{"mb": 200}')
    reports = []
    for response in (small, large):
        request_id = response["ResponseMetadata"]["RequestId"]
        lines = _tail(response).splitlines()
        assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
        assert lines[1:3] == ["line one", "line two"]
        assert lines[3] == f"END RequestId: {request_id}"
        report = re.fullmatch(
            rf"REPORT RequestId: {request_id}\sDuration: (\d+\.\d\d) ms\sBilled Duration: "
            r"(\d+) ms\sMemory Size: 512 MB\sMax Memory Used: (\d+) MB\s*", lines[4])
        assert report, lines[4]
        assert float(report.group(1)) > 0 and int(report.group(2)) >= float(report.group(1))
        reports.append(int(report.group(3)))
    # from the child's rusage, not a constant. Linux counts the server's own footprint
    # at spawn in a child's ru_maxrss (vfork + exec), so a small function shows that
    # floor; one that holds 200 MB shows at least its 200 MB.
    assert reports[0] > 0
    assert reports[1] >= 200 and reports[1] > reports[0]
    no_tail = client.invoke(FunctionName="memory", Payload=b"{}")
    assert "LogResult" not in no_tail


def test_a_timeout_shows_in_the_tail(site: Site) -> None:
    response = site.client().invoke(FunctionName="slow", LogType="Tail",
                                    Payload=b'{"tag": "slow-tail"}')
    request_id = response["ResponseMetadata"]["RequestId"]
    tail = _tail(response)
    assert f"{request_id} Task timed out after 1.00 seconds" in tail
    assert tail.splitlines()[-2] == f"END RequestId: {request_id}"


def test_client_context_reaches_the_function(site: Site) -> None:
    context = {"client": {"app_title": "demo"}, "custom": {"k": "v"}, "env": {"x": "y"}}
    encoded = base64.b64encode(json.dumps(context).encode()).decode()
    body = _payload(site.client().invoke(FunctionName="hello", ClientContext=encoded))
    assert body["client_context"] == context
    assert _payload(site.client().invoke(FunctionName="hello"))["client_context"] is None
    for bad in ("not base64!", base64.b64encode(b"{not json").decode(),
                base64.b64encode(b"[1]").decode()):
        status, headers, raw = raw_request(
            site.server, "POST", "/2015-03-31/functions/hello/invocations", b"{}",
            {"X-Amz-Client-Context": bad})
        assert status == 400
        assert headers["x-amzn-errortype"] == "InvalidRequestContentException"
        assert json.loads(raw)["Type"] == "User"


# -- names, qualifiers, refusals ---------------------------------------------------------


@pytest.mark.parametrize("name", [
    "hello", "hello:$LATEST", "arn:aws:lambda:eu-west-1:123456789012:function:hello",
    "arn:aws:lambda:us-east-1:000000000000:function:hello:$LATEST",
    "123456789012:function:hello"])
def test_names_and_arns(site: Site, name: str) -> None:
    response = site.client().invoke(FunctionName=name, Payload=b'{"n": 1}')
    assert _payload(response)["event"] == {"n": 1}
    get = site.client().get_function(FunctionName=name)
    assert get["Configuration"]["FunctionName"] == "hello"


def test_raw_paths_percent_encoded_or_not_and_the_qualifier_parameter(site: Site) -> None:
    arn = "arn:aws:lambda:eu-west-1:123456789012:function:hello"
    for path in (f"/2015-03-31/functions/{arn}/invocations",
                 f"/2015-03-31/functions/{arn.replace(':', '%3A')}/invocations",
                 f"/2015-03-31/functions/{arn.replace(':', '%253A')}/invocations",
                 "/2015-03-31/functions/hello/invocations?Qualifier=%24LATEST"):
        status, headers, body = raw_request(site.server, "POST", path, b'{"p": 1}')
        assert status == 200, (path, body)
        assert json.loads(body)["event"] == {"p": 1}
        assert headers["x-amz-executed-version"] == "$LATEST"


def test_unknown_functions_and_other_qualifiers_are_not_found(site: Site) -> None:
    client = site.client()
    for kwargs, arn in [
        ({"FunctionName": "nope"}, "arn:aws:lambda:local:000000000000:function:nope"),
        ({"FunctionName": "hello", "Qualifier": "1"},
         "arn:aws:lambda:local:000000000000:function:hello:1"),
        ({"FunctionName": "hello:prod"}, "arn:aws:lambda:local:000000000000:function:hello:prod"),
        ({"FunctionName": "arn:aws:lambda:eu-west-1:1:function:nope"},
         "arn:aws:lambda:local:000000000000:function:nope"),
    ]:
        with pytest.raises(ClientError) as info:
            client.invoke(**kwargs)
        assert _error(info) == (404, "ResourceNotFoundException", f"Function not found: {arn}")
        with pytest.raises(ClientError) as info:
            client.get_function(**kwargs)
        assert _error(info)[:2] == (404, "ResourceNotFoundException")
    status, headers, body = raw_request(site.server, "POST",
                                        "/2015-03-31/functions/..%2Fetc/invocations", b"{}")
    assert status == 404 and headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert json.loads(body) == {"Type": "User", "message": json.loads(body)["message"]}
    assert headers["x-amzn-requestid"]


def test_bad_json_payload_is_refused_before_anything_runs(site: Site) -> None:
    client = site.client()
    for payload in (b"{nope", b"NaN", b"\xff\xfe"):
        with pytest.raises(ClientError) as info:
            client.invoke(FunctionName="mark", Payload=payload)
        assert _error(info)[:2] == (400, "InvalidRequestContentException")
    assert "nope" not in json.dumps(site.marked())
    # a JSON string or number is a valid payload, as on Lambda
    assert _payload(client.invoke(FunctionName="hello", Payload=b'"text"'))["event"] == "text"


def test_a_payload_over_6_mib_is_refused(site: Site) -> None:
    client = site.client()
    payload = b'"' + b"x" * (6 * 1024 * 1024 - 1) + b'"'  # 6 MiB + 1 byte
    with pytest.raises(ClientError) as info:
        client.invoke(FunctionName="hello", Payload=payload)
    assert _error(info) == (413, "RequestTooLargeException", "Request must be smaller than "
                            "6291456 bytes for the InvokeFunction operation")
    # exactly 6 MiB goes through
    body = _payload(client.invoke(FunctionName="size", Payload=payload[:-2] + b'"'))
    assert body == {"bytes": 6 * 1024 * 1024}


def test_over_the_concurrency_limit_is_429_with_retries_off(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    server, marks, gate = _site(tmp_path_factory, "--concurrency", "1", "--queue-size", "1")
    with running(server):
        site = Site(server, marks, gate)
        client = site.client()
        assert client.invoke(FunctionName="gate", InvocationType="Event")["StatusCode"] == 202
        assert wait_until(lambda: server.stats()["active_requests"] == 1, timeout=10)
        with pytest.raises(ClientError) as info:
            client.invoke(FunctionName="hello")
        assert _error(info)[:2] == (429, "TooManyRequestsException")
        assert info.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
        headers = info.value.response["ResponseMetadata"]["HTTPHeaders"]
        assert headers["retry-after"] == "1"
        # an Event waits in the queue (SPEC §11) for the slot; one more than
        # --queue-size is refused the same way
        queued = client.invoke(FunctionName="mark", InvocationType="Event",
                               Payload=b'{"tag": "queued"}')
        assert queued["StatusCode"] == 202
        with pytest.raises(ClientError) as info:
            client.invoke(FunctionName="hello", InvocationType="Event")
        assert _error(info)[:2] == (429, "TooManyRequestsException")
        assert site.tags() == []
        gate.touch()
        assert wait_until(lambda: site.tags() == ["queued"], timeout=10)
        assert wait_until(lambda: server.stats()["active_requests"] == 0, timeout=10)
        assert _payload(client.invoke(FunctionName="hello"))["event"] == {}
        stats = server.stats()["functions"]
        assert stats["hello"]["rejected_requests"] == 2  # the Invoke and the Event
        assert stats["gate"]["success_requests"] == 1


# -- ListFunctions, GetFunction ---------------------------------------------------------------


NAMES = ["big", "crash", "environ", "fail", "gate", "hello", "mark", "memory", "size", "slow"]


def test_list_functions_with_the_paginator(site: Site) -> None:
    paginator = site.client().get_paginator("list_functions")
    pages = list(paginator.paginate(PaginationConfig={"PageSize": 2}))
    assert len(pages) == 5 and all(len(page["Functions"]) == 2 for page in pages)
    functions = [f for page in pages for f in page["Functions"]]
    assert [f["FunctionName"] for f in functions] == NAMES
    slow = next(f for f in functions if f["FunctionName"] == "slow")
    assert slow["FunctionArn"] == "arn:aws:lambda:local:000000000000:function:slow"
    assert slow["Timeout"] == 1 and slow["Version"] == "$LATEST"
    assert slow["Runtime"] == f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert slow["Handler"] == "slow.py"  # process mode runs the file
    memory = next(f for f in functions if f["FunctionName"] == "memory")
    assert memory["MemorySize"] == 512 and memory["Timeout"] == 30
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", memory["LastModified"])
    whole = site.client().list_functions()
    assert [f["FunctionName"] for f in whole["Functions"]] == NAMES
    assert "NextMarker" not in whole  # null in the body: botocore leaves it out
    status, _headers, body = raw_request(site.server, "GET", "/2015-03-31/functions/")
    assert status == 200 and json.loads(body)["NextMarker"] is None
    status, headers, body = raw_request(site.server, "GET", "/2015-03-31/functions?MaxItems=0")
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"


def test_get_function(site: Site) -> None:
    configuration = site.client().get_function(FunctionName="hello")["Configuration"]
    assert configuration["FunctionName"] == "hello"
    assert configuration["FunctionArn"].endswith(":function:hello")
    assert configuration["State"] == "Active"
    listed = site.client().list_functions()["Functions"]
    assert configuration == next(f for f in listed if f["FunctionName"] == "hello")


# -- the aws CLI ----------------------------------------------------------------------------


def _aws(site: Site, *args: str, key: str = "any-secret") -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "AWS_ACCESS_KEY_ID": "AKIDCLI", "AWS_SECRET_ACCESS_KEY": key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.environ["AWS_CONFIG_FILE"],
           "AWS_SHARED_CREDENTIALS_FILE": os.environ["AWS_SHARED_CREDENTIALS_FILE"]}
    return subprocess.run([str(AWS), "lambda", *args, "--endpoint-url", site.server.base],
                          env=env, capture_output=True, text=True, timeout=60)


def test_aws_cli_invoke_and_list_functions(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    # awscli from PyPI is version 1: --payload is the raw JSON (v2 needs
    # --cli-binary-format raw-in-base64-out for that)
    done = _aws(site, "invoke", "--function-name", "hello", "--payload", '{"name": "Ada"}',
                "--log-type", "Tail", str(out))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["StatusCode"] == 200 and answer["ExecutedVersion"] == "$LATEST"
    assert base64.b64decode(answer["LogResult"]).startswith(b"START RequestId: ")
    assert json.loads(out.read_text())["event"] == {"name": "Ada"}
    failed = _aws(site, "invoke", "--function-name", "fail", str(out))
    assert failed.returncode == 0, failed.stderr
    assert json.loads(failed.stdout)["FunctionError"] == "Unhandled"
    listed = _aws(site, "list-functions", "--max-items", "3")
    assert listed.returncode == 0, listed.stderr
    assert [f["FunctionName"] for f in json.loads(listed.stdout)["Functions"]] == NAMES[:3]
    missing = _aws(site, "get-function", "--function-name", "nope")
    assert missing.returncode != 0 and "ResourceNotFoundException" in missing.stderr


# -- auth -----------------------------------------------------------------------------------------


def test_sigv4_with_the_key_is_accepted(keyed: Site) -> None:
    client = keyed.client(key=KEY)
    assert _payload(client.invoke(FunctionName="mark", Payload=b'{"tag": "signed"}')) == {
        "marked": "signed"}
    arn = "arn:aws:lambda:ap-south-1:123456789012:function:hello:$LATEST"
    assert _payload(client.invoke(FunctionName=arn, Payload=b"{}"))["event"] == {}
    assert client.get_function(FunctionName="hello", Qualifier="$LATEST")
    assert len(list(client.get_paginator("list_functions").paginate(
        PaginationConfig={"PageSize": 4}))) == 3
    done = _aws(keyed, "invoke", "--function-name", "mark", "--payload",
                '{"tag": "cli-signed"}', "/dev/null", key=KEY)
    assert done.returncode == 0, done.stderr
    assert {"signed", "cli-signed"} <= set(keyed.tags())


def test_a_wrong_key_or_no_signature_is_403_and_nothing_runs(keyed: Site) -> None:
    wrong = keyed.client(key="not-the-key")
    with pytest.raises(ClientError) as info:
        wrong.invoke(FunctionName="mark", Payload=b'{"tag": "wrong-key"}')
    assert _error(info)[:2] == (403, "InvalidSignatureException")
    with pytest.raises(ClientError) as info:
        wrong.list_functions()
    assert _error(info)[:2] == (403, "InvalidSignatureException")
    unsigned = boto3.client("lambda", endpoint_url=keyed.server.base, region_name="us-east-1",
                            config=NO_RETRIES.merge(Config(signature_version=botocore.UNSIGNED)))
    with pytest.raises(ClientError) as info:
        unsigned.invoke(FunctionName="mark", Payload=b'{"tag": "unsigned"}')
    assert _error(info)[:2] == (403, "UnrecognizedClientException")
    # a signature is not a bearer token: replaying one over another body fails
    response = requests.post(keyed.server.url("/2015-03-31/functions/mark/invocations"),
                             data=b'{"tag": "bearer"}', headers={
                                 "Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 403
    assert response.headers["X-Amzn-ErrorType"] == "UnrecognizedClientException"
    assert not {"wrong-key", "unsigned", "bearer"} & set(keyed.tags())
    # refused before admission: not counted (SPEC §5)
    stats = keyed.server.stats(headers={"X-API-Key": KEY})["functions"]
    assert stats.get("mark", {}).get("rejected_requests", 0) == 0


def test_x_api_key_is_accepted(keyed: Site) -> None:
    response = requests.post(keyed.server.url("/2015-03-31/functions/mark/invocations"),
                             data=b'{"tag": "x-api-key"}', headers={"X-API-Key": KEY},
                             timeout=30)
    assert response.status_code == 200, response.text
    assert "x-api-key" in keyed.tags()
    wrong = requests.get(keyed.server.url("/2015-03-31/functions"),
                         headers={"X-API-Key": KEY + "x"}, timeout=30)
    assert wrong.status_code == 403


def test_the_key_and_the_signature_never_reach_the_function(keyed: Site) -> None:
    response = keyed.client(key=KEY).invoke(FunctionName="environ", Payload=b'{"a": 1}')
    signed = json.dumps(_payload(response))
    by_header = requests.post(keyed.server.url("/2015-03-31/functions/environ/invocations"),
                              data=b"{}", headers={"X-API-Key": KEY}, timeout=30).text
    for seen in (signed, by_header):
        assert KEY not in seen
        assert "AWS4-HMAC-SHA256" not in seen and "Signature=" not in seen
        assert "HTTP_AUTHORIZATION" not in seen and "HTTP_X_API_KEY" not in seen


# -- the same invocations as /function/<name> -------------------------------------------------


def test_lambda_invocations_share_stats_and_logs_with_http_ones(site: Site) -> None:
    before = site.server.stats()["functions"].get("environ", {}).get("success_requests", 0)
    site.client().invoke(FunctionName="environ")
    assert site.server.post("/function/environ").status_code == 200
    assert site.server.stats()["functions"]["environ"]["success_requests"] == before + 2
    sources = wait_until(lambda: {r.get("source") for r in invocation_records(
        site.server.log_records()) if r.get("function") == "environ"} >= {"lambda", "http"},
        timeout=10)
    assert sources
    metrics = site.server.get("/metrics").text
    assert 'fnserve_requests_total{function="environ",outcome="ok"}' in metrics


def test_refusals_are_logged_once_as_lambda_and_not_counted(site: Site) -> None:
    before = site.server.stats()["total_requests"]
    status, headers, _body = raw_request(site.server, "POST",
                                         "/2015-03-31/functions/nope/invocations", b"{}")
    assert status == 404
    request_id = headers["x-amzn-requestid"]
    records = wait_until(lambda: [r for r in invocation_records(site.server.log_records())
                                  if r.get("request_id") == request_id], timeout=10)
    assert len(records) == 1
    assert records[0]["source"] == "lambda" and records[0]["outcome"] == "not_found"
    assert site.server.stats()["total_requests"] == before


def test_an_aws_signature_never_reaches_the_function_without_a_key_either(site: Site) -> None:
    seen = json.dumps(_payload(site.client(key="a-real-looking-secret").invoke(
        FunctionName="environ")))
    assert "AWS4-HMAC-SHA256" not in seen and "HTTP_AUTHORIZATION" not in seen
    assert "AKIDFNSERVE" not in seen


def test_a_signed_request_in_absolute_form_verifies(keyed: Site) -> None:
    """A proxy-style request line (`POST http://host/path`): the signed path is its path."""
    import http.client

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = keyed.server.url("/2015-03-31/functions/mark/invocations")
    signed = AWSRequest("POST", url, data=b'{"tag": "absolute"}',
                        headers={"Host": f"127.0.0.1:{keyed.server.port}"})
    SigV4Auth(Credentials("AKIDABS", KEY), "lambda", "us-east-1").add_auth(signed)
    connection = http.client.HTTPConnection("127.0.0.1", keyed.server.port, timeout=30)
    try:
        connection.putrequest("POST", url, skip_host=True, skip_accept_encoding=True)
        for name, value in [*signed.headers.items(), ("Content-Length", "19")]:
            connection.putheader(name, value)
        connection.endheaders(b'{"tag": "absolute"}')
        response = connection.getresponse()
        assert response.status == 200, response.read()
    finally:
        connection.close()
    assert "absolute" in keyed.tags()


@pytest.mark.go
def test_go_functions_and_a_build_failure(tmp_path: Path) -> None:
    """Every runtime speaks Lambda: a Go function answers, one that does not build is
    Lambda's function error (200 + Unhandled), not a 502."""
    write_function(tmp_path, "upper.go", """
        package main

        import (
            "fmt"
            "io"
            "os"
            "strings"
        )

        func main() {
            event, _ := io.ReadAll(os.Stdin)
            fmt.Print(strings.ToUpper(string(event)))
        }
    """)
    write_function(tmp_path, "broken.go", "package main\n\nfunc main() { undefinedThing() }\n")
    with running(LiveServer(tmp_path)) as server:
        client = Site(server, tmp_path / "marks", tmp_path / "gate").client()
        response = client.invoke(FunctionName="upper", Payload=b'"shout"')
        assert response["Payload"].read() == b'"SHOUT"'
        broken = client.invoke(FunctionName="broken")
        assert (broken["StatusCode"], broken["FunctionError"]) == (200, "Unhandled")
        body = _payload(broken)
        assert body["errorType"] == "Runtime.BuildFailed"
        assert "undefinedThing" in body["errorMessage"]
        runtimes = {f["FunctionName"]: f["Runtime"] for f in client.list_functions()["Functions"]}
        assert runtimes == {"broken": "go1.x", "upper": "go1.x"}


def test_an_event_reusing_a_known_request_id_is_a_conflict(site: Site) -> None:
    headers = {"X-Amz-Invocation-Type": "Event", "X-Request-Id": "lambda-event-once"}
    path = "/2015-03-31/functions/mark/invocations"
    status, answer, _ = raw_request(site.server, "POST", path, b'{"tag": "once"}', headers)
    assert status == 202 and answer["x-amzn-requestid"] == "lambda-event-once"
    status, answer, body = raw_request(site.server, "POST", path, b'{"tag": "twice"}', headers)
    assert status == 409 and answer["x-amzn-errortype"] == "ResourceConflictException"
    assert json.loads(body)["Type"] == "User"
    assert wait_until(lambda: "once" in site.tags(), timeout=10)
    assert "twice" not in site.tags()


def test_lambda_invocations_are_in_the_history(site: Site) -> None:
    response = site.client().invoke(FunctionName="hello", Payload=b'{"history": 1}',
                                    ClientContext=base64.b64encode(b'{"custom": {}}').decode())
    request_id = response["ResponseMetadata"]["RequestId"]
    record = wait_until(lambda: (lambda r: r.json() if r.status_code == 200 else None)(
        site.server.get(f"/invocations/{request_id}")), timeout=10)
    assert record, "the Lambda invocation was not recorded"
    assert record["source"] == "lambda" and record["function"] == "hello"
    assert record["outcome"] == "ok" and json.loads(record["request"]) == {"history": 1}
    # nothing of the signature is kept (SPEC §10)
    assert "AWS4-HMAC-SHA256" not in json.dumps(record)
