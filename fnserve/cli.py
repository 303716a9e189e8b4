"""The `fnserve` command: options in, a config or a library call out, no logic of its own."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .config import (
    OPTIONS,
    Config,
    Option,
    format_duration,
    load_config,
    parse_duration,
    parse_size,
)
from .errors import FnServeError
from .executor import DEFAULT_MAX_OUTPUT
from .listing import format_size

if TYPE_CHECKING:
    from .executor import Result

EXIT_FAILED = 1  # output too large, build failed
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SIGNAL_BASE = 128


class CliError(click.ClickException):
    """One line, `Error: ...`, exit 2: no usage dump, no traceback."""

    exit_code = EXIT_USAGE


FORMATS = (
    "DURATION is 500ms, 10s, 2m, 1h or a number of seconds. SIZE is 512KB, 6MB, 1GB "
    "(powers of 1024) or a number of bytes.\n\n"
    "Every option also reads FNSERVE_<OPTION> (FNSERVE_PORT, FNSERVE_API_KEY, ...) and "
    "the [server] table of DIR/fnserve.toml; a flag beats the environment, which beats "
    "the file. DIR defaults to FNSERVE_FUNCTIONS_DIR."
)


def _shown(option: Option, value: Any) -> str:
    if option.parse is parse_size:
        return format_size(value)
    if option.parse is parse_duration:
        return format_duration(value)
    return str(value)


def _option_help(option: Option, dev: bool) -> str:
    default = option.dev_default if dev and option.dev_default is not None else option.default
    shown = f"default: {_shown(option, default)}; " if default not in (None, ()) else ""
    return f"{option.help} [{shown}{option.env}]"


def _server_options(dev: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # every serve/dev flag comes from config.OPTIONS; defaults are applied there,
    # after FNSERVE_* and fnserve.toml, so click passes None for "not given"
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(OPTIONS):
            command = click.option(f"--{option.name}", option.field, default=None,
                                   multiple=option.multiple, metavar=option.metavar,
                                   help=_option_help(option, dev))(command)
        return click.argument("directory", required=False, metavar="DIR")(command)

    return decorate


def _config(directory: str | None, flags: dict[str, Any], dev: bool) -> Config:
    try:
        return load_config(directory, flags, os.environ, dev=dev)
    except FnServeError as exc:
        raise CliError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             invoke_without_command=True)
@click.version_option(__version__, prog_name="fnserve")
@click.pass_context
def main(ctx: click.Context) -> None:
    """FnServe: run Python, Go and executable functions behind HTTP.

    Start with `fnserve dev DIR` while writing functions, `fnserve serve DIR` to run
    them, `fnserve run NAME --dir DIR` to call one from the shell.
    """
    if ctx.invoked_subcommand is None:  # plain `fnserve`: the commands, not an error
        click.echo(ctx.get_help())
        ctx.exit(0)


@main.command(epilog=FORMATS)
@_server_options(dev=False)
def serve(directory: str | None, **flags: Any) -> None:
    """Serve the functions in DIR over HTTP (gunicorn, JSON logs on stderr).

    Each invocation runs in a fresh process; see README.md for the HTTP API.
    """
    _serve(_config(directory, flags, dev=False))


@main.command(epilog=FORMATS)
@_server_options(dev=True)
def dev(directory: str | None, **flags: Any) -> None:
    """Serve DIR for development: reload on every save.

    Like serve, with smaller defaults: a change to a function or to fnserve.toml
    reloads the server (Go functions are rebuilt, a compile error is printed),
    logs are readable lines on stdout, and a failed function's answer includes
    the end of its stderr.
    """
    _serve(_config(directory, flags, dev=True))


def _serve(config: Config) -> None:
    from .history import check_history
    from .server import serve as run_server

    try:
        check_history(config.history)  # an unusable --history is a startup error, exit 2
        run_server(config)
    except FnServeError as exc:
        raise CliError(str(exc)) from None


WORKER_OPTIONS = ("queue", "timeout", "max-output", "pass-env", "graceful-timeout", "log-format",
                  "history", "history-max")


def _worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([o for o in OPTIONS if o.name in WORKER_OPTIONS]):
        command = click.option(f"--{option.name}", option.field, default=None,
                               multiple=option.multiple, metavar=option.metavar,
                               help=option.help)(command)
    return click.argument("directory", required=False, metavar="DIR")(command)


@main.command()
@_worker_options
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve /metrics, /stats and /healthz on this port (default: none).")
@click.option("--metrics-host", default="127.0.0.1", metavar="HOST",
              help="Address of the --metrics-port server.")
def worker(directory: str | None, metrics_port: int | None, metrics_host: str,
           **flags: Any) -> None:
    """Run the async jobs queued in Redis (--queue) for the functions in DIR."""
    config = _config(directory, flags, dev=False)
    if not config.queue:
        raise CliError("fnserve worker needs --queue redis://HOST:PORT/DB "
                       "(or FNSERVE_QUEUE)")
    try:
        from .worker import run_worker
    except ImportError as exc:
        raise CliError(f"fnserve worker needs the redis extra (pip install "
                       f"'fnserve[redis]'): {exc}") from None
    try:
        run_worker(config, metrics_host=metrics_host, metrics_port=metrics_port)
    except FnServeError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # the metrics port is taken
        raise CliError(f"fnserve worker: {exc}") from None


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} {value!r}: expected KEY=VALUE")
        pairs[key] = item
    return pairs


@main.command(epilog="DURATION is 500ms, 10s, 2m, 1h or seconds; SIZE is 512KB, 6MB, 1GB "
                     "or bytes.")
@click.argument("target")
@click.option("--dir", "directory", default=".", metavar="DIR", show_default=True,
              help="The functions directory TARGET is a name in.")
@click.option("--data", metavar="JSON|@FILE", help="The event (default: stdin, else {}).")
@click.option("--param", multiple=True, metavar="K=V", help="A query parameter (repeatable).")
@click.option("--env", multiple=True, metavar="K=V", help="A context env entry (repeatable).")
@click.option("--timeout", metavar="DURATION",
              help="Shorten the function's deadline (its own timeout, else 30s).")
@click.option("--max-output", metavar="SIZE", help="Largest stdout. [default: 6MB]")
def run(target: str, directory: str, data: str | None, param: tuple[str, ...],
        env: tuple[str, ...], timeout: str | None, max_output: str | None) -> None:
    """Invoke one function once, without a server.

    TARGET is a function's name in --dir (hello), or the path of its file or
    directory (samples/hello.py, samples/wordcount). The event is --data, else
    stdin when it is not a terminal (JSON if it starts with { or [, else passed
    as text), else {}. Exits with the function's status: 128+N when killed by
    signal N, 124 on timeout, 1 when the output was too large or a build failed,
    2 on usage errors.
    """
    from .invoke import parse_event, parse_stdin, resolve, run_function

    try:
        seconds = parse_duration(timeout) if timeout is not None else None
        output_limit = parse_size(max_output) if max_output is not None else DEFAULT_MAX_OUTPUT
        spec = resolve(target, directory)
        if data is None and sys.stdin is not None and not sys.stdin.isatty():
            event = parse_stdin(sys.stdin.buffer.read())
        else:
            event = parse_event(data)
    except (ValueError, FnServeError) as exc:
        raise CliError(str(exc)) from None

    def echo_stderr(_invocation: object, line: str) -> None:
        click.echo(line, err=True)

    from .reaper import REAPER

    # a process the function started and that left its group is killed when we are done
    REAPER.start(background=False)
    try:
        result = run_function(spec, event, parameters=_pairs(param, "--param"),
                              env=_pairs(env, "--env"), timeout=seconds,
                              stderr_sink=echo_stderr, stdout_sink=echo_stderr,
                              max_output=output_limit)
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGNAL_BASE + 2)
    except FnServeError as exc:  # a sandboxed function and no bwrap
        raise CliError(str(exc)) from None
    except OSError as exc:  # FnServe's own trouble (an unwritable cache): say it in a line
        click.echo(f"fnserve: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        REAPER.stop()
    exit_with_result(spec.name, result, output_limit)


def exit_with_result(name: str, result: Result,
                     max_output: int = DEFAULT_MAX_OUTPUT) -> NoReturn:
    """What `fnserve run` (and `fnserve replay`) print for a Result, and the exit status."""
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    if result.outcome == "timeout":
        click.echo(f"fnserve: {name} timed out after "
                   f"{format_duration(result.context.deadline or 0)}", err=True)
        sys.exit(EXIT_TIMEOUT)
    if result.outcome == "output_too_large":
        click.echo(f"fnserve: {name} wrote more than the output limit of "
                   f"{format_size(max_output)} (--max-output); it was killed", err=True)
        sys.exit(EXIT_FAILED)
    # init_failed: a fork/warm module that does not import; unavailable: out of fds, memory
    if result.outcome in ("build_failed", "init_failed", "unavailable"):
        click.echo(f"fnserve: {result.error}", err=True)
        sys.exit(EXIT_FAILED)
    if result.error:
        click.echo(f"fnserve: {result.error}", err=True)
    if result.signal is not None:
        click.echo(f"fnserve: {name} was killed by signal {result.signal} "
                   f"({_signal_name(result.signal)})", err=True)
        sys.exit(EXIT_SIGNAL_BASE + result.signal)
    sys.exit(result.exit_code or 0)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@main.command("list")
@click.argument("directory", metavar="DIR", default=".")
def list_functions(directory: str) -> None:
    """List the functions in DIR with their settings and status.

    TIMEOUT is the deadline `fnserve serve DIR` gives each function: its own
    timeout, at most the server's (30s unless FNSERVE_TIMEOUT or fnserve.toml's
    [server] says otherwise).
    """
    from .listing import describe

    try:
        # the timeout that applies when served (min(own, --timeout), 30s unless set), as
        # GET /functions shows it; FNSERVE_TIMEOUT and [server] of fnserve.toml count
        config = load_config(directory, {}, os.environ)
        rows = describe(directory, os.environ,
                        warn=lambda warning: click.echo(f"warning: {warning}", err=True),
                        server_timeout=config.timeout)
    except FnServeError as exc:
        raise CliError(str(exc)) from None
    if not rows:
        click.echo(f"no functions in {directory}")
        return
    table = [("NAME", "RUNTIME", "MODE", "TIMEOUT", "MEMORY", "ISOLATION", "STATUS")] + [
        (r["name"], r["runtime"], r["mode"] or "-", r["timeout"] or "-", r["memory"] or "-",
         r["isolation"], r["status"] if r["status"] == "ok" else f"error: {r['error']}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:6], widths, strict=True)]
        click.echo("  ".join([*cells, row[6].splitlines()[0] if row[6] else ""]))


# fnserve history / show / replay (SPEC §10) live in their own module
from .history_cli import history, replay, show  # noqa: E402

for _command in (history, show, replay):
    main.add_command(_command)
