"""What the server says when it is ready: one line a new user can trust, and in dev
the functions it found with their status."""

from __future__ import annotations

from typing import Any

from . import __version__
from .config import Config
from .listing import describe_registry
from .registry import Registry
from .runtimes import make_runtimes


def url(config: Config) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}"


def start_line(config: Config, registry: Registry) -> str:
    count = len(list(registry))
    noun = "function" if count == 1 else "functions"
    return (f"FnServe {__version__} serving {count} {noun} from {config.functions_dir} "
            f"on {url(config)}")


def function_lines(config: Config, registry: Registry) -> list[str]:
    """dev: one line per function: name, runtime, timeout, status (or its error)."""
    runtimes = make_runtimes(config.cache_dir, config.build_env)
    rows: list[dict[str, Any]] = describe_registry(registry, runtimes, config.timeout)
    if not rows:
        return [f"  no functions yet: add NAME.py, NAME.go or NAME/main.py to "
                f"{config.functions_dir}"]
    width = max(len(row["name"]) for row in rows)
    lines = []
    for row in rows:
        status = "ok" if row["status"] == "ok" else \
            f"error: {(row['error'] or '').splitlines()[0] if row['error'] else ''}"
        lines.append(f"  {row['name'].ljust(width)}  {row['runtime']:<6}  "
                     f"{row['timeout'] or '-':>5}  {status}")
    return lines
