"""How each kind of function starts. One small module per runtime behind `Runtime`.

A runtime turns a FunctionSpec into the command to run; the executor owns the
process from there. A new execution mode is a new module here plus a line in
`make_runtimes`, without touching the executor or its callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..registry import FunctionSpec

if TYPE_CHECKING:
    from ..executor import Job, Result


class BuildError(Exception):
    """The function cannot be made runnable (a Go compile error, no toolchain).

    `final` marks an error that will repeat until the sources change (a compile
    error), as opposed to a build that was killed or timed out.
    """

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    cwd: Path


class Runner(Protocol):
    """A runtime that owns process start itself (Python's fork and warm modes, SPEC §8).

    One Job in, one Result out, like the executor: the deadline, a cancel and the output
    cap in the Job hold exactly as in process mode.
    """

    def run(self, job: Job) -> Result:
        ...


class Runtime(Protocol):
    name: str

    def runner(self, spec: FunctionSpec) -> Runner | None:
        """The runner of `spec` when this runtime starts its processes itself; None: the
        executor runs `command(spec)`, one fresh process per invocation."""
        ...

    def command(self, spec: FunctionSpec) -> Command:
        """The command that runs `spec`; may build first. Raises BuildError."""
        ...

    def problem(self, spec: FunctionSpec) -> str | None:
        """What keeps `spec` from running, known without building (for listings)."""
        ...

    def kill_all(self) -> None:
        """Stop any helper process (a build) still running: the server is stopping."""
        ...


def make_runtimes(cache_dir: Path, build_env: Mapping[str, str]) -> dict[str, Runtime]:
    from .exec import ExecRuntime
    from .go import GoRuntime
    from .python import PythonRuntime

    runtimes: list[Runtime] = [PythonRuntime(), GoRuntime(cache_dir, build_env), ExecRuntime()]
    return {runtime.name: runtime for runtime in runtimes}
