"""Security defaults, and an honest account of what isolation there is between functions.

Covered elsewhere and not repeated here:
- binds 127.0.0.1 unless told otherwise: test_http_context.py::test_default_bind_is_loopback_only
- a JSON WARNING when bound to 0.0.0.0 without --api-key (and none with one):
  test_http_lifecycle.py::test_public_bind_without_api_key_warns_loudly / ..._does_not_warn
- the function environment built from scratch (--pass-env, no server secret):
  test_http_context.py::test_environment_is_built_from_scratch
- 401 on every route but /healthz and /openapi.json: test_http_errors.py

Here: no server secret and no server file descriptor reaches a function; stderr
never reaches a client in serve mode, whatever the failure; the API key is never
logged; and what one function can see of another running at the same time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import read_pid, wait_until, write_function, write_toml
from tests.live import LiveServer, running

KEY = "k-security-5f1d2c3b4a"
SECRET = "server-secret-value-7c1e"
AUTH = {"X-API-Key": KEY}
STDERR_MARK = "STDERR-MARK-d41d8cd9"


def _functions(directory: Path) -> None:
    write_function(directory, "look.py", """
        import json, os, sys
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        print(json.dumps({"environ": dict(os.environ), "fds": fds,
                          "proc_environ": open("/proc/self/environ", "rb").read().decode()}))
    """)
    for name, tail in {
        "fails": "sys.exit(3)",
        "signalled": "os.kill(os.getpid(), signal.SIGSEGV)",
        "times_out": "time.sleep(30)",
        "too_much": "sys.stdout.write('x' * 300000); sys.stdout.flush()",
        "succeeds": "print('fine')",
    }.items():
        write_function(directory, f"{name}.py", f"""
            import os, signal, sys, time
            sys.stderr.write("{STDERR_MARK} {name} " + os.environ["FN_REQUEST_ID"] + "\\\\n")
            sys.stderr.flush()
            {tail}
        """)
    # waits until the test lets it go, so that two invocations overlap
    write_function(directory, "peek.py", """
        import json, os, sys, time
        ctx = json.loads(os.environ["FN_CONTEXT"])
        me = ctx["parameters"]["me"]
        with open(f"{me}.pid", "w") as handle:
            handle.write(f"{os.getpid()}\\n")
        other = ctx["parameters"]["other"]
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{other}.pid") and time.monotonic() < deadline:
            time.sleep(0.01)
        other_pid = int(open(f"{other}.pid").read())
        try:
            stolen = open(f"/proc/{other_pid}/environ", "rb").read().decode()
        except OSError as exc:
            stolen = f"unreadable: {exc.strerror}"
        open(f"{me}.looked", "w").close()  # tells the test it may let both go
        while not os.path.exists(f"{me}.go") and time.monotonic() < deadline:
            time.sleep(0.01)  # stay alive until the other one has looked at us
        print(json.dumps({"context": ctx, "api_key": os.environ.get("HTTP_X_API_KEY"),
                          "stolen": stolen}))
    """)
    write_function(directory, "parent.py", """
        import json, os
        try:
            text = open(f"/proc/{os.getppid()}/environ", "rb").read().decode()
        except OSError as exc:
            text = f"unreadable: {exc.strerror}"
        print(json.dumps({"parent_environ": text}))
    """)
    write_toml(directory, """
        [functions.times_out]
        timeout = "300ms"
    """)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory = tmp_path_factory.mktemp("security-functions")
    _functions(directory)
    env = dict(os.environ, SECRET_TOKEN=SECRET, FNSERVE_API_KEY=KEY)
    with running(LiveServer(directory, "--max-output", "64KB", env=env)) as live:
        yield live


def test_no_server_secret_or_descriptor_reaches_a_function(server: LiveServer) -> None:
    response = server.post("/function/look", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    seen = response.json()
    environ = seen["environ"]
    assert SECRET not in json.dumps(seen)
    assert not [name for name in environ if name.startswith("FNSERVE_")]
    assert environ == dict(item.split("=", 1) for item in seen["proc_environ"].split("\0")
                           if item)
    # 0, 1, 2 and the one os.listdir opened: not the listening socket, not a client's
    # connection, not another invocation's pipes
    assert len(seen["fds"]) == 4 and seen["fds"][:3] == [0, 1, 2], seen["fds"]
    # Nor the header that carried the server's own key (SPEC §2): it is FnServe's
    assert "HTTP_AUTHORIZATION" not in environ
    assert KEY not in json.dumps(seen)


@pytest.mark.parametrize(("name", "status"), [
    ("fails", 502), ("signalled", 502), ("times_out", 504), ("too_much", 502),
    ("succeeds", 200),
])
def test_stderr_never_reaches_a_client_in_serve_mode(server: LiveServer, name: str,
                                                     status: int) -> None:
    response = server.post(f"/function/{name}", headers=AUTH)
    assert response.status_code == status, response.text
    assert STDERR_MARK.encode() not in response.content
    assert STDERR_MARK not in json.dumps(dict(response.headers))
    if status != 200:
        assert "stderr" not in response.json()
    request_id = response.headers["X-Request-Id"]

    def logged() -> bool:  # it went to the logs instead, with the request id
        return any(r.get("request_id") == request_id and r.get("stream") == "stderr"
                   and str(r["message"]).startswith(STDERR_MARK)
                   for r in server.log_records())

    assert wait_until(logged, timeout=5)


def test_the_api_key_is_never_logged(server: LiveServer) -> None:
    for headers in (AUTH, {"X-API-Key": KEY[:-1] + "X"}, {"Authorization": f"Bearer {KEY}"},
                    {}):
        server.post("/function/succeeds", headers=headers)
        server.get("/stats", headers=headers)
    assert KEY not in server.stderr()
    assert server.stdout() == ""  # serve mode prints nothing on stdout at all


def test_what_a_function_sees_of_another_running_at_once(server: LiveServer,
                                                         tmp_path: Path) -> None:
    """Each invocation's own context is its own; the kernel does not hide the other one.

    What holds: FN_CONTEXT and the forwarded headers of one invocation are in its
    own environment only; nothing in FnServe hands them to another function.
    What does not: every function runs as the server's user, so a function can
    read /proc/<pid>/environ of another one running at the same time (its
    FN_CONTEXT, forwarded API keys and tokens included). FnServe has no user,
    PID namespace or seccomp separation; docs/reliability.md says what to do.
    """
    a, b = tmp_path / "a", tmp_path / "b"

    def call(me: Path, other: Path, key: str) -> requests.Response:
        return requests.post(server.url("/function/peek"), params={"me": str(me),
                             "other": str(other)}, headers={"X-API-Key": key}, timeout=30)

    results: dict[str, Any] = {}
    # both need the server's key to get in, so each request carries the same one; the
    # per-invocation secret we look for is the request id (and the whole context)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, a, b, KEY)
        second = pool.submit(call, b, a, KEY)
        read_pid(Path(f"{a}.pid"))
        read_pid(Path(f"{b}.pid"))
        # handshake: both have read the other's environment while the other still ran
        assert wait_until(lambda: Path(f"{a}.looked").exists() and Path(f"{b}.looked").exists(),
                          timeout=20)
        Path(f"{a}.go").touch()
        Path(f"{b}.go").touch()
        results["a"], results["b"] = first.result().json(), second.result().json()
    for me, other in (("a", "b"), ("b", "a")):
        mine, theirs = results[me], results[other]
        assert mine["context"]["request_id"] != theirs["context"]["request_id"]
        assert mine["context"]["parameters"]["me"].endswith(f"/{me}")
        # the honest part: same uid, so the other's environment was readable
        assert f'"request_id":"{theirs["context"]["request_id"]}"' in mine["stolen"], \
            "a function could not read another's /proc/PID/environ: update reliability.md"


def test_a_function_can_read_the_servers_own_environment(server: LiveServer) -> None:
    """What does not hold: FnServe builds the function's environment from scratch, but
    the function runs as the server's user, and /proc/<its parent>/environ is the
    worker's environment, secrets and FNSERVE_API_KEY included. Give FnServe's
    user no secret it does not need, or run functions as another user (a
    container, systemd DynamicUser): see docs/reliability.md."""
    response = server.post("/function/parent", headers=AUTH)
    assert response.status_code == 200, response.text
    parent_environ = response.json()["parent_environ"]
    assert f"SECRET_TOKEN={SECRET}" in parent_environ, \
        "the server's environment is no longer readable: update reliability.md"
    assert f"FNSERVE_API_KEY={KEY}" in parent_environ
