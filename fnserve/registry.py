"""The functions directory: which entries are functions, and their settings.

A name resolves only through the scanned table, never by joining it onto DIR,
so no request can name a file outside the directory.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import (
    TOML_NAME,
    parse_duration,
    parse_isolation,
    parse_size,
    read_toml,
    server_table,
)
from .errors import ConfigError, NotFound

log = logging.getLogger("fnserve.registry")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SETTING_KEYS = ("timeout", "memory", "env", "python", "mode", "handler", "pool", "max_requests",
                "retries", "isolation", "network", "writable")
MODES = ("process", "fork", "warm")
PYTHON_ONLY_KEYS = ("mode", "handler", "pool", "max_requests")  # SPEC §8
DEFAULT_POOL = 4
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Settings:
    """Per-function settings from fnserve.toml ([defaults] merged under [functions.NAME])."""

    timeout: float | None = None
    memory: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    python: str | None = None
    mode: str = "process"  # SPEC §8: "process" | "fork" | "warm" (Python functions only)
    handler: str | None = None  # fork/warm: the callable; unset: handler, else lambda_handler
    pool: int = DEFAULT_POOL  # warm: processes per function
    max_requests: int = 0  # warm: replace a process after this many invocations; 0 = never
    retries: int = 0  # async runs on a Redis queue: attempts after a failed one (SPEC §11)
    isolation: str = "none"  # "none" | "sandbox" (SPEC §12)
    network: bool = False  # in a sandbox: keep the host's network
    writable: tuple[str, ...] = ()  # in a sandbox: absolute paths mounted read-write

    @property
    def sandboxed(self) -> bool:
        return self.isolation == "sandbox"


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    runtime: str  # "python" | "go" | "exec"
    entry: Path  # the file that is run or built: NAME.py, NAME/main.go, the executable
    cwd: Path
    settings: Settings = Settings()

    @property
    def package_dir(self) -> Path | None:
        """DIR/NAME for directory functions (Go builds the whole package)."""
        return self.cwd if self.entry.name in ("main.py", "main.go") and \
            self.cwd.name == self.name else None

    def deadline(self, server_timeout: float) -> float:
        own = self.settings.timeout
        return server_timeout if own is None else min(own, server_timeout)


@dataclass(frozen=True)
class Registry:
    directory: Path
    functions: Mapping[str, FunctionSpec]
    warnings: tuple[str, ...] = ()

    def get(self, name: str) -> FunctionSpec:
        # fullmatch first: '..', '/', NUL and look-alikes never reach a dict lookup
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise NotFound(f"no function named {name[:80]!r}")
        try:
            return self.functions[name]
        except KeyError:
            raise NotFound(f"no function named {name!r}") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.functions.values())

    def __len__(self) -> int:
        return len(self.functions)


def _is_executable(entry: os.DirEntry[str]) -> bool:
    try:
        mode = entry.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o111)


def discover(directory: Path) -> tuple[dict[str, tuple[str, Path, Path]], list[str]]:
    """Scan DIR -> {name: (runtime, entry, cwd)} plus warnings about clashes."""
    found: dict[str, list[tuple[int, str, Path, Path]]] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(("_", ".")) or entry.name == TOML_NAME:
                continue
            candidate = _classify(directory, entry)
            if candidate is None:
                continue
            name, rank, runtime, path, cwd = candidate
            if NAME_RE.fullmatch(name):
                found.setdefault(name, []).append((rank, runtime, path, cwd))
    functions: dict[str, tuple[str, Path, Path]] = {}
    warnings = []
    for name, candidates in sorted(found.items()):
        candidates.sort()
        rank, runtime, path, cwd = candidates[0]
        if len(candidates) > 1:
            others = ", ".join(c[2].relative_to(directory).as_posix() for c in candidates[1:])
            warnings.append(f"function {name!r} is defined more than once: using "
                            f"{path.relative_to(directory).as_posix()}, ignoring {others}")
        functions[name] = (runtime, path, cwd)
    return functions, warnings


def _classify(directory: Path, entry: os.DirEntry[str]) -> tuple[str, int, str, Path, Path] | None:
    """(name, rank, runtime, entry, cwd) for a function entry; rank orders clashes."""
    if entry.is_dir():
        sub = directory / entry.name
        for main, runtime in (("main.py", "python"), ("main.go", "go")):
            if (sub / main).is_file():
                return entry.name, 0, runtime, sub / main, sub
        return None
    stem, dot, ext = entry.name.rpartition(".")
    path = directory / entry.name
    if dot and ext == "py" and entry.is_file():
        return stem, 1, "python", path, directory
    if dot and ext == "go" and entry.is_file() and not stem.endswith("_test"):
        return stem, 2, "go", path, directory
    if dot and ext == "sh" and _is_executable(entry):
        return stem, 3, "exec", path, directory
    if not dot and _is_executable(entry):
        return entry.name, 4, "exec", path, directory
    return None


def parse_settings(table: Any, where: str, base: Settings | None = None) -> Settings:
    """Validate one [defaults] or [functions.NAME] table; errors name file and key."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    base = base or Settings()
    values: dict[str, Any] = {"timeout": base.timeout, "memory": base.memory,
                              "env": dict(base.env), "python": base.python, "mode": base.mode,
                              "handler": base.handler, "pool": base.pool,
                              "max_requests": base.max_requests, "retries": base.retries,
                              "isolation": base.isolation, "network": base.network,
                              "writable": base.writable}
    for key, value in table.items():
        if key not in SETTING_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of "
                              f"{', '.join(SETTING_KEYS)})")
        try:
            if key == "timeout":
                values["timeout"] = parse_duration(value)
            elif key == "memory":
                values["memory"] = parse_size(value)
            elif key == "python":
                if not isinstance(value, str) or not value:
                    raise ValueError(f"must be a path to an interpreter, not {value!r}")
                values["python"] = value
            elif key in PYTHON_ONLY_KEYS:
                values[key] = _parse_mode_setting(key, value)
            elif key == "retries":
                if isinstance(value, bool) or not isinstance(value, int) or \
                        not 0 <= value <= 100:
                    raise ValueError(f"must be a whole number from 0 to 100, not {value!r}")
                values["retries"] = value
            elif key == "isolation":
                values["isolation"] = parse_isolation(value)
            elif key == "network":
                if not isinstance(value, bool):
                    raise ValueError(f"must be true or false, not {value!r}")
                values["network"] = value
            elif key == "writable":
                values["writable"] = _parse_writable(value)
            else:
                values["env"].update(_parse_env(value))
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}: {exc}") from None
    return Settings(**values)


