"""Dev mode: a watchdog observer on DIR; a save becomes one gunicorn SIGHUP.

Runs in the gunicorn master. Each burst of events (an editor's several writes, a
`git checkout`) waits for a quiet window and causes one reload. The new registry
is loaded here first: a broken fnserve.toml is reported and the server keeps its
last good configuration, since a worker that failed to load would make the master
exit.

Go functions are built by each new worker as soon as it boots (build_go_functions),
so a compile error shows in the terminal at once, not at the first request. Never
here in the master: a worker forked while the master held a build's flock would
keep that lock for life (an inherited open file description) and hang the first
request of that function, and the master's waitpid(-1) takes the exit status of
any child. A worker that still sees the old registry rebuilds by source hash and
never runs an old binary either.

Every worker is forked from this process and so shares its inotify instance:
only the master may stop the observer, since inotify_rm_watch from a worker on
its way out would remove the master's watches too, and no later save would be
seen.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from gunicorn.arbiter import Arbiter
from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .config import read_toml
from .errors import ConfigError
from .registry import Registry, load_registry
from .runtimes import BuildError

log = logging.getLogger("fnserve.reloader")

QUIET_WINDOW = 0.15  # seconds without events that end a burst
# opened / closed_no_write are ignored: the server itself opens fnserve.toml on
# reload, which would otherwise trigger the next reload, forever
_CHANGES = {EVENT_TYPE_CREATED, EVENT_TYPE_DELETED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED,
            EVENT_TYPE_ATTRIB}
_IGNORED_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules"}
_IGNORED_SUFFIXES = (".swp", ".swx", ".swo", "~", ".pyc", ".tmp")


def is_ignored(path: str, root: str) -> bool:
    try:
        parts = PurePath(os.path.relpath(path, root)).parts
    except ValueError:
        return True
    if not parts or parts == (".",):
        return False
    if any(part in _IGNORED_DIRS or part.startswith(".") for part in parts[:-1]):
        return True
    name = parts[-1]
    # the leaf too: creating __pycache__ itself is no change to any function
    return (name in _IGNORED_DIRS or name.startswith((".#", "."))
            or name.endswith(_IGNORED_SUFFIXES) or name == "4913")  # vim's probe file


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


class Reloader(FileSystemEventHandler):
    def __init__(self, application: Any, arbiter: Any) -> None:
        self.application = application
        self.arbiter = arbiter
        self.root = str(application.config.functions_dir)
        self._pid = os.getpid()
        try:
            self._server_table = read_toml(application.config.functions_dir).get("server")
        except ConfigError:  # broken since startup checked it: the next save reports it
            self._server_table = None
        self._lock = threading.Lock()
        self._changed: list[str] = []
        self._only_attrib = True
        self._last_event = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._observer = Observer()
        self._observer.schedule(self, self.root, recursive=True)
        self._thread = threading.Thread(target=self._debounce, name="fnserve-reloader",
                                        daemon=True)

    def start(self) -> None:
        self._observer.start()
        self._thread.start()
        self._say(f"[dev] watching {self.root} for changes")

    def stop(self) -> None:
        if os.getpid() != self._pid:
            return  # a worker unwinding through the arbiter's code: see the module doc
        self._stopping = True
        self._wake.set()
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout=2)
        self._thread.join(timeout=2)

    # -- events -------------------------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGES:
            return
        if event.is_directory and event.event_type in (EVENT_TYPE_MODIFIED, EVENT_TYPE_ATTRIB):
            return  # a directory's mtime changes with its files; the file events say more
        paths = [os.fsdecode(event.src_path)]
        if event.event_type == EVENT_TYPE_MOVED:
            paths.append(os.fsdecode(event.dest_path))
        relevant = [path for path in paths if not is_ignored(path, self.root)]
        if not relevant:
            return
        with self._lock:
            self._changed.extend(relevant)
            self._only_attrib = self._only_attrib and event.event_type == EVENT_TYPE_ATTRIB
            self._last_event = time.monotonic()
        self._wake.set()

    def _debounce(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            while not self._stopping:
                with self._lock:
                    quiet_for = time.monotonic() - self._last_event
                if quiet_for >= QUIET_WINDOW:
                    break
                time.sleep(QUIET_WINDOW - quiet_for)
            with self._lock:
                changed, self._changed = self._changed, []
                only_attrib, self._only_attrib = self._only_attrib, True
            if changed and not self._stopping:
                self._guarded(self._reload, changed, only_attrib)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        # this thread must outlive any one bad reload, or dev mode silently stops reloading
        try:
            step(*args)
        except Exception as exc:
            if not self._stopping:
                self._say(f"[reload] error: {type(exc).__name__}: {exc}")

    # -- one reload -----------------------------------------------------------------

    def _reload(self, changed: list[str], only_attrib: bool) -> None:
        try:
            document = read_toml(self.application.config.functions_dir)
            registry = load_registry(self.root, document, self.application.config.isolation)
        except ConfigError as exc:
            self._say(f"[reload] error: {exc}")
            self._say("[reload] still serving the last good configuration")
            return
        if only_attrib and _same_functions(registry, self.application.registry):
            return  # a touch or chmod that changes nothing served
        self._say(f"[reload] {changed[0]} modified, reloading server...")
        for warning in registry.warnings:
            self._say(f"[reload] warning: {warning}")
        if document.get("server") != self._server_table:
            # gunicorn's settings (port, threads, ...) are fixed for the life of the master
            self._server_table = document.get("server")
            self._say("[reload] note: [server] settings of fnserve.toml take effect at the "
                      "next start of fnserve dev")
        if self._stopping:
            return
        self.application.registry = registry
        os.kill(self.arbiter.pid, signal.SIGHUP)

    def _say(self, message: str) -> None:
        # one write: the workers log to the same stdout, and print()'s separate write of
        # the newline (unbuffered, as under PYTHONUNBUFFERED) lets their lines in between
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def _same_functions(new: Registry, old: Registry) -> bool:
    return dict(new.functions) == dict(old.functions)


def build_go_functions(worker: Any, state: Any) -> None:
    """In a new dev worker: build every Go function now, in the background.

    A compile error is logged (to the terminal) when the worker boots, and the
    first request finds the binary ready. Stops at the first build after the worker
    is told to exit; a build in progress then is killed with the worker's others.
    """
    go = state.runtimes["go"]
    specs = [spec for spec in state.registry if spec.runtime == "go"]

    def build_all() -> None:
        for spec in specs:
            if not worker.alive:
                return
            try:
                go.command(spec)
            except BuildError as exc:
                if worker.alive:
                    log.error("%s", exc)
            except Exception:  # a thread of our own: say why, never die silently
                log.exception("building %s failed", spec.name)

    if specs:
        threading.Thread(target=build_all, name="fnserve-go-build", daemon=True).start()
