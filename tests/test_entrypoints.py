"""The other ways to start the server (SPEC §6): gunicorn with conf/, `flask run`, and
where settings come from: flag > FNSERVE_* > [server] of fnserve.toml > default.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import fnserve_cli, wait_until, write_function, write_toml
from .live import REPO, LiveServer, free_port, invocation_records, running

BIN = Path(sys.executable).parent
# a response the test keeps holds its socket, and a stopping gunicorn waits ~2 s on it
CLOSE = {"Connection": "close"}


@pytest.fixture
def hello_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "functions"
    write_function(directory, "hello.py", """
        import json, os, sys
        event = json.load(sys.stdin)
        print("hello on stderr", file=sys.stderr)
        print(json.dumps({"hello": event.get("name", "world"),
                          "function": os.environ["FN_FUNCTION"]}))
    """)
    return directory


def test_gunicorn_with_the_shipped_conf(hello_dir: Path) -> None:
    command = [str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py", "fnserve.wsgi:app"]
    # LiveServer sets FNSERVE_FUNCTIONS_DIR and FNSERVE_PORT for the command
    with running(LiveServer(hello_dir, command=command)) as server:
        response = server.post("/function/hello", json={"name": "Ada"}, headers=CLOSE)
        assert response.status_code == 200
        assert response.json() == {"hello": "Ada", "function": "hello"}
        assert response.headers["X-Request-Id"]
        records = server.log_records()  # every line is JSON
        lines = [r for r in invocation_records(records)
                 if r["request_id"] == response.headers["X-Request-Id"]]
        assert [(r["function"], r["status"], r["outcome"]) for r in lines] == [
            ("hello", 200, "ok")]
        assert any(r.get("stream") == "stderr" and r["message"] == "hello on stderr"
                   for r in records)
        assert any(r["logger"] == "gunicorn.error" and r["message"].startswith("Booting worker")
                   for r in records)
        assert f"http://127.0.0.1:{server.port}" in server.stderr()
    assert server.stdout() == ""


def test_gunicorn_conf_reads_fnserve_settings(hello_dir: Path) -> None:
    command = [str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py", "fnserve.wsgi:app"]
    env = {**os.environ, "FNSERVE_API_KEY": "from-env", "FNSERVE_MAX_BODY": "64"}
    with running(LiveServer(hello_dir, command=command, env=env)) as server:
        assert server.post("/function/hello").status_code == 401
        headers = {"X-API-Key": "from-env", **CLOSE}
        assert server.post("/function/hello", headers=headers, json={}).status_code == 200
        too_big = server.post("/function/hello", headers=headers, json={"name": "x" * 100})
        assert too_big.status_code == 413


def test_gunicorn_access_lines_are_json_when_turned_on(hello_dir: Path,
                                                      tmp_path: Path) -> None:
    # the shipped conf keeps gunicorn's access log quiet (the invocation line is the
    # access log); a deployment that turns it on gets JSON lines like everything else
    conf = tmp_path / "access.conf.py"
    conf.write_text(f"exec(open({str(REPO / 'conf/gunicorn.conf.py')!r}).read())\n"
                    "logconfig_dict['loggers']['gunicorn.access']['level'] = 'INFO'\n")
    command = [str(BIN / "gunicorn"), "-c", str(conf), "fnserve.wsgi:app"]
    with running(LiveServer(hello_dir, command=command)) as server:
        assert server.get("/stats", headers=CLOSE).status_code == 200
        # gunicorn writes the access line after the response has gone out: poll for it
        assert wait_until(lambda: any(
            r["logger"] == "gunicorn.access" and "GET /stats" in r["message"]
            for r in server.log_records()), 10), server.stderr()


def test_gunicorn_conf_warns_on_a_public_address_without_a_key(hello_dir: Path) -> None:
    command = [str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py", "fnserve.wsgi:app"]
    env = {**os.environ, "FNSERVE_HOST": "0.0.0.0"}
    with running(LiveServer(hello_dir, command=command, env=env)) as server:
        warnings = [r for r in server.log_records()
                    if r["level"] == "WARNING" and "--api-key" in r["message"]]
        assert len(warnings) == 1, server.stderr()


def test_gunicorn_conf_keeps_the_last_good_toml_when_a_worker_restarts(hello_dir: Path) -> None:
    # a worker that cannot load its app makes the gunicorn master exit: a toml broken
    # while the server runs must not take it down at the next HUP (or worker crash)
    command = [str(BIN / "gunicorn"), "-c", "conf/gunicorn.conf.py", "fnserve.wsgi:app"]
    with running(LiveServer(hello_dir, command=command)) as server:
        assert server.proc is not None
        old_workers = {p.pid for p in server.workers()}
        write_toml(hello_dir, "[functions.hello]\ntimeout = 'soon'\n")
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: (new := {p.pid for p in server.workers()}) and
                          not new & old_workers, 20), server.stderr()
        response = server.post("/function/hello", json={"name": "Ada"}, headers=CLOSE)
        assert response.status_code == 200
        assert response.json()["hello"] == "Ada"
        assert server.proc.poll() is None
        assert any("timeout" in r["message"] and "last good" in r["message"]
                   for r in server.log_records()), server.stderr()


def test_flask_run_serves_a_function(hello_dir: Path) -> None:
    port = free_port()
    command = [str(BIN / "flask"), "--app", "fnserve.wsgi", "run", "--port", str(port)]
    # the development server dies of SIGTERM (exit -15): only that it serves matters here
    with running(LiveServer(hello_dir, command=command, port=port,
                            check_clean_exit=False)) as server:
        response = server.post("/function/hello", json={"name": "Bob"})
        assert response.status_code == 200
        assert response.json() == {"hello": "Bob", "function": "hello"}
        assert response.headers["Content-Type"] == "application/json"
        assert server.post("/function/nope").status_code == 404


# -- precedence --------------------------------------------------------------------------


def _release_dir(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "functions"
    release = tmp_path / "release"
    write_function(directory, "echo.py", "import sys; sys.stdout.write(sys.stdin.read())\n")
    write_function(directory, "held.py", f"""
        import os, time
        deadline = time.monotonic() + 20
        while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("{{}}")
    """)
    write_toml(directory, """
        [server]
        max-body = 100
        concurrency = 1
    """)
    return directory, release


def _largest_accepted(server: LiveServer, sizes: list[int]) -> int:
    accepted = 0
    for size in sizes:
        status = server.post("/function/echo", data=b"a" * size).status_code
        assert status in (200, 413), status
        if status == 200:
            accepted = size
    return accepted


def _admitted(server: LiveServer, release: Path, count: int) -> int:
    """Fire `count` held invocations at once: how many are admitted (the rest get 429)."""
    release.unlink(missing_ok=True)
    threads = [threading.Thread(target=lambda: requests.post(
        server.url("/function/held"), timeout=30, headers=CLOSE)) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        def settled() -> dict[str, Any] | None:
            stats = server.stats()
            done = stats["active_requests"] + stats["rejected_requests"] == count
            return stats if done else None

        stats = wait_until(settled, 10)
        assert stats, server.stats()
        return int(stats["active_requests"])
    finally:
        release.touch()
        for thread in threads:
            thread.join(30)


def test_server_table_of_fnserve_toml_applies(tmp_path: Path) -> None:
    directory, release = _release_dir(tmp_path)
    with running(LiveServer(directory)) as server:
        assert _largest_accepted(server, [100, 101]) == 100
        assert _admitted(server, release, 3) == 1


def test_environment_beats_fnserve_toml(tmp_path: Path) -> None:
    directory, release = _release_dir(tmp_path)
    env = {**os.environ, "FNSERVE_MAX_BODY": "200", "FNSERVE_CONCURRENCY": "2"}
    with running(LiveServer(directory, env=env)) as server:
        assert _largest_accepted(server, [150, 200, 201]) == 200
        assert _admitted(server, release, 3) == 2


def test_flag_beats_environment(tmp_path: Path) -> None:
    directory, release = _release_dir(tmp_path)
    env = {**os.environ, "FNSERVE_MAX_BODY": "200", "FNSERVE_CONCURRENCY": "2"}
    with running(LiveServer(directory, "--max-body", "300", "--concurrency", "3",
                            env=env)) as server:
        assert _largest_accepted(server, [250, 300, 301]) == 300
        assert _admitted(server, release, 4) == 3


# -- a bad fnserve.toml --------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "key"), [
    ('[server]\nconcurrency = "lots"\n', "concurrency"),
    ("[server]\ncolour = 1\n", "colour"),
    ('[functions.hello]\ntimeout = "soon"\n', "timeout"),
    ("[functions.hello]\nflavour = 1\n", "flavour"),
    ("[server\n", None),
], ids=["bad-value", "unknown-server-key", "bad-function-value", "unknown-function-key",
        "not-toml"])
def test_invalid_fnserve_toml_exits_2_with_one_line(hello_dir: Path, toml: str,
                                                    key: str | None) -> None:
    write_toml(hello_dir, toml)
    port = free_port()
    result = fnserve_cli("serve", str(hello_dir), "--port", str(port), env=os.environ,
                         cwd=REPO, timeout=30)
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    assert str(hello_dir / "fnserve.toml") in lines[0]
    if key is not None:
        assert key in lines[0]
    assert "Traceback" not in result.stderr.decode()
    # and nothing was left listening
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_bad_toml_value_is_an_error_even_when_a_flag_overrides_it(hello_dir: Path) -> None:
    """A bad value in the file is an error even when a flag overrides it (SPEC §1)."""
    write_toml(hello_dir, '[server]\nmax-body = "huge"\n')
    result = fnserve_cli("serve", str(hello_dir), "--port", str(free_port()),
                         "--max-body", "1KB", env=os.environ, cwd=REPO, timeout=30)
    assert result.returncode == 2
    assert "max-body" in result.stderr.decode()

