"""Python functions: `<python> NAME.py`, cwd = the function's directory.

sys.executable, not `python3` from PATH: on a pyenv machine that is a shell shim
costing ~38 ms per start. No -I: it implies -P on 3.11+, which breaks `import
helper` from the function's own directory.
"""

from __future__ import annotations

import os
import sys

from ..registry import FunctionSpec
from . import Command


class PythonRuntime:
    name = "python"

    def command(self, spec: FunctionSpec) -> Command:
        return Command((spec.settings.python or sys.executable, str(spec.entry)), spec.cwd)

    def problem(self, spec: FunctionSpec) -> str | None:
        python = spec.settings.python
        if python and os.sep in python and not os.access(python, os.X_OK):
            return f"python interpreter {python} is not executable"
        return None

    def kill_all(self) -> None:
        return None
