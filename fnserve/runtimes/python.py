"""Python functions: `<python> NAME.py`, cwd = the function's directory.

sys.executable, not `python3` from PATH: on a pyenv machine that is a shell shim
costing ~38 ms per start. No -I: it implies -P on 3.11+, which breaks `import
helper` from the function's own directory. A NAME/main.py function also gets DIR
on PYTHONPATH, so the shared `_helpers.py` of DIR imports the same from both layouts.
"""

from __future__ import annotations

import os
import sys

from ..registry import FunctionSpec
from . import Command


class PythonRuntime:
    name = "python"

    def command(self, spec: FunctionSpec) -> Command:
        argv = (spec.settings.python or sys.executable, str(spec.entry))
        package = spec.package_dir
        if package is None:  # NAME.py: its own directory, DIR, is sys.path[0] already
            return Command(argv, spec.cwd)
        # NAME/main.py: DIR on the path too, so `import _helpers` works from either layout
        return Command(argv, spec.cwd, {"PYTHONPATH": str(package.parent)})

    def problem(self, spec: FunctionSpec) -> str | None:
        python = spec.settings.python
        if python and os.sep in python and not os.access(python, os.X_OK):
            return f"python interpreter {python} is not executable"
        return None

    def kill_all(self) -> None:
        return None