def _parse_mode_setting(key: str, value: Any) -> Any:
    if key == "mode":
        if value not in MODES:
            raise ValueError(f"must be one of {', '.join(MODES)}, not {value!r}")
        return value
    if key == "handler":
        if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
            raise ValueError(f"must be the name of a module-level callable, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, not {value!r}")
    if key == "pool" and not 1 <= value <= 256:
        raise ValueError(f"must be between 1 and 256, not {value}")
    if key == "max_requests" and value < 0:
        raise ValueError(f"must be 0 (never) or more, not {value}")
    return value


def check_runtime_settings(spec: FunctionSpec, table: Mapping[str, Any] | None,
                           where: str) -> FunctionSpec:
    """`mode` and its keys are for Python functions: in a Go or exec function's own table
    they are an error naming the key; inherited from [defaults] they do not apply."""
    if spec.runtime == "python":
        return spec
    for key in PYTHON_ONLY_KEYS:
        if table is not None and key in table:
            raise ConfigError(f"{where}.{key}: only Python functions have a mode (SPEC §8); "
                              f"{spec.name} is a {spec.runtime} function")
    if spec.settings.mode == "process":
        return spec
    settings = replace(spec.settings, mode="process", handler=None, pool=DEFAULT_POOL,
                       max_requests=0)
    return replace(spec, settings=settings)


