"""The gunicorn internals FnServe relies on (fnserve/gunicorn_internals.py), pinned.

setup.cfg allows gunicorn >=25.1,<28 and CI installs the newest of those: when a
release changes one of these internals, this file fails and names it. The
behaviour built on them is tested end to end elsewhere (test_dev.py: reloads with a
request in flight, Ctrl-C; test_http_lifecycle.py: SIGINT drains, disconnects).
"""

from __future__ import annotations

import configparser
import inspect
import socket
from pathlib import Path

import gunicorn
import pytest
from gunicorn.arbiter import Arbiter
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.base import Worker

from fnserve.gunicorn_internals import (
    SUPPORTED,
    DevArbiter,
    client_socket,
    master_children,
    on_stop,
    worker_alive,
)

REPO = Path(__file__).resolve().parent.parent


def _version() -> tuple[int, ...]:
    return tuple(int(part) for part in gunicorn.__version__.split(".")[:2])


def test_the_installed_gunicorn_is_a_supported_one() -> None:
    lowest, unsupported = SUPPORTED
    assert lowest <= _version() < unsupported, gunicorn.__version__


def test_setup_cfg_allows_exactly_the_supported_versions() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = setup["options"]["install_requires"].split()
    lowest, unsupported = SUPPORTED
    expected = (f"gunicorn>={lowest[0]}.{lowest[1]},<{unsupported[0]}"
                if unsupported[1] == 0 else f"gunicorn>={lowest[0]}.{lowest[1]},"
                f"<{unsupported[0]}.{unsupported[1]}")
    assert expected in requirements


def test_reload_waits_for_old_workers_by_calling_reap_workers() -> None:
    """DevArbiter leaves reload()'s wait by raising out of reap_workers()."""
    source = inspect.getsource(Arbiter.reload)
    wait = source[source.index("spawn_worker"):]
    assert "while" in wait and "self.reap_workers()" in wait


def test_dev_arbiter_leaves_the_reload_wait_at_its_first_reap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Arbiter.reload on a bare DevArbiter whose old worker never exits:
    it returns at the first reap_workers() instead of after graceful_timeout."""
    steps: list[str] = []

    class Old:
        age = 0

    arbiter = DevArbiter.__new__(DevArbiter)
    arbiter.WORKERS = {1: Old()}
    arbiter.worker_age = 0

    def record(name: str) -> object:
        return lambda *args, **kwargs: steps.append(name)

    for name in ("spawn_worker", "manage_workers"):
        setattr(arbiter, name, record(name))
    arbiter._stats = {"reloads": 0}

    class Config:
        env: dict[str, str] = {}
        env_orig: dict[str, str] = {}
        address = ["127.0.0.1:0"]
        workers = 1
        graceful_timeout = 3600
        pidfile = None

        def on_reload(self, _arbiter: object) -> None:
            steps.append("on_reload")

    class App:
        def reload(self) -> None:
            steps.append("app.reload")

    class Log:
        def reopen_files(self) -> None:
            pass

    arbiter.cfg = Config()
    arbiter.app = App()
    arbiter.log = Log()
    arbiter.pidfile = None
    arbiter.proc_name = "fnserve"
    arbiter.setup = record("setup")
    arbiter.LISTENERS = []

    # the parent's reap_workers would waitpid: this test has no worker processes
    monkeypatch.setattr(Arbiter, "reap_workers", lambda self: steps.append("reap"))
    arbiter.reload()
    assert steps[-3:] == ["spawn_worker", "manage_workers", "reap"]
    assert steps.count("reap") == 1


def test_the_arbiter_looks_signal_handlers_up_by_name() -> None:
    """on_stop replaces handle_term and handle_int on the instance; that works only if
    the signal loop finds the handler with getattr at each signal."""
    source = inspect.getsource(Arbiter)
    assert 'getattr(self, "handle_%s" % signame' in source
    assert callable(Arbiter.handle_int) and callable(Arbiter.handle_term)

    class Bare:
        def handle_term(self) -> str:
            return "term"

        def handle_int(self) -> str:
            return "int"

    arbiter = Bare()
    stopping: list[bool] = []
    on_stop(arbiter, lambda: stopping.append(True), sigint_too=True)
    arbiter.handle_int()
    arbiter.handle_term()
    assert stopping == [True, True]


def test_workers_have_an_alive_flag_cleared_on_exit() -> None:
    init = inspect.getsource(Worker.__init__)
    assert "self.alive = True" in init
    assert "self.alive = False" in inspect.getsource(Worker.handle_exit)

    class Stub:
        alive = False

    assert worker_alive(Stub()) is False


def test_the_wsgi_environ_carries_the_client_socket() -> None:
    assert '"gunicorn.socket": sock' in inspect.getsource(gunicorn_wsgi)
    left, right = socket.socketpair()
    with left, right:
        assert client_socket({"gunicorn.socket": left}) is left
    assert client_socket({}) is None


def test_the_master_knows_the_children_it_started() -> None:
    """child_exit kills the master's other children: it must know its own."""
    for name in ("WORKERS", "reexec_pid", "dirty_arbiter_pid"):
        assert name in inspect.getsource(Arbiter.__init__) + inspect.getsource(Arbiter)
    arbiter = Arbiter.__new__(Arbiter)
    arbiter.WORKERS = {11: object(), 12: object()}
    arbiter.reexec_pid = 0
    arbiter.dirty_arbiter_pid = 13
    assert master_children(arbiter) == {11, 12, 13}
