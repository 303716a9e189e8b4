"""Python functions: `<python> NAME.py`, cwd = the function's directory.

sys.executable, not `python3` from PATH: on a pyenv machine that is a shell shim
costing ~38 ms per start. No -I: it implies -P on 3.11+, which breaks `import
helper` from the function's own directory.

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
        return Command((spec.settings.python or sys.executable, str(spec.entry)), spec.cwd)

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
