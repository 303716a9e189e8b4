"""One frozen server configuration: flags > FNSERVE_* env > [server] of fnserve.toml > defaults.

Every option is declared once in OPTIONS (like gunicorn's Setting classes); the
CLI builds its click options from the same table, so a flag, its variable and
its toml key can never drift apart.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .context import base_environment
from .errors import ConfigError

TOML_NAME = "fnserve.toml"
DEFAULT_FORWARD_HEADERS = ("X-API-Key", "Authorization", "X-Forwarded-For")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(value: Any) -> float:
    """'500ms', '10s', '2m', '1h' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use 500ms, 10s, 2m, 1h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """'512KB', '6MB', '1GB' (powers of 1024) or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"not a size: {value!r} (use 512KB, 6MB, 1GB or bytes)")
        unit = (match.group(2) or "").lower()[:1]
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive: {value!r}")
    return size


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1: {value!r}")
    return number


def _port(value: Any) -> int:
    if isinstance(value, bool):  # int(True) is 1: `port = true` must not bind port 1
        raise ValueError(f"not a port: {value!r}")
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"not a port: {value!r}")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _log_format(value: Any) -> str:
    if value not in ("json", "text"):
        raise ValueError(f"must be json or text: {value!r}")
    return str(value)


ISOLATIONS = ("none", "sandbox")


def parse_isolation(value: Any) -> str:
    if value not in ISOLATIONS:
        raise ValueError(f"must be one of {', '.join(ISOLATIONS)}, not {value!r}")
    return str(value)


def _queue_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://")):
        raise ValueError(f"not a Redis URL: {value!r} (use redis://HOST:PORT/DB)")
    return value


def _header_name(value: Any) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"not a header name: {value!r}")
    return value


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise ValueError(f"not an environment variable name: {value!r}")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # the long flag without dashes, with '-' between words
    parse: Callable[[Any], Any]
    default: Any
    help: str
    dev_default: Any = None
    multiple: bool = False
    metavar: str = "VALUE"

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "FNSERVE_" + self.field.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, "127.0.0.1", "Address to bind.", metavar="HOST"),
    Option("port", _port, 8080, "Port to bind.", metavar="PORT"),
    Option("concurrency", _positive_int, 100, "Invocations admitted at once; one more gets 429.",
           dev_default=10, metavar="N"),
    Option("timeout", parse_duration, 30.0, "Longest deadline of a function.",
           dev_default=10.0, metavar="DURATION"),
    Option("workers", _positive_int, None, "Threads running functions (default: --concurrency).",
           metavar="N"),
    Option("max-body", parse_size, 6 * 1024**2, "Largest request body.", metavar="SIZE"),
    Option("max-output", parse_size, 6 * 1024**2, "Largest function stdout.", metavar="SIZE"),
    Option("api-key", _text, None, "Require this key in X-API-Key or Authorization: Bearer.",
           metavar="KEY"),
    Option("forward-header", _header_name, (), "Also forward this request header (repeatable).",
           multiple=True, metavar="HEADER"),
    Option("pass-env", _env_name, (), "Pass this server variable to functions (repeatable).",
           multiple=True, metavar="NAME"),
    Option("graceful-timeout", parse_duration, None,
           "Time running invocations get at shutdown (default: --timeout + 5s).",
           metavar="DURATION"),
    Option("log-format", _log_format, "json", "Log format.", dev_default="text",
           metavar="json|text"),
    Option("isolation", parse_isolation, "none",
           "Isolation of functions that do not set theirs (sandbox: bubblewrap).",
           metavar="none|sandbox"),
    Option("queue", _queue_url, None,
           "Queue async invocations in Redis (run by `fnserve worker`); default: in memory.",
           metavar="redis://HOST:PORT/DB"),
    Option("queue-size", _positive_int, 1000, "In-memory queue: most jobs waiting to start.",
           metavar="N"),
    Option("result-ttl", parse_duration, 86400.0, "How long a finished job's result is kept.",
           metavar="DURATION"),
    Option("history", _text, None,
           "Invocation history file, or off (default: ~/.local/share/fnserve/history.sqlite3).",
           metavar="PATH|off"),
    Option("history-max", _positive_int, 10000, "Invocations the history keeps (the newest).",
           metavar="N"),
)
OPTIONS_BY_FIELD = {option.field: option for option in OPTIONS}


@dataclass(frozen=True)
class Config:
    functions_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    concurrency: int = 100
    timeout: float = 30.0
    workers: int = 100
    max_body: int = 6 * 1024**2
    max_output: int = 6 * 1024**2
    api_key: str | None = None
    forward_headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS
    pass_env: tuple[str, ...] = ()
    graceful_timeout: float = 35.0
    log_format: str = "json"
    isolation: str = "none"  # the default of functions that do not set theirs (SPEC §12)
    queue: str | None = None
    queue_size: int = 1000
    result_ttl: float = 86400.0
    dev: bool = False
    # read from the server's environment once, here, and passed down
    base_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cache_dir: Path = Path(".cache/fnserve")
    build_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    history: Path | None = None  # None: no history (--history off)
    history_max: int = 10000


def read_toml(functions_dir: Path) -> dict[str, Any]:
    """The parsed fnserve.toml of DIR, {} when there is none."""
    path = functions_dir / TOML_NAME
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Where Go binaries are cached: $XDG_CACHE_HOME/fnserve or ~/.cache/fnserve."""
    xdg = environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "fnserve"
    return Path(environ.get("HOME") or Path.home()) / ".cache" / "fnserve"