def _parse_writable(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of absolute paths, not {value!r}")
    paths = []
    for item in value:
        if not isinstance(item, str) or not os.path.isabs(item) or "\0" in item:
            raise ValueError(f"{item!r} is not an absolute path")
        paths.append(os.path.normpath(item))
    return tuple(paths)


def _parse_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a table of strings, not {value!r}")
    env = {}
    for key, item in value.items():
        if not _ENV_KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not an environment variable name")
        if not isinstance(item, str) or "\0" in item:
            raise ValueError(f"{key} must be a string, not {item!r}")
        env[key] = item
    return env


def load_settings(
    directory: Path, document: Mapping[str, Any], isolation: str | None = None
) -> tuple[Settings, dict[str, Settings]]:
    """`isolation`: the server's default (--isolation); None: `[server] isolation`, else none."""
    path = directory / TOML_NAME
    for key in document:
        if key not in ("defaults", "functions", "server"):
            raise ConfigError(f"{path}: [{key}]: unknown table (expected defaults, functions, "
                              f"server)")
    server = server_table(directory, document)  # `list` and `run` reject a bad [server] too
    if isolation is None:
        isolation = parse_isolation(server["isolation"][1]) if "isolation" in server else "none"
    defaults = parse_settings(document.get("defaults", {}), f"{path}: defaults",
                              Settings(isolation=isolation))
    functions = document.get("functions", {})
    if not isinstance(functions, dict):
        raise ConfigError(f"{path}: functions: must be a table of [functions.NAME] tables")
    per_function = {
        name: parse_settings(table, f"{path}: functions.{name}", defaults)
        for name, table in functions.items()
    }
    return defaults, per_function


def load_registry(directory: str | Path, document: Mapping[str, Any] | None = None,
                  isolation: str | None = None) -> Registry:
    """Scan DIR and its fnserve.toml. Raises ConfigError for a bad toml or directory.

    `isolation`: the server's default for functions that do not set theirs (--isolation).
    """
    directory = Path(directory).resolve()
    if document is None:
        document = read_toml(directory)
    defaults, per_function = load_settings(directory, document, isolation)
    try:
        found, warnings = discover(directory)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot read the functions directory: "
                          f"{exc.strerror}") from None
    for name in per_function:
        if name not in found:
            warnings.append(f"{directory / TOML_NAME}: functions.{name}: no such function")
    functions_table = document.get("functions", {})
    specs = {
        name: check_runtime_settings(
            FunctionSpec(name, runtime, entry, cwd, per_function.get(name, defaults)),
            functions_table.get(name), f"{directory / TOML_NAME}: functions.{name}")
        for name, (runtime, entry, cwd) in found.items()
    }
    return Registry(directory, specs, tuple(warnings))


def spec_for_path(path: Path) -> FunctionSpec:
    """A function given by its file (fnserve run ./hello.py); settings from its directory."""
    path = path.resolve()
    directory = path.parent
    if path.is_dir():
        name = path.name
    else:
        name = path.stem if path.suffix in (".py", ".go", ".sh") else path.name
    document = read_toml(directory)
    defaults, per_function = load_settings(directory, document)
    settings = per_function.get(name, defaults)
    table = document.get("functions", {}).get(name)
    where = f"{directory / TOML_NAME}: functions.{name}"
    if path.is_dir():
        for main, runtime in (("main.py", "python"), ("main.go", "go")):
            if (path / main).is_file():
                return check_runtime_settings(
                    FunctionSpec(name, runtime, path / main, path, settings), table, where)
        raise NotFound(f"{path}: no main.py or main.go in this directory")
    if not path.is_file():
        raise NotFound(f"{path}: no such file")
    runtime = {".py": "python", ".go": "go"}.get(path.suffix, "exec")
    if runtime == "exec" and not os.access(path, os.X_OK):
        raise NotFound(f"{path}: not a .py or .go file, and not executable")
    return check_runtime_settings(FunctionSpec(name, runtime, path, directory, settings),
                                  table, where)
