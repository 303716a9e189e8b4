"""The history over HTTP (SPEC §10) on a real `fnserve serve`: recording, /invocations,
replay, secrets, --history off, restarts, two servers on one file, the dashboard's
sign-in and CSRF rules."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import requests

from fnserve.history import BODY_LIMIT

from .helpers import wait_until, write_function
from .live import LiveServer, running

SHOW = """
    import json, os, sys
    context = json.loads(os.environ["FN_CONTEXT"])
    event = sys.stdin.read()
    sys.stderr.write("env seen: " + json.dumps(context["env"]) + "\\n")
    print(json.dumps({"event": event, "params": context["parameters"], "env": context["env"],
                      "request_id": context["request_id"]}))
"""
FAIL = "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)\n"
KEY = "server-key-0123456789"


def serve(fn_dir: Path, history: Path | str, *args: str, **kwargs: Any) -> LiveServer:
    return LiveServer(fn_dir, "--history", str(history), *args, **kwargs)


def records(server: LiveServer, count: int, query: str = "", **kwargs: Any) -> list[Any]:
    """The newest records once there are `count` (the writer is asynchronous)."""
    def fetch() -> list[Any]:
        found: list[Any] = server.get(f"/invocations?limit=1000{query}",
                                      **kwargs).json()["invocations"]
        return found if len(found) >= count else []

    found = wait_until(fetch, timeout=10)
    assert len(found) == count, found
    return found


def test_record_list_show_and_replay(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    write_function(fn_dir, "fail.py", FAIL)
    with running(serve(fn_dir, tmp_path / "h.sqlite3")) as server:
        first = server.post("/function/show?name=Ada&x=1", data=b'{"n": 1}',
                            headers={"Content-Type": "application/json",
                                     "X-Request-Id": "first-call",
                                     "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
        assert first.status_code == 200
        assert server.post("/function/fail").status_code == 502
        newest, oldest = records(server, 2)
        assert newest["function"] == "fail" and newest["outcome"] == "failed"
        assert newest["status"] == 502 and newest["exit_code"] == 3
        assert newest["stderr"] == "boom\n"
        assert oldest["request_id"] == "first-call" and oldest["source"] == "http"
        assert oldest["request"] == '{"n": 1}' and oldest["parameters"] == {"name": "Ada", "x": "1"}
        assert oldest["response"] == first.text and oldest["trace_id"] == "ab" * 16
        assert oldest["status"] == 200 and oldest["outcome"] == "ok"
        assert oldest["functions_dir"] == str(fn_dir.resolve())
        assert oldest["duration_ms"] > 0 and oldest["started_at"].endswith("Z")
        assert server.get("/invocations/first-call").json() == oldest
        assert server.get("/invocations?function=fail").json()["invocations"] == [newest]
        assert server.get("/invocations?outcome=ok").json()["invocations"] == [oldest]
        page = server.get("/invocations?limit=1").json()
        assert page["next"] == newest["request_id"]
        assert server.get(f"/invocations?limit=1&before={page['next']}").json() == {
            "invocations": [oldest], "next": None}

        again = server.post("/invocations/first-call/replay")
        assert again.status_code == 200
        body = again.json()
        assert body["event"] == '{"n": 1}' and body["params"] == {"name": "Ada", "x": "1"}
        assert body["request_id"] == again.headers["X-Request-Id"] != "first-call"
        assert again.headers["traceparent"].startswith("00-")
        assert float(again.headers["X-Duration-Seconds"]) > 0
        replayed = records(server, 3)[0]
        assert replayed["source"] == "replay" and replayed["replay_of"] == "first-call"
        assert replayed["request_id"] == body["request_id"]
        failed_again = server.post(f"/invocations/{newest['request_id']}/replay")
        assert failed_again.status_code == 502 and failed_again.json()["exit_code"] == 3

        assert server.get("/invocations/nope").json()["code"] == "not_found"
        assert server.post("/invocations/nope/replay").status_code == 404
        assert server.get("/invocations?limit=0").json()["code"] == "bad_request"
        assert server.get("/invocations?limit=x").status_code == 400
        metrics = server.get("/metrics").text
        assert "fnserve_history_dropped_total 0.0" in metrics


def test_forty_from_eight_threads_then_restart(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    path = tmp_path / "h.sqlite3"
    with running(serve(fn_dir, path)) as server:
        def call(thread: int) -> None:
            with requests.Session() as session:
                for i in range(5):
                    response = session.post(server.url(f"/function/show?i={thread}-{i}"),
                                            timeout=60)
                    assert response.status_code == 200

        threads = [threading.Thread(target=call, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        before = records(server, 40)
    with running(serve(fn_dir, path)) as server:  # a new server: the same 40
        after = records(server, 40)
        assert after == before
        assert sorted(r["parameters"]["i"] for r in after) == sorted(
            f"{t}-{i}" for t in range(8) for i in range(5))


def test_secrets_never_reach_the_file(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    path = tmp_path / "h.sqlite3"
    bearer = "bearer-token-5678"
    signature = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
    with running(serve(fn_dir, path, "--api-key", KEY,
                       "--forward-header", "X-Other")) as server:
        for headers in (
            {"X-API-Key": KEY, "Authorization": f"Bearer {bearer}"},
            {"Authorization": f"Bearer {KEY}", "X-Other": "visible"},
            {"X-API-Key": KEY, "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"
             "20261201/local/lambda/aws4_request, SignedHeaders=host;x-amz-date, "
             f"Signature={signature}"},
        ):
            # the event names this request's own credentials too
            response = server.post("/function/show", headers=headers,
                                   data=json.dumps({"echo": list(headers.values())}))
            assert response.status_code == 200, response.text
        stored = records(server, 3, headers={"X-API-Key": KEY})
        assert any("visible" in r["response"] for r in stored)  # not everything is hidden
        assert any("[redacted]" in r["response"] for r in stored)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("h.sqlite3"))
    assert b"visible" in raw
    for secret in (KEY, bearer, signature):
        assert secret.encode() not in raw, secret


def test_history_off_writes_nothing(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    data_home = tmp_path / "data"
    env = {"XDG_DATA_HOME": str(data_home), "HOME": str(tmp_path / "home")}
    with running(LiveServer(fn_dir, "--history", "off",
                            env={**_base_env(), **env})) as server:
        assert server.post("/function/show").status_code == 200
        off = server.get("/invocations")
        assert off.status_code == 404 and "history is off" in off.json()["error"]
        assert server.post("/invocations/x/replay").status_code == 404
        page = server.get("/")
        assert page.status_code == 200 and "Functions" in page.text
        state = server.get("/dashboard/api/state").json()
        assert state["figures_from"] == "stats" and state["invocations"] == []
        assert state["functions"][0]["figures"]["invocations"] == 1
    assert not data_home.exists() and not (tmp_path / "home").exists()
    assert not list(tmp_path.rglob("*.sqlite3*"))


def test_default_file_is_under_xdg_data_home(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    env = {**_base_env(), "XDG_DATA_HOME": str(tmp_path / "data")}
    with running(LiveServer(fn_dir, env=env)) as server:
        assert server.post("/function/show").status_code == 200
        records(server, 1)
    assert (tmp_path / "data" / "fnserve" / "history.sqlite3").is_file()


def test_retention_and_truncation(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    with running(serve(fn_dir, tmp_path / "h.sqlite3", "--history-max", "5")) as server:
        big = b'{"blob": "' + b"x" * BODY_LIMIT + b'"}'
        assert server.post("/function/show", data=big).status_code == 200
        big_record = records(server, 1)[0]
        assert big_record["request_truncated"] and big_record["response_truncated"]
        assert len(big_record["request"]) == BODY_LIMIT
        refused = server.post(f"/invocations/{big_record['request_id']}/replay")
        assert refused.status_code == 409 and refused.json()["code"] == "not_replayable"
        for i in range(7):
            assert server.post(f"/function/show?i={i}").status_code == 200
        kept = wait_until(lambda: [r["parameters"].get("i") for r in
                                   server.get("/invocations").json()["invocations"]]
                          == ["6", "5", "4", "3", "2"], timeout=10)
        assert kept, server.get("/invocations").json()


def test_two_servers_one_file(fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "noop", "#!/bin/sh\nexit 0\n", executable=True)
    path = tmp_path / "h.sqlite3"
    with running(serve(fn_dir, path)) as one, running(serve(fn_dir, path)) as two:
        def hammer(server: LiveServer) -> None:
            with requests.Session() as session:
                for _ in range(100):
                    assert session.post(server.url("/function/noop"), timeout=60).ok

        threads = [threading.Thread(target=hammer, args=(s,)) for s in (one, two, one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records(one, 400)
        for server in (one, two):
            assert "fnserve_history_dropped_total 0.0" in server.get("/metrics").text
            assert "locked" not in server.stderr()


def test_several_gunicorn_workers_one_file(fn_dir: Path, tmp_path: Path) -> None:
    import sys

    write_function(fn_dir, "noop", "#!/bin/sh\nexit 0\n", executable=True)
    path = tmp_path / "h.sqlite3"
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    command = [gunicorn, "-c", "conf/gunicorn.conf.py", "--workers", "3", "fnserve.wsgi:app"]
    env = {**_base_env(), "FNSERVE_HISTORY": str(path)}
    with running(LiveServer(fn_dir, command=command, env=env)) as server:
        assert wait_until(lambda: len(server.workers()) == 3, timeout=30)

        def hammer() -> None:
            for _ in range(60):  # a new connection each: spread over the workers
                assert requests.post(server.url("/function/noop"), timeout=60,
                                     headers={"Connection": "close"}).ok

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = records(server, 240, headers={"Connection": "close"})
        assert len({r["request_id"] for r in stored}) == 240
        assert "locked" not in server.stderr()


def test_api_needs_the_key_and_the_cookie_opens_only_the_dashboard(
        fn_dir: Path, tmp_path: Path) -> None:
    write_function(fn_dir, "show.py", SHOW)
    with running(serve(fn_dir, tmp_path / "h.sqlite3", "--api-key", KEY)) as server:
        key = {"X-API-Key": KEY}
        assert server.post("/function/show", headers=key).status_code == 200
        rid = records(server, 1, headers=key)[0]["request_id"]
        assert server.get("/invocations").status_code == 401
        assert server.get(f"/invocations/{rid}").status_code == 401
        assert server.post(f"/invocations/{rid}/replay").status_code == 401
        assert server.post(f"/invocations/{rid}/replay", headers=key).status_code == 200
        login_page = server.get("/")
        assert 'id="login-form"' in login_page.text
        assert "frame-ancestors 'none'" in login_page.headers["Content-Security-Policy"]
        assert server.get("/dashboard/api/state").status_code == 401

        browser = requests.Session()
        wrong = browser.post(server.url("/dashboard/login"), data={"key": "nope"})
        assert wrong.status_code == 401 and not browser.cookies
        signed_in = browser.post(server.url("/dashboard/login"), data={"key": KEY})
        assert signed_in.status_code == 200 and 'name="csrf-token"' in signed_in.text
        cookie = signed_in.history[0].headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        token = signed_in.text.split('name="csrf-token" content="')[1].split('"')[0]
        assert browser.get(server.url("/dashboard/api/state")).status_code == 200
        # the cookie opens the dashboard's routes only
        assert browser.get(server.url("/invocations")).status_code == 401
        assert browser.post(server.url("/function/show")).status_code == 401
        # state-changing requests need the page's token, from this site
        invoke = server.url("/dashboard/api/invoke/show")
        form = {"event": '{"a": 1}', "parameters": {"p": "q"}}
        assert browser.post(invoke, json=form).status_code == 403
        assert browser.post(invoke, json=form, headers={"X-CSRF-Token": "forged"}
                            ).status_code == 403
        assert browser.post(invoke, json=form, headers={
            "X-CSRF-Token": token, "Origin": "http://evil.example"}).status_code == 403
        assert browser.post(invoke, json=form, headers={
            "X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        answer = browser.post(invoke, json=form, headers={
            "X-CSRF-Token": token, "Origin": server.base}).json()
        assert answer["status"] == 200
        assert json.loads(answer["body"])["params"] == {"p": "q"}
        replay = browser.post(server.url(f"/dashboard/api/replay/{rid}"),
                              headers={"X-CSRF-Token": token}).json()
        assert replay["status"] == 200 and replay["request_id"] != rid
        bad = browser.post(invoke, json={"event": "{not json"},
                           headers={"X-CSRF-Token": token})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_json"
        # a cookie made with another key is no session
        other = requests.Session()
        other.cookies.set("fnserve_dashboard", "00." + "0" * 64)
        assert other.get(server.url("/dashboard/api/state")).status_code == 401
        browser.close()
        other.close()


def _base_env() -> dict[str, str]:
    import os

    return {key: os.environ[key] for key in ("PATH", "LANG", "XDG_CACHE_HOME", "GOCACHE")
            if key in os.environ}
