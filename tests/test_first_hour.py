"""The first hour of a new user: what the server says when it starts, the help, the
error without FNSERVE_FUNCTIONS_DIR, `fnserve run`'s messages, shared helpers, the
samples. Real servers and real subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fnserve import __version__

from .helpers import REPO, fnserve_cli, write_function, write_toml
from .live import LiveServer, free_port, invocation_records, running

SAMPLES = REPO / "samples"
BIN = Path(sys.executable).parent


@pytest.fixture
def env() -> dict[str, str]:
    return dict(os.environ)


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text.strip()


# -- the start line ---------------------------------------------------------------------


def test_serve_says_what_it_serves_where(fn_dir: Path) -> None:
    write_function(fn_dir, "a.py", "print(1)\n")
    write_function(fn_dir, "b.py", "print(2)\n")
    with running(LiveServer(fn_dir)) as server:
        lines = [r for r in server.log_records() if r["message"].startswith("FnServe ")]
        assert [r["message"] for r in lines] == [
            f"FnServe {__version__} serving 2 functions from {fn_dir} on "
            f"http://127.0.0.1:{server.port}"]
        assert lines[0]["level"] == "INFO"
    assert server.stdout() == ""  # serve prints nothing on stdout


def test_dev_lists_the_functions_and_their_status_on_stdout(fn_dir: Path) -> None:
    write_function(fn_dir, "fine.py", "print(1)\n")
    write_function(fn_dir, "odd.py", "print(2)\n")
    write_toml(fn_dir, "[functions.odd]\npython = '/no/such/python'\n")
    with running(LiveServer(fn_dir, mode="dev")) as server:
        out = server.stdout()
    assert f"FnServe {__version__} serving 2 functions from {fn_dir} on " \
           f"http://127.0.0.1:{server.port}" in out
    assert re.search(r"^  fine +python +10s +ok$", out, re.MULTILINE), out
    assert re.search(r"^  odd +python +10s +error: python interpreter /no/such/python is "
                     r"not executable$", out, re.MULTILINE), out


def test_stock_gunicorn_says_it_too(fn_dir: Path) -> None:
    write_function(fn_dir, "a.py", "print(1)\n")
    port = free_port()
    server = LiveServer(fn_dir, port=port, env={**os.environ, "FNSERVE_PORT": str(port)},
                        command=[str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py",
                                 "fnserve.wsgi:app"])
    with running(server):
        assert any(r["message"] == f"FnServe {__version__} serving 1 function from {fn_dir} "
                   f"on http://127.0.0.1:{port}" for r in server.log_records())


# -- help -------------------------------------------------------------------------------


def test_plain_fnserve_lists_the_commands_and_exits_0(env: dict[str, str]) -> None:
    done = fnserve_cli(env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    for command in ("serve", "dev", "run", "list"):
        assert re.search(rf"^  {command} ", text, re.MULTILINE), text


def test_serve_help_shows_defaults_formats_and_variables(env: dict[str, str]) -> None:
    text = " ".join(fnserve_cli("serve", "--help", env=env).stdout.decode().split())
    for shown in ("[default: 8080; FNSERVE_PORT]", "[default: 100; FNSERVE_CONCURRENCY]",
                  "[default: 30s; FNSERVE_TIMEOUT]", "[default: 6MB; FNSERVE_MAX_BODY]",
                  "[default: 6MB; FNSERVE_MAX_OUTPUT]", "DURATION is 500ms, 10s, 2m, 1h",
                  "SIZE is 512KB, 6MB, 1GB", "FNSERVE_<OPTION>", "FNSERVE_FUNCTIONS_DIR"):
        assert shown in text, shown


def test_dev_help_says_what_dev_does_with_its_own_defaults(env: dict[str, str]) -> None:
    text = " ".join(fnserve_cli("dev", "--help", env=env).stdout.decode().split())
    assert "reload on every save" in text
    assert "[default: 10; FNSERVE_CONCURRENCY]" in text
    assert "[default: 10s; FNSERVE_TIMEOUT]" in text


def test_run_help_says_what_target_can_be(env: dict[str, str]) -> None:
    text = " ".join(fnserve_cli("run", "--help", env=env).stdout.decode().split())
    assert "TARGET is a function's name in --dir" in text
    assert "the path of its file or directory" in text
    assert "--max-output SIZE" in text


# -- gunicorn and flask as the README has them ---------------------------------------------


@pytest.mark.parametrize("command", [
    [str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py", "fnserve.wsgi:app"],
    [str(BIN / "flask"), "--app", "fnserve.wsgi", "run"],
], ids=["gunicorn", "flask"])
def test_without_a_functions_directory_it_is_one_line(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FNSERVE_FUNCTIONS_DIR"}
    env["FNSERVE_PORT"] = str(free_port())
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert one_line(done.stderr) == ("fnserve: no functions directory: give DIR or set "
                                     "FNSERVE_FUNCTIONS_DIR")


def test_flask_run_logs_invocations_and_function_stderr(fn_dir: Path) -> None:
    write_function(fn_dir, "noisy.py", "import sys; print('to the log', file=sys.stderr)\n")
    port = free_port()
    server = LiveServer(fn_dir, port=port, check_clean_exit=False,
                        command=[str(BIN / "flask"), "--app", "fnserve.wsgi", "run",
                                 "--port", str(port)])
    with running(server):
        response = requests.post(server.url("/function/noisy"), timeout=30)
        assert response.status_code == 200
        request_id = response.headers["X-Request-Id"]
        server.stop(signal.SIGINT)
    records = [r for r in server.log_records() if r.get("request_id") == request_id]
    assert [r["message"] for r in invocation_records(records)] == ["POST /function/noisy 200"]
    assert any(r["message"] == "to the log" and r["stream"] == "stderr" for r in records)


# -- fnserve run ---------------------------------------------------------------------------


def test_run_passes_text_stdin_to_a_text_function(env: dict[str, str]) -> None:
    done = fnserve_cli("run", str(SAMPLES / "upper.sh"), env=env, input=b"shout it\n")
    assert (done.returncode, done.stdout) == (0, b"SHOUT IT\n")


def test_run_checks_stdin_that_looks_like_json(env: dict[str, str]) -> None:
    done = fnserve_cli("run", str(SAMPLES / "upper.sh"), env=env, input=b'{"a": ')
    assert done.returncode == 2
    assert one_line(done.stderr).startswith("Error: stdin is not valid JSON: ")


def test_run_says_when_the_function_was_killed_by_a_signal(fn_dir: Path,
                                                           env: dict[str, str]) -> None:
    write_function(fn_dir, "segv.py", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)\n")
    done = fnserve_cli("run", "segv", "--dir", str(fn_dir), env=env)
    assert done.returncode == 128 + signal.SIGSEGV
    assert one_line(done.stderr) == "fnserve: segv was killed by signal 11 (SIGSEGV)"


def test_an_unknown_name_hints_at_dir(tmp_path: Path, env: dict[str, str]) -> None:
    done = fnserve_cli("run", "hello", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr) == (f"Error: no function named 'hello' in {tmp_path} (give "
                                     "--dir DIR, or the path of the function's file)")


def test_output_too_large_names_the_limit_and_run_takes_max_output(
        fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "big.py", "print('x' * 5000)\n")
    assert fnserve_cli("run", "big", "--dir", str(fn_dir), env=env).returncode == 0
    done = fnserve_cli("run", "big", "--dir", str(fn_dir), "--max-output", "4KB", env=env)
    assert done.returncode == 1
    assert one_line(done.stderr) == ("fnserve: big wrote more than the output limit of 4KB "
                                     "(--max-output); it was killed")


# -- shared helpers, list, samples -----------------------------------------------------------


def test_helpers_import_from_both_layouts(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "_helpers.py", "WORD = 'shared'\n")
    write_function(fn_dir, "flat.py", "import _helpers; print(_helpers.WORD)\n")
    write_function(fn_dir, "nested/main.py", "import _helpers; print(_helpers.WORD)\n")
    for name in ("flat", "nested"):
        done = fnserve_cli("run", name, "--dir", str(fn_dir), env=env)
        assert (done.returncode, done.stdout) == (0, b"shared\n"), done.stderr
    with running(LiveServer(fn_dir)) as server:
        assert server.post("/function/nested").text == "shared\n"


def test_list_shows_the_timeout_that_applies(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "plain.py", "print(1)\n")
    write_function(fn_dir, "quick.py", "print(1)\n")
    write_toml(fn_dir, "[functions.quick]\ntimeout = '2s'\n")
    rows = [row.split() for row in
            fnserve_cli("list", str(fn_dir), env=env).stdout.decode().splitlines()]
    column = rows[0].index("TIMEOUT")
    table = {row[0]: row[column] for row in rows[1:]}
    assert table == {"plain": "30s", "quick": "2s"}  # as GET /functions shows them
    with running(LiveServer(fn_dir)) as server:
        listed = {f["name"]: f["timeout"] for f in server.get("/functions").json()["functions"]}
    assert listed == table


def test_the_samples_that_time_out_and_take_text(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples, ignore=shutil.ignore_patterns("wordcount"))
    with running(LiveServer(samples)) as server:
        text = server.post("/function/reverse", data="stressed",
                           headers={"Content-Type": "text/plain"})
        assert (text.status_code, text.text) == (200, "desserts\n")
        slow = server.post("/function/forever")
        assert slow.status_code == 504
        assert slow.json()["error"] == "function timed out after 2s"
        greet = server.post("/function/greet", json={"name": "Ada"})
        assert greet.json() == {"message": "Hello, Ada!"}
