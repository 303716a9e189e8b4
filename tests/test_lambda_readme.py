"""README's "Use it as a local Lambda" works as written: its handler file, its boto3 snippet
and its aws CLI commands, run as they are against a real server (only the port differs:
tests never use a fixed one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import REPO, LiveServer, running

DOCUMENTED_URL = "http://127.0.0.1:8080"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Use it as a local Lambda")
    return text[start:text.index("\n## ", start + 1)]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _shell_block(section: str, first_word: str) -> str:
    """The indented (4-space) command block that starts with `first_word`."""
    for block in re.findall(r"(?:^    \S.*\n(?:^    .*\n)*)", section, re.M):
        if block.lstrip().startswith(first_word):
            return "\n".join(line[4:] for line in block.splitlines())
    raise AssertionError(f"no command block starting with {first_word!r}")


@pytest.fixture
def clean_aws_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with nothing AWS configured but what the README sets."""
    none = str(tmp_path / "no-aws-config")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none,
                "AWS_EC2_METADATA_DISABLED": "true",
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return env


def test_the_local_lambda_section_works_as_written(tmp_path: Path,
                                                   clean_aws_env: dict[str, str]) -> None:
    section = _section()
    handler, client_code = _python_blocks(section)
    assert "fnserve serve functions" in _shell_block(section, ".venv/bin/fnserve")
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "greet.py").write_text(handler)
    with running(LiveServer(functions)) as server:
        done = subprocess.run([sys.executable, "-c",
                               client_code.replace(DOCUMENTED_URL, server.base)],
                              env=clean_aws_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["{'statusCode': 200, 'body': 'Hello, Ada!'}",
                                            "['greet']"]
        commands = _shell_block(section, "export AWS_ACCESS_KEY_ID")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c",
                               commands.replace(DOCUMENTED_URL, server.base)],
                              cwd=tmp_path, env=clean_aws_env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        # three JSON documents in a row: invoke's answer, out.json, list-functions' answer
        decoder, text, documents = json.JSONDecoder(), done.stdout, []
        while text.strip():
            document, end = decoder.raw_decode(text.lstrip())
            documents.append(document)
            text = text.lstrip()[end:]
        invoked, result, listed = documents
        assert invoked["StatusCode"] == 200 and invoked["LogResult"]
        assert result == {"statusCode": 200, "body": "Hello, Ada!"}
        assert [f["FunctionName"] for f in listed["Functions"]] == ["greet"]
