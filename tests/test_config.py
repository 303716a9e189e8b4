"""fnserve.toml and the server options (SPEC §1, §4, §6): values, precedence, every bad shape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fnserve.config import format_duration, load_config, parse_duration, parse_size
from fnserve.errors import ConfigError
from fnserve.registry import load_registry

from .helpers import fnserve_cli, write_function, write_toml

# (toml, the key the error must name, the problem it must state)
BAD_TOML = {
    "not toml": ("[functions.hello\ntimeout = 1", "not valid TOML", "line 1"),
    "unknown table": ("[bogus]\nx = 1", "[bogus]", "unknown table"),
    "defaults not a table": ("defaults = 5", "defaults", "must be a table"),
    "unknown key": ("[functions.hello]\ntimeuot = '1s'", "functions.hello.timeuot",
                    "unknown key"),
    "unknown key in defaults": ("[defaults]\nmemroy = '1MB'", "defaults.memroy", "unknown key"),
    "timeout a word": ("[functions.hello]\ntimeout = 'soon'", "functions.hello.timeout",
                       "not a duration"),
    "timeout negative": ("[functions.hello]\ntimeout = -1", "functions.hello.timeout",
                         "must be positive"),
    "timeout zero": ("[defaults]\ntimeout = '0s'", "defaults.timeout", "must be positive"),
    "timeout a boolean": ("[functions.hello]\ntimeout = true", "functions.hello.timeout",
                          "not a duration"),
    "timeout an array": ("[functions.hello]\ntimeout = [1]", "functions.hello.timeout",
                         "not a duration"),
    "memory a word": ("[functions.hello]\nmemory = 'lots'", "functions.hello.memory",
                      "not a size"),
    "memory a unit typo": ("[functions.hello]\nmemory = '64XB'", "functions.hello.memory",
                           "not a size"),
    "memory zero": ("[functions.hello]\nmemory = 0", "functions.hello.memory",
                    "must be positive"),
    "memory a boolean": ("[functions.hello]\nmemory = false", "functions.hello.memory",
                         "not a size"),
    "env not a table": ("[functions.hello]\nenv = 'A=1'", "functions.hello.env",
                        "must be a table"),
    "env value not a string": ("[functions.hello]\nenv = { A = 1 }", "functions.hello.env",
                               "A must be a string"),
    "env value a table": ("[defaults.env.A]\nB = 'x'", "defaults.env", "A must be a string"),
    "env bad key": ("[functions.hello]\nenv = { '1A' = 'x' }", "functions.hello.env",
                    "not an environment variable name"),
    "env key with a dash": ("[functions.hello.env]\n'MY-VAR' = 'x'", "functions.hello.env",
                            "not an environment variable name"),
    "python not a string": ("[functions.hello]\npython = 3", "functions.hello.python",
                            "must be a path"),
    "functions not a table": ("functions = 'hello'", "functions", "must be a table"),
    "a function not a table": ("[functions]\nhello = 5", "functions.hello", "must be a table"),
    "server not a table": ("server = 1", "[server]", "must be a table"),
    "server unknown option": ("[server]\nconcurency = 5", "[server] concurency",
                              "unknown option"),
    "server bad port": ("[server]\nport = 'http'", "[server] port", "invalid literal"),
    "server port out of range": ("[server]\nport = 70000", "[server] port", "not a port"),
    "server port a boolean": ("[server]\nport = true", "[server] port", "not a port"),
    "server bad concurrency": ("[server]\nconcurrency = 0", "[server] concurrency",
                               "at least 1"),
    "server bad timeout": ("[server]\ntimeout = 'soon'", "[server] timeout", "not a duration"),
    "server bad max-body": ("[server]\nmax-body = '6 apples'", "[server] max-body",
                            "not a size"),
    "server bad log format": ("[server]\nlog_format = 'xml'", "[server] log_format",
                              "must be json or text"),
    "server bad pass-env": ("[server]\npass-env = ['A B']", "[server] pass-env",
                            "not an environment variable name"),
    "server bad forward-header": ("[server]\nforward-header = 'X Bad'",
                                  "[server] forward-header", "not a header name"),
}


@pytest.fixture
def hello_dir(fn_dir: Path) -> Path:
    write_function(fn_dir, "hello.py", "print('hi')\n")
    return fn_dir


def check_message(message: str, directory: Path, key: str, problem: str) -> None:
    assert str(directory.resolve() / "fnserve.toml") in message
    assert key in message
    assert problem in message


@pytest.mark.parametrize(("text", "key", "problem"), BAD_TOML.values(), ids=BAD_TOML.keys())
def test_bad_toml_stops_the_server_config(hello_dir: Path, text: str, key: str,
                                          problem: str) -> None:
    write_toml(hello_dir, text)
    with pytest.raises(ConfigError) as caught:
        load_config(hello_dir, {}, {"PATH": "/bin"})
    check_message(str(caught.value), hello_dir, key, problem)


@pytest.mark.parametrize(("text", "key", "problem"), BAD_TOML.values(), ids=BAD_TOML.keys())
def test_bad_toml_stops_the_registry(hello_dir: Path, text: str, key: str, problem: str) -> None:
    write_toml(hello_dir, text)
    with pytest.raises(ConfigError) as caught:
        load_registry(hello_dir)
    check_message(str(caught.value), hello_dir, key, problem)


@pytest.mark.parametrize("shape", ["not toml", "unknown key", "env value not a string",
                                   "server unknown option", "server bad port"])
@pytest.mark.parametrize("command", [
    ["list", "{dir}"],
    ["run", "hello", "--dir", "{dir}"],
    ["serve", "{dir}", "--port", "0"],  # refused before anything binds
], ids=["list", "run", "serve"])
def test_bad_toml_on_the_command_line(hello_dir: Path, shape: str, command: list[str]) -> None:
    text, key, problem = BAD_TOML[shape]
    write_toml(hello_dir, text)
    args = [arg.format(dir=hello_dir) for arg in command]
    done = fnserve_cli(*args, env=os.environ, timeout=20)
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert stderr.startswith("Error: ")
    assert stderr.count("\n") == 1, stderr  # one line, no traceback
    check_message(stderr, hello_dir, key, problem)
    assert done.stdout == b""


def test_a_toml_that_is_not_utf8_is_a_config_error(hello_dir: Path) -> None:
    (hello_dir / "fnserve.toml").write_bytes(b"[defaults]\ntimeout = '\xff'\n")
    with pytest.raises(ConfigError) as caught:
        load_registry(hello_dir)
    assert "fnserve.toml" in str(caught.value) and "not UTF-8" in str(caught.value)
    done = fnserve_cli("list", str(hello_dir), env=os.environ, timeout=20)
    assert done.returncode == 2
    assert done.stderr.decode().startswith("Error: ") and done.stderr.count(b"\n") == 1


def test_a_good_toml(hello_dir: Path) -> None:
    write_toml(hello_dir, """
        [defaults]
        timeout = "10s"
        [server]
        concurrency = 50
        max-body = "1MB"
        forward_header = ["X-Tenant"]
        [functions.hello]
        timeout = "5s"
        memory = "256MB"
        env = { GREETING = "Hello" }
        python = "/usr/bin/python3"
    """)
    config = load_config(hello_dir, {}, {})
    assert (config.concurrency, config.workers, config.max_body) == (50, 50, 1024**2)
    assert config.forward_headers == ("X-API-Key", "Authorization", "X-Forwarded-For",
                                      "X-Tenant")
    settings = load_registry(hello_dir).get("hello").settings
    assert (settings.timeout, settings.memory) == (5.0, 256 * 1024**2)
    assert dict(settings.env) == {"GREETING": "Hello"}
    assert settings.python == "/usr/bin/python3"


def test_precedence_flag_env_toml_default(hello_dir: Path) -> None:
    write_toml(hello_dir, "[server]\nport = 7000\nconcurrency = 7\ntimeout = '7s'\n")
    environ = {"FNSERVE_PORT": "8000", "FNSERVE_CONCURRENCY": "8"}
    config = load_config(hello_dir, {"port": "9000"}, environ)
    assert config.port == 9000  # flag
    assert config.concurrency == 8  # environment
    assert config.timeout == 7.0  # fnserve.toml
    assert config.max_output == 6 * 1024**2  # default
    assert config.graceful_timeout == 12.0  # --timeout + 5s


def test_dev_defaults(hello_dir: Path) -> None:
    config = load_config(hello_dir, {}, {}, dev=True)
    assert (config.concurrency, config.timeout, config.log_format) == (10, 10.0, "text")
    assert config.dev


def test_directory_from_the_environment(hello_dir: Path) -> None:
    config = load_config(None, {}, {"FNSERVE_FUNCTIONS_DIR": str(hello_dir)})
    assert config.functions_dir == hello_dir.resolve()
    with pytest.raises(ConfigError, match="FNSERVE_FUNCTIONS_DIR"):
        load_config(None, {}, {})
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(hello_dir / "hello.py", {}, {})


def test_bad_environment_value_names_the_variable(hello_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^FNSERVE_TIMEOUT: not a duration"):
        load_config(hello_dir, {}, {"FNSERVE_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match=r"^--workers: must be at least 1"):
        load_config(hello_dir, {"workers": "0"}, {})


def test_cache_dir_follows_xdg(hello_dir: Path, tmp_path: Path) -> None:
    config = load_config(hello_dir, {}, {"XDG_CACHE_HOME": str(tmp_path), "HOME": "/h"})
    assert config.cache_dir == tmp_path / "fnserve"
    assert load_config(hello_dir, {}, {"HOME": "/h"}).cache_dir == Path("/h/.cache/fnserve")


def test_build_environment_keeps_secrets_out(hello_dir: Path) -> None:
    environ = {"PATH": "/bin", "HOME": "/h", "GOCACHE": "/g", "GOFLAGS": "-mod=mod",
               "CGO_ENABLED": "0", "SECRET_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    config = load_config(hello_dir, {}, environ)
    assert dict(config.build_env) == {"PATH": "/bin", "HOME": "/h", "GOCACHE": "/g",
                                      "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), (3, 3.0),
    (" 10s ", 10.0), (0.25, 0.25),
])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10 sec", "-1s", "0", True, "1d", "s"])
def test_parse_duration_rejects(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("512KB", 512 * 1024), ("6MB", 6 * 1024**2), ("1GB", 1024**3), ("100", 100), (100, 100),
    ("64mb", 64 * 1024**2), ("1MiB", 1024**2), ("10b", 10), ("2k", 2048),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "6 apples", "-1", "0", False, "1TB"])
def test_parse_size_rejects(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.5, 1.0, 10.0, 1.5)] == ["500ms", "1s", "10s", "1.5s"]
