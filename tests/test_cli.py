"""`fnserve run`, `fnserve list`, `python -m fnserve` (SPEC §6), in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fnserve import __version__

from .helpers import REPO, fnserve_cli, write_function, write_toml

SAMPLES = REPO / "samples"
SHOW = """
    import json, os, sys
    print(json.dumps({"event": sys.stdin.read(), "context": json.loads(os.environ["FN_CONTEXT"]),
                      "greeting": os.environ.get("GREETING")}))
"""


@pytest.fixture
def env() -> dict[str, str]:
    # the session's environment: its XDG_CACHE_HOME is a tmp dir (see conftest)
    return dict(os.environ)


def run(*args: str, env: dict[str, str], **kwargs):  # type: ignore[no-untyped-def]
    return fnserve_cli("run", *args, env=env, **kwargs)


def one_line_error(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.startswith("Error: "), text
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


def test_version(env: dict[str, str]) -> None:
    done = fnserve_cli("--version", env=env)
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"fnserve, version {__version__}"


def test_console_script(env: dict[str, str]) -> None:
    script = Path(sys.executable).parent / "fnserve"
    assert script.exists(), "fnserve is not installed in this environment"
    done = subprocess.run([script, "--help"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0
    help_text = done.stdout.decode()
    for command in ("serve", "dev", "run", "list"):
        assert command in help_text


def test_run_prints_stdout_and_stderr(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "both.py", """
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
    """)
    done = run("both", "--dir", str(fn_dir), env=env)
    assert done.returncode == 0
    assert done.stdout == b"to stdout\n"
    assert done.stderr == b"to stderr\n"


def test_run_exits_with_the_function_status(env: dict[str, str]) -> None:
    done = run("fail", "--dir", str(SAMPLES), env=env)
    assert done.returncode == 3
    assert b"something went wrong in fail.py" in done.stderr


def test_run_exit_by_signal_is_128_plus_n(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "term.py", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert run("term", "--dir", str(fn_dir), env=env).returncode == 128 + 15


def test_run_timeout_is_124(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "sleepy.py", "import time; time.sleep(30)")
    started = time.monotonic()
    done = run("sleepy", "--dir", str(fn_dir), "--timeout", "1s", env=env)
    assert time.monotonic() - started < 5
    assert done.returncode == 124
    assert b"sleepy timed out after 1s" in done.stderr


def test_run_timeout_only_shortens(fn_dir: Path, env: dict[str, str]) -> None:
    write_toml(fn_dir, "[functions.show]\ntimeout = '2s'\n")
    write_function(fn_dir, "show.py", SHOW)
    done = run("show", "--dir", str(fn_dir), "--timeout", "1m", env=env)
    assert 1.5 < json.loads(done.stdout)["context"]["deadline"] <= 2.0


def test_run_output_too_large_is_1(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "big.py", "import sys; sys.stdout.buffer.write(b'x' * (7 * 1024**2))")
    done = run("big", "--dir", str(fn_dir), env=env)
    assert done.returncode == 1
    assert done.stdout == b""
    assert b"big wrote more than the output limit" in done.stderr


@pytest.mark.go
def test_run_build_failure_is_1(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "broken.go", "package main\n\nfunc main() { notDefined() }\n")
    done = run("broken", "--dir", str(fn_dir), env=env)
    assert done.returncode == 1
    assert b"undefined: notDefined" in done.stderr
    assert done.stdout == b""


@pytest.mark.go
def test_run_with_an_unwritable_cache_is_one_line_not_a_traceback(
        fn_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    write_function(fn_dir, "ok.go", "package main\n\nfunc main() {}\n")
    not_a_directory = tmp_path / "cache-file"
    not_a_directory.write_text("")
    done = run("ok", "--dir", str(fn_dir), env={**env, "XDG_CACHE_HOME": str(not_a_directory)})
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert stderr.startswith("fnserve: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.go
def test_run_go_sample(env: dict[str, str]) -> None:
    done = run("wordcount", "--dir", str(SAMPLES), "--data", '{"text": "a b c d"}', env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["words"] == 4


@pytest.mark.parametrize("args", [
    ["nosuch"],
    ["../hello"],
    ["no/such/file.py"],
])
def test_run_unknown_function_is_2(args: list[str], env: dict[str, str]) -> None:
    done = run(*args, "--dir", str(SAMPLES), env=env)
    assert done.returncode == 2
    one_line_error(done.stderr)
    assert done.stdout == b""


@pytest.mark.parametrize("data", ["{not json", "[1,", "@/no/such/file"])
def test_run_bad_data_is_2(data: str, env: dict[str, str], fn_dir: Path) -> None:
    marker = fn_dir / "ran"
    write_function(fn_dir, "touch.py", f"open({str(marker)!r}, 'w').close()")
    done = run("touch", "--dir", str(fn_dir), "--data", data, env=env)
    assert done.returncode == 2
    assert "--data" in one_line_error(done.stderr)
    assert not marker.exists()  # checked before anything runs


def test_run_bad_stdin_json_is_2(env: dict[str, str]) -> None:
    done = run("echo", "--dir", str(SAMPLES), env=env, input=b"{oops")
    assert done.returncode == 2
    one_line_error(done.stderr)


def test_run_bad_options_are_2(env: dict[str, str]) -> None:
    for args in (["--timeout", "soon"], ["--param", "novalue"], ["--env", "=x"]):
        done = run("echo", "--dir", str(SAMPLES), *args, env=env)
        assert done.returncode == 2, args
        one_line_error(done.stderr)


def test_run_data_inline_file_and_stdin(fn_dir: Path, tmp_path: Path,
                                        env: dict[str, str]) -> None:
    write_function(fn_dir, "show.py", SHOW)
    inline = run("show", "--dir", str(fn_dir), "--data", '{"via": "flag"}', env=env)
    assert json.loads(inline.stdout)["event"] == '{"via": "flag"}'
    event_file = tmp_path / "event.json"
    event_file.write_text('{"via": "file"}')
    from_file = run("show", "--dir", str(fn_dir), "--data", f"@{event_file}", env=env)
    assert json.loads(from_file.stdout)["event"] == '{"via": "file"}'
    from_stdin = run("show", "--dir", str(fn_dir), env=env, input=b'{"via": "stdin"}')
    assert json.loads(from_stdin.stdout)["event"] == '{"via": "stdin"}'
    empty = run("show", "--dir", str(fn_dir), env=env)
    assert json.loads(empty.stdout)["event"] == "{}"


def test_run_params_and_env_reach_the_context(env: dict[str, str]) -> None:
    done = run("echo", "--dir", str(SAMPLES), "--param", "name=Ada", "--param", "q=a=b",
               "--env", "HTTP_X_API_KEY=k-1", env=env)
    assert done.returncode == 0, done.stderr
    context = json.loads(done.stdout)["context"]
    assert context["parameters"] == {"name": "Ada", "q": "a=b"}
    assert context["env"]["HTTP_X_API_KEY"] == "k-1"
    assert context["function"] == "echo"


def test_run_uses_the_function_settings(env: dict[str, str]) -> None:
    done = run("hello", "--dir", str(SAMPLES), "--data", '{"name": "Ada"}', env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["message"] == "Hello, Ada!"


def test_run_by_path(fn_dir: Path, env: dict[str, str]) -> None:
    write_toml(fn_dir, "[functions.show]\nenv = { GREETING = 'configured' }\n")
    write_function(fn_dir, "show.py", SHOW)
    done = run(str(fn_dir / "show.py"), env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["greeting"] == "configured"
    in_cwd = run("show.py", env=env, cwd=fn_dir)
    assert json.loads(in_cwd.stdout)["context"]["function"] == "show"


def test_run_does_not_leak_the_callers_environment(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "secret.py", "import os; print(os.environ.get('SECRET_TOKEN'))")
    done = run("secret", "--dir", str(fn_dir), env={**env, "SECRET_TOKEN": "x"})
    assert done.stdout == b"None\n"


def test_list_samples(env: dict[str, str]) -> None:
    done = fnserve_cli("list", str(SAMPLES), env=env)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.decode().splitlines()]
    assert rows[0] == ["NAME", "RUNTIME", "MODE", "TIMEOUT", "MEMORY", "ISOLATION", "STATUS"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table == {
        "echo": ["python", "process", "10s", "-", "none", "ok"],
        "fail": ["python", "process", "10s", "-", "none", "ok"],
        "hello": ["python", "process", "5s", "256MB", "none", "ok"],
        "slow": ["python", "process", "3s", "-", "none", "ok"],
        "upper": ["exec", "-", "10s", "-", "none", "ok"],
        "wordcount": ["go", "-", "10s", "512MB", "none", "ok"],
    }


def test_list_shows_problems(fn_dir: Path, env: dict[str, str]) -> None:
    write_toml(fn_dir, "[functions.odd]\npython = '/no/such/python'\n")
    write_function(fn_dir, "odd.py", "print(1)")
    done = fnserve_cli("list", str(fn_dir), env=env)
    assert done.returncode == 0
    assert "error: python interpreter /no/such/python is not executable" in done.stdout.decode()


def test_list_warns_about_a_name_defined_twice(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "hello.py", "print(1)")
    write_function(fn_dir, "hello/main.py", "print(2)")
    done = fnserve_cli("list", str(fn_dir), env=env)
    assert done.returncode == 0
    assert done.stderr.decode() == ("warning: function 'hello' is defined more than once: "
                                    "using hello/main.py, ignoring hello.py\n")
    assert "hello" in done.stdout.decode()
    ran = run("hello", "--dir", str(fn_dir), env=env)
    assert ran.stdout == b"2\n"  # the directory wins


def test_list_empty_and_missing_directories(fn_dir: Path, env: dict[str, str]) -> None:
    empty = fnserve_cli("list", str(fn_dir), env=env)
    assert (empty.returncode, empty.stdout.decode()) == (0, f"no functions in {fn_dir}\n")
    missing = fnserve_cli("list", str(fn_dir / "nope"), env=env)
    assert missing.returncode == 2
    one_line_error(missing.stderr)


def test_python_dash_m(env: dict[str, str]) -> None:
    done = fnserve_cli("run", "hello", "--dir", str(SAMPLES), env=env)
    assert done.returncode == 0
    assert json.loads(done.stdout)["message"] == "Hello, world!"
