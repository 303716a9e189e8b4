"""`fnserve history`, `fnserve show`, `fnserve replay` in real subprocesses, on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fnserve.history import HistoryStore, make_record

from .helpers import fnserve_cli, write_function

ECHO = """
    import json, os, sys
    context = json.loads(os.environ["FN_CONTEXT"])
    sys.stderr.write("replayed " + context["request_id"] + "\\n")
    print(json.dumps({"event": json.loads(sys.stdin.read()), "params": context["parameters"]}))
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FNSERVE_HISTORY"] = str(tmp_path / "history.sqlite3")
    return env


def seed(path: Path, fn_dir: Path, n: int = 3, **extra: object) -> HistoryStore:
    store = HistoryStore(path)
    for i in range(n):
        fields: dict[str, object] = dict(
            request_id=f"req-{i}", function="echo", source="http",
            started_at=f"2026-12-01T10:00:0{i}.000000Z", duration_ms=12.5 + i, status=200,
            outcome="ok", request=b'{"n": %d}' % i, response=b'{"ok": true}',
            stderr=b"line on stderr\n", parameters={"name": "Ada"}, trace_id="ab" * 16,
            functions_dir=str(fn_dir))
        fields.update(extra)
        store.insert([make_record(**fields)])  # type: ignore[arg-type]
    return store


def test_history_lists_newest_first(fn_dir: Path, env: dict[str, str]) -> None:
    seed(Path(env["FNSERVE_HISTORY"]), fn_dir)
    done = fnserve_cli("history", "--limit", "2", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["STARTED", "FUNCTION", "SOURCE"]
    assert [line.split()[-1] for line in lines[1:]] == ["req-2", "req-1"]
    as_json = json.loads(fnserve_cli("history", "--json", "--function", "echo",
                                     env=env).stdout)
    assert [r["request_id"] for r in as_json["invocations"]] == ["req-2", "req-1", "req-0"]
    assert as_json["invocations"][0]["parameters"] == {"name": "Ada"}
    assert as_json["next"] is None
    other = fnserve_cli("history", "--function", "nope", env=env)
    assert other.returncode == 0 and b"no invocations recorded" in other.stdout


def test_show_one(fn_dir: Path, env: dict[str, str]) -> None:
    seed(Path(env["FNSERVE_HISTORY"]), fn_dir)
    done = fnserve_cli("show", "req-1", env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "function:    echo" in text and "status:      200" in text
    assert '{"n": 1}' in text and "line on stderr" in text and "ab" * 16 in text
    record = json.loads(fnserve_cli("show", "req-1", "--json", env=env).stdout)
    assert record["request"] == '{"n": 1}' and record["duration_ms"] == 13.5


def test_errors_are_one_line(tmp_path: Path, fn_dir: Path, env: dict[str, str]) -> None:
    missing = fnserve_cli("history", "--history", str(tmp_path / "none.sqlite3"), env=env)
    assert missing.returncode == 2 and missing.stderr.decode().count("\n") == 1
    assert b"no history at" in missing.stderr
    assert not (tmp_path / "none.sqlite3").exists()
    seed(Path(env["FNSERVE_HISTORY"]), fn_dir)
    unknown = fnserve_cli("show", "nope", env=env)
    assert unknown.returncode == 2 and b"no invocation 'nope'" in unknown.stderr
    off = fnserve_cli("history", "--history", "off", env=env)
    assert off.returncode == 2 and b"history is off" in off.stderr
    (tmp_path / "junk").write_bytes(b"junk" * 1000)
    junk = fnserve_cli("history", "--history", str(tmp_path / "junk"), env=env)
    assert junk.returncode == 2 and b"Traceback" not in junk.stderr
    assert b"not a usable history file" in junk.stderr


def test_replay_runs_it_again_in_the_recorded_directory(
        fn_dir: Path, tmp_path: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "echo.py", ECHO)
    store = seed(Path(env["FNSERVE_HISTORY"]), fn_dir, n=1)
    done = fnserve_cli("replay", "req-0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"event": {"n": 0}, "params": {"name": "Ada"}}
    assert done.stderr.startswith(b"replayed ")
    replays, _ = store.list(limit=1)
    replayed = replays[0]
    assert replayed.source == "replay" and replayed.replay_of == "req-0"
    assert replayed.request_id != "req-0"
    assert replayed.response == done.stdout


def test_replay_with_dir_and_exit_status(fn_dir: Path, tmp_path: Path,
                                         env: dict[str, str]) -> None:
    other = tmp_path / "other"
    write_function(other, "echo.py", "import sys; sys.exit(3)")
    seed(Path(env["FNSERVE_HISTORY"]), fn_dir, n=1)
    done = fnserve_cli("replay", "req-0", "--dir", str(other), env=env)
    assert done.returncode == 3
    gone = fnserve_cli("replay", "req-0", env=env)  # fn_dir has no echo
    assert gone.returncode == 2 and b"no function named 'echo'" in gone.stderr


def test_truncated_request_is_not_replayed(fn_dir: Path, env: dict[str, str]) -> None:
    write_function(fn_dir, "echo.py", ECHO)
    seed(Path(env["FNSERVE_HISTORY"]), fn_dir, n=1, request=b"x" * (65 * 1024))
    done = fnserve_cli("replay", "req-0", env=env)
    assert done.returncode == 2 and b"truncated" in done.stderr


def test_serve_refuses_an_unusable_history(fn_dir: Path, tmp_path: Path,
                                          env: dict[str, str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    done = fnserve_cli("serve", str(fn_dir), "--port", "0", "--history",
                       str(tmp_path / "file" / "h.sqlite3"), env=env)
    assert done.returncode == 2
    text = done.stderr.decode()
    assert text.startswith("Error: ") and text.count("\n") == 1 and "history" in text
