"""Executables (`NAME` or `NAME.sh` with the exec bit): run as they are."""

from __future__ import annotations

from ..registry import FunctionSpec
from . import Command


class ExecRuntime:
    name = "exec"

    def command(self, spec: FunctionSpec) -> Command:
        return Command((str(spec.entry),), spec.cwd)

    def runner(self, spec: FunctionSpec) -> None:
        return None

    def problem(self, spec: FunctionSpec) -> str | None:
        return None

    def kill_all(self) -> None:
        return None
