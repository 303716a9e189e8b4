"""Python functions: `<python> NAME.py`, cwd = the function's directory.

sys.executable, not `python3` from PATH: on a pyenv machine that is a shell shim
costing ~38 ms per start. No -I: it implies -P on 3.11+, which breaks `import
helper` from the function's own directory. A NAME/main.py function also gets DIR
on PYTHONPATH, so the shared `_helpers.py` of DIR imports the same from both layouts.

`mode = "fork"` or `"warm"` (SPEC §8): the runtime starts the processes itself,
through a runner per function (forkserver.py, pool.py); process mode stays the
executor's fresh process per invocation.
"""

from __future__ import annotations

import os
import sys
import threading

from ..registry import FunctionSpec
from . import Command
from .forkserver import ForkRunner
from .pool import WarmPool


class PythonRuntime:
    name = "python"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runners: dict[str, ForkRunner | WarmPool] = {}
        self._closed = False

    def command(self, spec: FunctionSpec) -> Command:
        argv = (spec.settings.python or sys.executable, str(spec.entry))
        package = spec.package_dir
        if package is None:  # NAME.py: its own directory, DIR, is sys.path[0] already
            return Command(argv, spec.cwd)
        # NAME/main.py: DIR on the path too, so `import _helpers` works from either layout
        return Command(argv, spec.cwd, {"PYTHONPATH": str(package.parent)})

    def runner(self, spec: FunctionSpec) -> ForkRunner | WarmPool | None:
        if spec.settings.mode == "process":
            return None
        stale = None
        with self._lock:
            runner = self._runners.get(spec.name)
            if runner is None or runner.spec != spec:
                stale = runner
                runner = ForkRunner(spec) if spec.settings.mode == "fork" else WarmPool(spec)
                if self._closed:  # the server is stopping: the runner answers "cancelled"
                    runner.kill_all()
                self._runners[spec.name] = runner
        if stale is not None:  # another spec of the same name (a new fnserve.toml)
            stale.kill_all()
        return runner

    def problem(self, spec: FunctionSpec) -> str | None:
        python = spec.settings.python
        if python and os.sep in python and not os.access(python, os.X_OK):
            return f"python interpreter {python} is not executable"
        with self._lock:
            runner = self._runners.get(spec.name)
        if runner is not None and runner.spec == spec:
            return runner.init_error
        return None

    def kill_all(self) -> None:
        """The server stops (or a dev reload retires this worker): every fork server,
        pool process and their children are killed and reaped."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
        for runner in runners:
            runner.kill_all()
