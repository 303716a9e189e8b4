"""Dev mode: a watchdog observer on DIR; a save becomes one gunicorn SIGHUP.

Runs in the gunicorn master. Each burst of events (an editor's several writes, a
`git checkout`) waits for a quiet window and causes one reload. The new registry
is loaded here first: a broken fnserve.toml is reported and the server keeps its
last good configuration, since a worker that failed to load would make the master
exit. Go sources are rebuilt here before the HUP, so a compile error shows in the
terminal at once (a worker that still sees the old registry rebuilds by hash and
never runs the old binary either).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import PurePath
from typing import Any

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

from .errors import ConfigError
from .registry import Registry, load_registry
from .runtimes import BuildError, make_runtimes

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
    return (name.startswith((".#", ".")) or name.endswith(_IGNORED_SUFFIXES)
            or name == "4913")  # vim's probe file


class Reloader(FileSystemEventHandler):
    def __init__(self, application: Any, arbiter: Any) -> None:
        self.application = application
        self.arbiter = arbiter
        self.root = str(application.config.functions_dir)
        self.runtimes = make_runtimes(application.config.cache_dir, application.config.build_env)
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
        self._stopping = True
        self._wake.set()
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout=2)

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
                self._reload(changed, only_attrib)

    # -- one reload -----------------------------------------------------------------

    def _reload(self, changed: list[str], only_attrib: bool) -> None:
        try:
            registry = load_registry(self.root)
        except ConfigError as exc:
            self._say(f"[reload] error: {exc}")
            self._say("[reload] still serving the last good configuration")
            return
        if only_attrib and _same_functions(registry, self.application.registry):
            return  # a touch or chmod that changes nothing served
        self._say(f"[reload] {changed[0]} modified, reloading server...")
        for warning in registry.warnings:
            self._say(f"[reload] warning: {warning}")
        self._build_go(registry)
        self.application.registry = registry
        os.kill(self.arbiter.pid, signal.SIGHUP)

    def _build_go(self, registry: Registry) -> None:
        go = self.runtimes["go"]
        for spec in registry:
            if spec.runtime != "go":
                continue
            try:
                go.command(spec)
            except BuildError as exc:
                self._say(f"[reload] {exc}")

    def _say(self, message: str) -> None:
        print(message, flush=True)


def _same_functions(new: Registry, old: Registry) -> bool:
    return dict(new.functions) == dict(old.functions)
