"""Hostile HTTP: what a client can send to FnServe, and that nothing gets in or breaks.

One server (module scope) with an API key serves every test; each test leaves it
as it found it and ends by checking it still answers. Raw sockets are used where
an HTTP library would clean the request up before sending it.
docs/reliability.md sums the results up, with what FnServe does *not* withstand.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.helpers import wait_until, write_function
from tests.live import LiveServer, raw_request, running, the_worker

KEY = "k-hostile-0123456789abcdef0123456789"
AUTH = {"X-API-Key": KEY}
MAX_BODY = 64 * 1024
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@dataclass
class Hostile:
    server: LiveServer
    markers: Path  # a file appears here if any function that must not run ran

    def ran(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def assert_serving(self) -> None:
        assert requests.get(self.server.url("/healthz"), timeout=10).status_code == 200
        response = requests.post(self.server.url("/function/ok"), headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        assert response.text == "ok\n"


def _marker_script(markers: Path, name: str) -> str:
    return f"open({str(markers / name)!r}, 'w').close()\nprint('MARKER {name}')\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    directory, markers = root / "functions", root / "markers"
    directory.mkdir()
    markers.mkdir()
    write_function(directory, "ok.py", "print('ok')\n")
    write_function(directory, "hello.py", "print('hello')\n")
    write_function(directory, "echo.py", """
        import hashlib, json, sys
        data = sys.stdin.buffer.read()
        print(json.dumps({"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    """)
    # what a path trick would reach if names were joined onto DIR: none may ever run
    write_function(root, "outside.py", _marker_script(markers, "outside.py"))
    write_function(root, "outside", "#!/bin/sh\ntouch " + str(markers / "outside") + "\n",
                   executable=True)
    write_function(directory, "sub/deep.py", _marker_script(markers, "sub-deep.py"))
    write_function(directory, ".hidden.py", _marker_script(markers, "hidden.py"))
    write_function(directory, "_private.py", _marker_script(markers, "private.py"))
    with running(LiveServer(directory, "--api-key", KEY, "--max-body", str(MAX_BODY),
                            "--concurrency", "8")) as server:
        yield Hostile(server, markers)
        assert server.log_records()  # every line of the whole run parses as JSON


# -- raw HTTP ---------------------------------------------------------------------------


def exchange(server: LiveServer, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection, return everything until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def read_response(sock: socket.socket) -> bytes:
    """One response, read by its Content-Length (not until the server closes)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(head_of(received).get("content-length", "0"))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def request_bytes(path: str = "/function/ok", headers: bytes = b"", body: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: fnserve\r\nX-API-Key: {KEY}\r\n".encode()
            + headers + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def head_of(response: bytes) -> dict[str, str]:
    lines = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


# -- names ------------------------------------------------------------------------------

HOSTILE_PATHS = [
    "/function/..", "/function/../outside", "/function/..%2foutside", "/function/..%2Foutside",
    "/function/%2e%2e/outside", "/function/%2e%2e%2foutside", "/function/.%2e/outside",
    "/function/%252e%252e%252foutside", "/function/ok%2f..%2f..%2foutside",
    "/function/ok/../../outside", "/function//etc/passwd", "/function/%2fetc%2fpasswd",
    "/function/sub/deep", "/function/sub%2fdeep", "/function/.hidden", "/function/_private",
    "/function/ok%00", "/function/ok%00.py", "/function/%00", "/function/ok.py",
    "/function/ok/", "/function/OK",
    "/function/h%D0%B5llo",  # hello with a Cyrillic ie (U+0435)
    "/function/%EF%BD%88%EF%BD%85%EF%BD%8C%EF%BD%8C%EF%BD%8F",  # hello in fullwidth letters
    "/function/hello%E2%80%8B",  # zero-width space
    "/function/he%CC%81llo",  # combining accent
    "/function/" + "a" * 300, "/function/" + "o" * 65, "/function/ok%0d%0aX-Evil:%201",
    "/function/ok;id", "/function/$(id)", "/function/~root",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=lambda p: p.removeprefix("/function/")[:24])
def test_hostile_names_are_404_and_nothing_outside_runs(hostile: Hostile, path: str) -> None:
    status, headers, content = raw_request(hostile.server, "POST", path, body=b"{}",
                                           headers=AUTH)
    assert status == 404, (path, content[:200])
    assert headers["content-type"] == "application/json"
    body = json.loads(content)
    assert body["code"] == "not_found"
    assert "MARKER" not in content.decode("utf-8", "replace")
    assert hostile.ran() == []


def test_the_look_alikes_are_not_their_ascii_twin(hostile: Hostile) -> None:
    real = requests.post(hostile.server.url("/function/hello"), headers=AUTH, timeout=10)
    assert real.status_code == 200 and real.text == "hello\n"
    for twin in ("hеllo", "ｈｅｌｌｏ", "hello\u200b", "HELLO"):
        response = requests.post(hostile.server.url(f"/function/{twin}"), headers=AUTH,
                                 timeout=10)
        assert response.status_code == 404, twin
    hostile.assert_serving()


# -- X-Request-Id -----------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b"X-Request-Id: abc\rSet-Cookie: evil=1\r\n",  # bare CR
    b"X-Request-Id: abc\nSet-Cookie: evil=1\r\n",  # bare LF
    b"X-Request-Id: abc\r\n Set-Cookie: evil=1\r\n",  # obsolete line folding
    b"X-Request-Id: abc\x00Set-Cookie: evil=1\r\n",  # NUL
], ids=["CR", "LF", "fold", "NUL"])
def test_request_id_with_control_characters_is_refused(hostile: Hostile, header: bytes) -> None:
    response = exchange(hostile.server, request_bytes(headers=header))
    # gunicorn refuses the request outright; nothing of it is echoed into a header
    assert 400 <= status_of(response) < 500
    head = response.split(b"\r\n\r\n", 1)[0]
    assert b"evil" not in head.lower()
    assert b"set-cookie" not in head.lower()
    hostile.assert_serving()


@pytest.mark.parametrize("value", [
    "a" * 129, "a" * 8000, "abc def", "<script>alert(1)</script>", "id;rm -rf /", "ïd",
], ids=["129", "8000", "space", "html", "shell", "latin1"])
def test_request_id_outside_the_pattern_is_replaced(hostile: Hostile, value: str) -> None:
    raw = value.encode("latin-1")
    response = exchange(hostile.server, request_bytes(headers=b"X-Request-Id: " + raw + b"\r\n"))
    assert status_of(response) == 200
    request_id = head_of(response)["x-request-id"]
    assert UUID4.fullmatch(request_id), request_id
    assert raw not in response


def test_request_id_of_10kb_is_refused_by_the_header_limit(hostile: Hostile) -> None:
    response = exchange(hostile.server,
                        request_bytes(headers=b"X-Request-Id: " + b"a" * 10240 + b"\r\n"))
    assert status_of(response) == 431  # gunicorn's limit_request_field_size (8190)
    assert b"a" * 200 not in response
    hostile.assert_serving()


# -- header floods ----------------------------------------------------------------------


def test_more_headers_than_the_limit_is_4xx(hostile: Hostile) -> None:
    flood = b"".join(b"X-Flood-%d: v\r\n" % i for i in range(150))  # limit_request_fields: 100
    for _ in range(20):
        assert status_of(exchange(hostile.server, request_bytes(headers=flood))) == 431
    hostile.assert_serving()


def test_a_64kb_header_is_4xx(hostile: Hostile) -> None:
    response = exchange(hostile.server, request_bytes(headers=b"X-Big: " + b"b" * 65536 + b"\r\n"))
    assert status_of(response) == 431
    hostile.assert_serving()


def test_a_64kb_request_line_is_4xx(hostile: Hostile) -> None:
    response = exchange(hostile.server, request_bytes(path="/function/ok?" + "q" * 65536))
    assert 400 <= status_of(response) < 500  # limit_request_line (4094)
    hostile.assert_serving()


# -- bodies -----------------------------------------------------------------------------


def test_body_longer_than_its_content_length(hostile: Hostile) -> None:
    """Only Content-Length bytes reach the function; the rest is read as a next request."""
    declared = b"hello"
    extra = b"GARBAGE THAT IS NOT HTTP\r\n\r\n" + b"z" * 5000
    data = (f"POST /function/echo HTTP/1.1\r\nHost: fnserve\r\nX-API-Key: {KEY}\r\n"
            f"Content-Length: {len(declared)}\r\n\r\n").encode() + declared + extra
    response = exchange(hostile.server, data)
    first, _, rest = response.partition(b"HTTP/1.1 400")
    assert status_of(first) == 200
    body = json.loads(first.split(b"\r\n\r\n", 1)[1])
    assert body == {"len": 5, "sha256": hashlib.sha256(declared).hexdigest()}
    assert rest, "the extra bytes were answered as a malformed second request"
    hostile.assert_serving()


def test_endless_chunked_body_is_413_without_reading_it_all(hostile: Hostile) -> None:
    with socket.create_connection(("127.0.0.1", hostile.server.port), timeout=10) as sock:
        sock.sendall(f"POST /function/echo HTTP/1.1\r\nHost: fnserve\r\nX-API-Key: {KEY}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        stop = threading.Event()
        sent = [0]

        def send_forever() -> None:
            chunk = b"4000\r\n" + b"c" * 0x4000 + b"\r\n"
            try:
                while not stop.is_set() and sent[0] < 64 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent[0] += 0x4000
            except OSError:
                pass  # the server closed on us: expected

        sender = threading.Thread(target=send_forever, daemon=True)
        sender.start()
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
        stop.set()
        sender.join(10)
    assert status_of(head) == 413
    assert json.loads(body)["code"] == "payload_too_large"
    assert sent[0] < 64 * 1024 * 1024, "the server read the whole endless body"
    hostile.assert_serving()


# -- slow and many clients --------------------------------------------------------------


def test_a_few_slowloris_clients_do_not_block_others(hostile: Hostile) -> None:
    """5 connections send their headers a byte at a time for ~4 s; normal requests pass.

    Each slow connection holds one gunicorn thread while it drips (gthread reads
    headers in a blocking thread). With more slow clients than threads
    (--concurrency + 16) the server is blocked: see docs/reliability.md.
    """
    data = request_bytes(headers=b"X-Padding: " + b"p" * 60 + b"\r\n")
    sockets = [socket.create_connection(("127.0.0.1", hostile.server.port), timeout=30)
               for _ in range(5)]
    stop = threading.Event()
    dripped = [0]  # bytes sent to each slow connection so far

    def drip() -> None:
        for index in range(len(data)):
            if stop.is_set():
                return
            for sock in sockets:
                sock.send(data[index:index + 1])
            dripped[0] = index + 1
            time.sleep(4.0 / len(data))  # the pace of a slow client, not a wait for anything

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # the slow ones are mid-request (a tenth of their headers sent) before ours start
        assert wait_until(lambda: dripped[0] >= len(data) // 10, timeout=10)
        for _ in range(5):
            started = time.monotonic()
            response = requests.post(hostile.server.url("/function/ok"), headers=AUTH,
                                     timeout=10)
            assert response.status_code == 200
            assert time.monotonic() - started < 3.0  # not blocked behind the slow ones
            time.sleep(0.2)
        dripper.join(15)
        assert not dripper.is_alive()
        for sock in sockets:  # and the slow ones get their answer in the end
            assert status_of(read_response(sock)) == 200
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_fds")
def test_a_thousand_connections_at_once(hostile: Hostile) -> None:
    worker = the_worker(hostile.server)
    fds_before = worker.num_fds()
    connections = []
    try:
        for _ in range(1000):
            connections.append(socket.create_connection(("127.0.0.1", hostile.server.port),
                                                        timeout=10))
    finally:
        for sock in connections:
            sock.close()
    assert len(connections) == 1000
    hostile.assert_serving()
    assert wait_until(lambda: worker.num_fds() <= fds_before + 5, timeout=15), \
        f"worker fds: {fds_before} before, {worker.num_fds()} after"


# -- the API key ------------------------------------------------------------------------


def test_two_thousand_wrong_keys_are_all_401(hostile: Hostile) -> None:
    # the previous test may have kept the session's connection idle past the server's
    # 5 s keep-alive: a reuse racing its close is a RemoteDisconnected, not a finding
    hostile.server.session.close()
    before = hostile.server.stats(headers=AUTH)["total_requests"]

    def guess(batch: int) -> list[int]:
        with requests.Session() as session:
            return [session.post(hostile.server.url("/function/ok"), timeout=10,
                                 headers={"X-API-Key": f"guess-{batch}-{n:04d}"}).status_code
                    for n in range(250)]

    with ThreadPoolExecutor(8) as pool:
        statuses = [status for batch in pool.map(guess, range(8)) for status in batch]
    assert len(statuses) == 2000
    assert set(statuses) == {401}
    # refused before admission: not counted, nothing ran
    assert hostile.server.stats(headers=AUTH)["total_requests"] == before
    hostile.assert_serving()


def test_the_key_is_compared_with_compare_digest_on_equal_length_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time is a property of the code, not something a benchmark over HTTP can
    show: every check of a key goes through hmac.compare_digest with two byte strings
    of the same length (compare_digest returns at once on different lengths)."""
    import hmac

    from fnserve import credentials
    from fnserve.app import create_app
    from fnserve.config import load_config

    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(credentials.hmac, "compare_digest", recording)
    directory = Path(__file__).parent.parent / "samples"
    app = create_app(load_config(directory, {"api_key": KEY}, {}))
    client = app.test_client()
    guesses = ["", "k", "X" + KEY[1:], KEY[:-1] + "X", KEY + "longer", "é" * 40, KEY]
    statuses = [client.get("/stats", headers={"X-API-Key": guess}).status_code
                for guess in guesses]
    statuses.append(client.get("/stats", headers={"Authorization": "Bearer nope"}).status_code)
    assert statuses == [401] * 6 + [200, 401]
    assert len(calls) == len(guesses) + 1  # the empty key too: no shortcut before it
    for a, b in calls:
        assert isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b)
