"""Every use FnServe makes of gunicorn beyond its documented API, in one place.

Each is pinned by tests/test_gunicorn_contract.py for the gunicorn versions setup.cfg
allows (>=25.1,<28): a gunicorn release that changes one fails that test by name,
rather than dev reload or the drain quietly misbehaving.

- DevArbiter relies on Arbiter.reload() calling reap_workers() inside its wait for
  the old workers, to get back to the signal loop at once.
- on_stop() relies on the arbiter looking its handlers up by name
  (getattr(self, "handle_" + signame)) at each signal.
- worker_alive() reads Worker.alive, which gunicorn clears when the worker is told
  to exit.
- client_socket() reads environ["gunicorn.socket"], the client's socket, which the
  sync and gthread workers put in every WSGI environ.
- master_children() reads the arbiter's WORKERS table and its other children's pids
  (reexec_pid, dirty_arbiter_pid), to tell them from processes it adopted.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any

from gunicorn.arbiter import Arbiter

SUPPORTED = ((25, 1), (28, 0))  # [lowest, first unsupported): setup.cfg says the same


class _BackToTheLoop(Exception):
    pass


class DevArbiter(Arbiter):  # type: ignore[misc]
    """The dev master: back to its signal loop as soon as a reload has started the new worker.

    gunicorn >= 25 waits in reload() for the old workers to exit: with a slow request
    in flight that is up to graceful_timeout, during which the master handles no
    signal: neither Ctrl-C nor the HUP of the next save. The old worker drains on its
    own and ignores the repeated SIGTERM that manage_workers sends it meanwhile, so
    the wait buys nothing here. reap_workers() is the one call inside that wait.
    """

    _reloading = False

    def reload(self) -> None:
        self._reloading = True
        try:
            super().reload()
        except _BackToTheLoop:
            pass
        finally:
            self._reloading = False

    def reap_workers(self) -> None:
        super().reap_workers()
        if self._reloading:
            raise _BackToTheLoop


def on_stop(arbiter: Any, before: Callable[[], None], *, sigint_too: bool) -> None:
    """Call `before` when the master is told to stop (SIGTERM), then stop as gunicorn does.

    With `sigint_too`, SIGINT does the same (SPEC §4: it drains like SIGTERM), rather
    than gunicorn's own quick stop.
    """
    stop = arbiter.handle_term

    def handle_term() -> None:
        before()
        stop()

    arbiter.handle_term = handle_term
    if sigint_too:
        arbiter.handle_int = handle_term


def worker_alive(worker: Any) -> bool:
    """False once the worker has been told to exit (SIGTERM, SIGQUIT, a reload)."""
    return bool(worker.alive)


def client_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The client's socket under gunicorn; None elsewhere (flask run, a test client)."""
    sock = environ.get("gunicorn.socket")
    return sock if isinstance(sock, socket.socket) else None


def master_children(arbiter: Any) -> set[int]:
    """The pids of the children the gunicorn master started itself (not adopted ones)."""
    pids = set(arbiter.WORKERS)
    for name in ("reexec_pid", "dirty_arbiter_pid"):
        pid = getattr(arbiter, name, 0)
        if pid:
            pids.add(pid)
    return pids
