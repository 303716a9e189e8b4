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
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger

from .app import create_app, get_state
from .banner import function_lines, start_line
from .config import Config, load_config
from .drain import Drain, mark_server_stopping, server_stopping
from .errors import ConfigError
from .gunicorn_internals import master_children, on_stop
from .logs import logging_config
from .reaper import REAPER, become_subreaper, kill_adopted_children
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
        "child_exit": child_exit,
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
    ready(config, arbiter, _registry_for(config))


def ready(config: Config, arbiter: Any, registry: Registry) -> None:
    # the functions of a worker that dies without its worker_exit come to us (child_exit)
    become_subreaper()
    # the workers drain visibly only when the master stops (not on a reload); in serve,
    # SIGINT drains like SIGTERM (SPEC §4) rather than gunicorn's quick stop
    on_stop(arbiter, mark_server_stopping, sigint_too=not config.dev)
    if is_public(config.host) and not config.api_key:
        log.warning("fnserve listens on %s, reachable from other machines, and no "
                    "--api-key is set: anyone who can reach port %s can run your "
                    "functions", config.host, config.port)
    announce(config, registry)


def _registry_for(config: Config) -> Registry:
    if _last_good is not None and _last_good[0].functions_dir == config.functions_dir:
        return _last_good[1]
    return load_registry(config.functions_dir)


def announce(config: Config, registry: Registry) -> None:
    """`FnServe 0.1.0 serving 6 functions from DIR on http://HOST:PORT`, so a user knows
    it worked; in dev, the functions with their status, on stdout like the rest."""
    log.info(start_line(config, registry))
    if config.dev:
        sys.stdout.write("".join(line + "\n" for line in function_lines(config, registry)))
        sys.stdout.flush()


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
            startup_error(exc)
        log.error("%s (keeping the last good configuration)", exc)
        config = _last_good[0]
    return gunicorn_settings(config)


def startup_error(exc: ConfigError) -> NoReturn:
    """gunicorn with conf/, `flask run`: a bad setting is one line and exit 2, as with
    `fnserve serve`, not a traceback (SystemExit passes through both)."""
    sys.stderr.write(f"fnserve: {exc}\n")
    sys.stderr.flush()
    raise SystemExit(2)


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
    # descendants that escape their function's process group come back to this worker
    REAPER.start()
    if not state.config.dev:
        signal.signal(signal.SIGINT, drain)
    else:
        from .reloader import build_go_functions

        build_go_functions(worker, state)


def worker_exit(server: Any, worker: Any) -> None:
    """Whatever way the worker ends, the process groups of its functions end with it,
    and so does every process that escaped them (reaper.py)."""
    app = getattr(worker, "wsgi", None)
    if isinstance(app, Flask) and "fnserve" in app.extensions:
        service = get_state(app)
        service.draining = True  # a run killed now is the shutdown's doing: 503, not 499
        if service.started_queue is not None:  # running jobs get the rest of the grace
            service.started_queue.close()
        service.executor.shutdown()
    REAPER.stop()  # and the processes that escaped them


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker ended. A worker SIGKILLed (or crashed) could not kill
    its functions: the master adopted them (a subreaper) and kills them now."""
    killed = kill_adopted_children(master_children(server))
    if killed:
        log.warning("killed %d processes left running by worker %s", killed, worker.pid)


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
        ready(self.config, arbiter, self.registry)
        if self.reloader is None:
            from .reloader import Reloader

            self.reloader = Reloader(self, arbiter)
            self.reloader.start()

    def load(self) -> Flask:
        return worker_app(self.config, self.registry)

    def run(self) -> None:
        if self.config.dev:
            from .gunicorn_internals import DevArbiter

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