def history_path(environ: Mapping[str, str], value: str | None = None) -> Path | None:
    """--history PATH|off; unset: $XDG_DATA_HOME/fnserve or ~/.local/share/fnserve."""
    if value is not None:
        return None if value.strip().lower() == "off" else Path(value).expanduser().resolve()
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME") or Path.home()) / ".local" / "share"
    return base / "fnserve" / "history.sqlite3"


def build_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What `go build` sees: the toolchain's own settings, not the server's secrets."""
    keep = ("PATH", "HOME", "TMPDIR", "LANG")
    return {key: value for key, value in environ.items()
            if key in keep or key.startswith(("GO", "CGO_"))}


def _split_env_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def server_table(directory: Path, document: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """The [server] table of fnserve.toml as {field: (key, raw value)}, keys and values checked.

    Every value is checked, even one a flag overrides: a bad file is bad for every caller.
    """
    table = document.get("server", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{directory / TOML_NAME}: [server] must be a table")
    found: dict[str, tuple[str, Any]] = {}
    for key, value in table.items():
        where = f"{directory / TOML_NAME}: [server] {key}"
        option = OPTIONS_BY_FIELD.get(key.replace("-", "_"))
        if option is None:
            raise ConfigError(f"{where}: unknown option")
        try:
            _parse_option(option, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        found[option.field] = (key, value)
    return found


def _parse_option(option: Option, raw: Any) -> Any:
    if option.multiple:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        return tuple(option.parse(item) for item in items)
    return option.parse(raw)


def load_config(
    functions_dir: str | Path | None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    dev: bool = False,
    toml: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one Config. `flags` maps option fields to raw values (None = not given)."""
    flags = flags or {}
    environ = environ or {}
    raw_dir = functions_dir or environ.get("FNSERVE_FUNCTIONS_DIR")
    if not raw_dir:
        raise ConfigError("no functions directory: give DIR or set FNSERVE_FUNCTIONS_DIR")
    directory = Path(raw_dir).resolve()
    if not directory.is_dir():
        raise ConfigError(f"{raw_dir}: not a directory")
    document = read_toml(directory) if toml is None else toml
    from_toml = server_table(directory, document)
    # the function tables too: `serve` must exit 2 on any bad fnserve.toml, not
    # fail later in the app; imported here because registry imports this module
    from .registry import load_settings

    load_settings(directory, document, "none")

    values: dict[str, Any] = {}
    for option in OPTIONS:
        where, raw = _pick(option, flags, environ, from_toml, directory)
        if raw is None:
            values[option.field] = option.dev_default if dev and option.dev_default is not None \
                else option.default
            continue
        try:
            values[option.field] = _parse_option(option, raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    workers = values.pop("workers") or values["concurrency"]
    graceful = values.pop("graceful_timeout") or values["timeout"] + 5.0
    extra_headers = values.pop("forward_header")
    forward = DEFAULT_FORWARD_HEADERS + tuple(
        h for h in extra_headers if h.lower() not in {d.lower() for d in DEFAULT_FORWARD_HEADERS}
    )
    return Config(
        functions_dir=directory,
        base_env=base_environment(environ, values["pass_env"]),
        cache_dir=cache_dir(environ),
        build_env=build_environment(environ),
        workers=workers,
        graceful_timeout=graceful,
        forward_headers=forward,
        dev=dev,
        history=history_path(environ, values.pop("history")),
        **values,
    )


def _pick(
    option: Option,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    from_toml: Mapping[str, tuple[str, Any]],
    directory: Path,
) -> tuple[str, Any]:
    flag = flags.get(option.field)
    if flag not in (None, (), []):
        return f"--{option.name}", flag
    if option.env in environ:
        value = environ[option.env]
        return option.env, _split_env_list(value) if option.multiple else value
    if option.field in from_toml:
        key, value = from_toml[option.field]
        return f"{directory / TOML_NAME}: [server] {key}", value
    return "", None
