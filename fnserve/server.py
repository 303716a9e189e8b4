"""gunicorn, embedded: `fnserve serve` and `fnserve dev` run it in-process.

One gthread worker by default, so the semaphore and the statistics are exact.
Threads exceed the concurrency limit so that the limiter answers 429, rather
than gunicorn quietly queueing the extra requests. Workers build their app after
the fork (preload_app=False), so a SIGHUP gives fresh workers a fresh registry.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import signal
from collections.abc import Mapping
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger

from .app import create_app, get_state
from .config import Config, load_config
from .drain import Drain, mark_server_stopping, server_stopping
from .errors import ConfigError
from .logs import logging_config
from .registry import Registry, load_registry
from .sandbox import check_sandboxes, find_bwrap

log = logging.getLogger("fnserve.server")

SPARE_THREADS = 16  # beyond --concurrency: for 429s, /healthz, /metrics under full load
STOP_LINGER = 2  # seconds a stopping worker may take after the drain (see graceful_timeout)


def gunicorn_settings(config: Config) -> dict[str, Any]:
    """gunicorn settings derived from the one Config (also used by conf/gunicorn.conf.py)."""
    threads = config.concurrency + SPARE_THREADS
    host = f"[{config.host}]" if ":" in config.host else config.host
    return {
        "bind": [f"{host}:{config.port}"],
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "worker_connections": max(1000, threads * 2),
        "backlog": 2048,
        "keepalive": 5,
        # gthread's main loop heartbeats while requests run; this only catches a hung worker
        "timeout": int(config.timeout + config.graceful_timeout) + 30,
        # gunicorn takes whole seconds; more than ours, so that our own kill at
        # --graceful-timeout (drain.py) comes first and every request is answered, and
        # the worker, which stops accepting only then, can close its idle kept-alive
        # connections (a stopping gthread worker keeps them up to 2 s) before the
        # arbiter's SIGKILL
        "graceful_timeout": math.ceil(config.graceful_timeout) + 1 + STOP_LINGER,
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn >= 25.1 would open one at a shared path
        "proc_name": "fnserve",
        "logconfig_dict": logging_config(config.log_format, config.dev),
        "logger_class": QuietAccessLogger,
        "when_ready": functools.partial(when_ready, config),
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
    }


class QuietAccessLogger(Logger):  # type: ignore[misc]
    """gunicorn builds every access line whenever logconfig_dict is set, even when the
    gunicorn.access logger then drops it (measured: 4-5 % of a worker's time). Build
    it only when someone listens (conf/gunicorn.conf.py can turn it on)."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


def is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost",)


def when_ready(config: Config, arbiter: Any) -> None:
    """In the master, for `fnserve serve` and `gunicorn -c conf/gunicorn.conf.py` alike."""
    stop = arbiter.handle_term

    def handle_term() -> None:  # the workers drain visibly only when the master stops
        mark_server_stopping()
        stop()

    # The arbiter looks its handlers up by name at each signal.
    arbiter.handle_term = handle_term
    if not config.dev:
        # the SPEC drains on SIGINT as on SIGTERM; gunicorn's own SIGINT is a quick stop.
        arbiter.handle_int = handle_term
    if is_public(config.host) and not config.api_key:
        log.warning("fnserve listens on %s, reachable from other machines, and no "
                    "--api-key is set: anyone who can reach port %s can run your "
                    "functions", config.host, config.port)


# The master's last good (config, registry); each worker, forked from it, inherits it.
_last_good: tuple[Config, Registry] | None = None


def remember_last_good(config: Config, registry: Registry) -> None:
    global _last_good
    _last_good = (config, registry)


def conf_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """For conf/gunicorn.conf.py, which gunicorn's master runs at start and on every HUP.

    At start a bad fnserve.toml stops gunicorn; on a HUP it is logged and the last
    good configuration is kept, since an exception here would end the master.
    """
    try:
        config = load_config(None, {}, environ)
        registry = load_registry(config.functions_dir, isolation=config.isolation)
        check_sandboxes(registry, find_bwrap(config.base_env.get("PATH")))
        remember_last_good(config, registry)
    except ConfigError as exc:
        if _last_good is None:
            raise
        log.error("%s (keeping the last good configuration)", exc)
        config = _last_good[0]
    return gunicorn_settings(config)


def worker_app(config: Config, fallback: Registry | None) -> Flask:
    """The app of one worker: a fresh scan, or the last good registry if the scan fails.

    A worker that cannot load makes the gunicorn master exit: a broken fnserve.toml
    saved while the server runs must not take it down at the next worker start.
    """
    try:
        registry = load_registry(config.functions_dir, isolation=config.isolation)
    except ConfigError as exc:
        if fallback is None:
            raise
        log.error("%s (keeping the last good configuration)", exc)
        registry = fallback
    return create_app(config, registry)


def wsgi_app(environ: Mapping[str, str]) -> Flask:
    """`fnserve.wsgi:app`: the config from FNSERVE_*; the last good one if it went bad."""
    try:
        config = load_config(None, {}, environ)
    except ConfigError as exc:
        if _last_good is None:
            raise
        log.error("%s (keeping the last good configuration)", exc)
        config, registry = _last_good
        return create_app(config, registry)
    return worker_app(config, _last_good[1] if _last_good else None)


def post_worker_init(worker: Any) -> None:
    """SIGTERM (and, in serve, SIGINT): keep answering (503 to new invocations and to
    /healthz) until the runs in flight are done or killed, then exit (drain.py)."""
    state = get_state(worker.wsgi)
    stop_gracefully = worker.handle_exit

    # gunicorn's handle_exit stops accepting at once: only once drained, unless the
    # arbiter is not stopping (a reload: the new worker accepts)
    draining = Drain(state, lambda: stop_gracefully(signal.SIGTERM, None))

    def drain(signum: int, frame: Any) -> None:
        # the arbiter never sends SIGINT: that one comes from a user, to stop
        draining.start(keep_accepting=signum == signal.SIGINT or server_stopping())

    signal.signal(signal.SIGTERM, drain)
    if not state.config.dev:
        signal.signal(signal.SIGINT, drain)
    else:
        from .reloader import build_go_functions

        build_go_functions(worker, state)


def worker_exit(server: Any, worker: Any) -> None:
    """Whatever way the worker ends, the process groups of its functions end with it."""
    app = getattr(worker, "wsgi", None)
    if isinstance(app, Flask) and "fnserve" in app.extensions:
        state = get_state(app)
        state.draining = True  # a run killed now is the shutdown's doing: 503, not 499
        if state.started_queue is not None:  # running jobs get the rest of the grace
            state.started_queue.close()
        state.executor.shutdown()


class FnServeApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.registry = registry  # the master's last good registry, inherited by each fork
        self.reloader: Any = None
        super().__init__(prog="fnserve")

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.config).items():
            self.cfg.set(key, value)
        if self.config.dev:
            self.cfg.set("when_ready", self._start_reloader)

    def _start_reloader(self, arbiter: Any) -> None:
        when_ready(self.config, arbiter)
        if self.reloader is None:
            from .reloader import Reloader

            self.reloader = Reloader(self, arbiter)
            self.reloader.start()

    def load(self) -> Flask:
        return worker_app(self.config, self.registry)

    def run(self) -> None:
        if self.config.dev:
            from .reloader import DevArbiter

            arbiter = DevArbiter(self)
        else:
            arbiter = Arbiter(self)
        try:
            arbiter.run()
        finally:
            if self.reloader is not None:
                self.reloader.stop()


def serve(config: Config) -> None:
    """Run the server until SIGTERM/SIGINT. Raises ConfigError before binding anything."""
    registry = load_registry(config.functions_dir, isolation=config.isolation)
    check_sandboxes(registry, find_bwrap(config.base_env.get("PATH")))
    FnServeApplication(config, registry).run()
