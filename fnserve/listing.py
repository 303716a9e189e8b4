"""What `fnserve list` prints and GET /functions answers: one description per function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import build_environment, cache_dir, format_duration
from .registry import Registry, load_registry
from .runtimes import Runtime, make_runtimes
from .sandbox import find_bwrap, sandbox_problem


def format_size(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def describe_registry(registry: Registry, runtimes: Mapping[str, Runtime],
                      server_timeout: float | None = None,
                      bwrap: str | None = None) -> list[dict[str, Any]]:
    """`server_timeout` given (a server): the timeout that applies, min(own, --timeout).
    Without it (`fnserve list`): the function's own setting, None when it has none.
    `bwrap`: its path; None (missing) lists every sandboxed function as an error."""
    rows = []
    for spec in registry:
        problem = sandbox_problem(spec, bwrap) or runtimes[spec.runtime].problem(spec)
        settings = spec.settings
        timeout = settings.timeout if server_timeout is None else spec.deadline(server_timeout)
        rows.append({
            "name": spec.name,
            "runtime": spec.runtime,
            "mode": settings.mode if spec.runtime == "python" else None,
            "timeout": format_duration(timeout) if timeout else None,
            "memory": format_size(settings.memory) if settings.memory else None,
            "isolation": settings.isolation,
            "status": "ok" if problem is None else "error",
            "error": problem,
        })
    return rows


def describe(directory: str | Path, environ: Mapping[str, str],
             warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    registry = load_registry(directory)
    if warn is not None:  # a name defined twice: say which file is used (SPEC §1)
        for warning in registry.warnings:
            warn(warning)
    runtimes = make_runtimes(cache_dir(environ), build_environment(environ))
    return describe_registry(registry, runtimes, bwrap=find_bwrap(environ.get("PATH")))
