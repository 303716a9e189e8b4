"""The HTTP API (SPEC §3): create_app(config) -> a Flask app.

An invocation reads top to bottom: auth -> registry (404) -> bounded body (413)
-> JSON check (400) -> limiter (429) -> context -> executor -> stats/logs ->
response. The cheapest refusal comes first, and no slot is taken for a request
that is refused anyway.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from .config import Config, format_duration
from .context import Context, forwarded_env, make_context, request_id_from, tracing_from
from .errors import (
    INVOKE_METHODS,
    BuildFailed,
    ClientClosed,
    FnServeError,
    FunctionFailed,
    FunctionTimeout,
    InvalidJSON,
    MethodNotAllowed,
    OutputTooLarge,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from .executor import Executor, Invocation, Result, Run
from .limiter import Limiter
from .listing import describe_registry
from .logs import function_log, invocation_log
from .registry import FunctionSpec, Registry, load_registry
from .runtimes import Runtime, make_runtimes
from .sandbox import find_bwrap
from .stats import Stats, StatsCollector

log = logging.getLogger("fnserve.app")

METHODS = list(INVOKE_METHODS)
DISCONNECT_POLL = 0.25  # seconds between checks that the client is still there
DEV_STDERR_TAIL = 4096
_FIRST_BYTE = re.compile(rb"\s*(\S)")
_READ_CHUNK = 64 * 1024


@dataclass
class State:
    """Everything one app instance owns; the server's hooks reach it through the app."""

    config: Config
    registry: Registry
    runtimes: dict[str, Runtime]
    executor: Executor
    limiter: Limiter
    stats: Stats
    metrics: CollectorRegistry
    draining: bool = False


def get_state(app: Flask) -> State:
    state: State = app.extensions["fnserve"]
    return state


def _log_stderr(invocation: Invocation, line: str) -> None:
    function_log.info(line, extra={"function": invocation.spec.name, "stream": "stderr",
                                   "request_id": invocation.context.request_id})


def create_app(config: Config, registry: Registry | None = None) -> Flask:
    if registry is None:
        registry = load_registry(config.functions_dir, isolation=config.isolation)
    for warning in registry.warnings:
        log.warning(warning)
    runtimes = make_runtimes(config.cache_dir, config.build_env)
    stats = Stats()
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(StatsCollector(stats))
    state = State(
        config=config,
        registry=registry,
        runtimes=runtimes,
        executor=Executor(config.workers, runtimes, stderr_sink=_log_stderr,
                          bwrap=find_bwrap(config.base_env.get("PATH"))),
        limiter=Limiter(config.concurrency),
        stats=stats,
        metrics=metrics,
    )
    app = Flask("fnserve")
    app.extensions["fnserve"] = state
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # /function//etc/passwd names "/etc/passwd": a 404 like any bad name, not a 308
    # redirect to another name (set before the routes: each rule copies it when added)
    app.url_map.merge_slashes = False
    _add_routes(app, state)
    return app


# -- helpers of the invocation path ----------------------------------------------


def _check_auth(config: Config) -> None:
    if not config.api_key:
        return
    given = request.headers.get("X-API-Key")
    if not given:  # an empty X-API-Key must not hide a good Bearer token
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               config.api_key.encode("utf-8", "surrogateescape")):
        raise Unauthorized()


def _read_body(limit: int) -> bytes:
    """Read at most `limit` bytes, chunked or not; one byte more is a 413, read no further."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    # our own bounded read: werkzeug's max_content_length quietly truncates a chunked body
    stream = get_input_stream(request.environ, safe_fallback=True, max_content_length=None)
    chunks, total = [], 0
    try:
        while True:
            chunk = stream.read(min(_READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            chunks.append(chunk)
    except (OSError, ValueError) as exc:  # the client went away or sent a broken chunk
        raise ClientClosed(f"could not read the request body: {exc}") from None
    return b"".join(chunks)


def _removed(path: Path) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # unreadable is not gone: the start fails and says why
        return False
    return False


def _is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _parse_json(data: bytes) -> None:
    """Raise ValueError unless `data` is JSON (RFC 8259): Python's json takes NaN and
    Infinity, which JSON.parse and most other parsers refuse."""
    json.loads(data, parse_constant=_not_json)


_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _client_gone(sock: socket.socket) -> bool:
    # poll, not recv(MSG_PEEK): it reads nothing, and works on a TLS socket too; a
    # pipelined next request makes the socket readable, but only a close sets RDHUP
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(mask & _GONE for _fd, mask in poller.poll(0))


def _wait(run: Run, environ: dict[str, Any]) -> Result:
    """The result; if the client disconnects meanwhile, cancel the run (kills its group)."""
    sock = environ.get("gunicorn.socket")
    try:
        if sock is None:  # flask run, test client: no socket to watch
            return run.result()
        while True:
            try:
                return run.result(timeout=DISCONNECT_POLL)
            except TimeoutError:
                if not run.cancelled and _client_gone(sock):
                    run.cancel()
    except BaseException:  # never let a function run on after its slot is given back
        run.cancel()
        raise


def _error_for(result: Result, state: State, deadline: float) -> FnServeError | None:
    config = state.config
    outcome = result.outcome
    if outcome == "ok":
        return None
    if outcome == "timeout":
        return FunctionTimeout(f"function timed out after {format_duration(deadline)}")
    if outcome == "output_too_large":
        return OutputTooLarge(f"function output is larger than {config.max_output} bytes")
    if outcome == "build_failed":
        return BuildFailed(result.error or "function does not build")
    if outcome == "cancelled":
        # killed by the shutdown, the client is still there and deserves an answer
        return Unavailable() if state.draining else ClientClosed()
    extra: dict[str, Any] = {}
    if result.signal is not None:
        extra["signal"] = result.signal
        message = f"function was killed by signal {result.signal}"
    else:
        extra["exit_code"] = result.exit_code
        message = result.error or f"function exited with status {result.exit_code}"
    if config.dev:
        extra["stderr"] = result.stderr_tail[-DEV_STDERR_TAIL:].decode("utf-8", "replace")
    return FunctionFailed(message, **extra)


def _success(result: Result) -> Response:
    body = result.stdout
    content_type = "text/plain; charset=utf-8"
    head = _FIRST_BYTE.match(body)  # not body.lstrip(): that copies up to --max-output
    if head and head.group(1) in b'{["-0123456789tfn':
        try:
            _parse_json(body)
            content_type = "application/json"
        except ValueError:
            pass  # not JSON: plain text, as the SPEC says
    return Response(body, status=200, content_type=content_type)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """docs/openapi.yaml (shipped in the package as fnserve/openapi.yaml), parsed once."""
    text = (Path(__file__).parent / "openapi.yaml").read_text()
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def _error_response(error: FnServeError) -> Response:
    request_id = getattr(g, "request_id", None)
    response = Response(json.dumps(error.body(request_id)), status=error.status,
                        content_type="application/json")
    response.headers.update(error.headers)
    return response


# -- routes -----------------------------------------------------------------------


def _add_routes(app: Flask, state: State) -> None:
    config = state.config

    # "/function/" too, so an empty name is a 404 with a request id like any bad name
    @app.route("/function/", defaults={"name": ""}, methods=METHODS,
               provide_automatic_options=False)
    @app.route("/function/<path:name>", methods=METHODS, provide_automatic_options=False)
    def invoke(name: str) -> Response:
        g.started = time.monotonic()
        g.function = name
        g.request_id = request_id_from(request.headers.get("X-Request-Id"))
        g.tracing = tracing_from(request.headers.get)
        if request.method == "HEAD":  # Flask adds HEAD to GET routes: never run code for it
            raise MethodNotAllowed("HEAD does not invoke functions; use GET or POST")
        _check_auth(config)
        spec = state.registry.get(name)
        g.function = spec.name
        event = _read_body(config.max_body)
        if not event:
            event = b"{}"
        elif _is_json_type(request.mimetype):
            try:
                _parse_json(event)
            except ValueError:
                raise InvalidJSON() from None
        deadline = spec.deadline(config.timeout)
        context = make_context(
            spec.name, deadline, request_id=g.request_id, tracing=g.tracing,
            parameters={key: request.args[key] for key in request.args},
            forwarded=forwarded_env(request.headers.get, config.forward_headers),
            configured_env=spec.settings.env,
        )
        try:
            with state.limiter.admit():
                result = _run(state, spec, context, event, deadline)
        except TooManyRequests:
            g.outcome = "rejected"
            state.stats.rejected(spec.name)
            raise
        error = _error_for(result, state, deadline)
        if isinstance(error, FunctionFailed) and _removed(spec.entry):
            # deleted since this worker scanned DIR (serve rescans only on SIGHUP): say
            # so, rather than only "exited with status 2" from an interpreter that could
            # not open its script; the path itself is not the client's business
            error = FunctionFailed(f"{error} (its file was removed from the functions "
                                   f"directory)", **error.extra)
        if error is not None:
            raise error
        return _success(result)

    def _run(state: State, spec: FunctionSpec, context: Context, event: bytes,
             deadline: float) -> Result:
        admitted = time.monotonic()
        state.stats.admitted(spec.name)
        outcome = "internal"
        try:
            # the deadline runs from admission: reading a slow upload does not use it up
            invocation = Invocation(spec, context, event, admitted + deadline,
                                    config.base_env, config.max_output)
            result = _wait(state.executor.submit(invocation), request.environ)
            outcome = result.outcome
            return result
        finally:
            g.outcome = outcome
            state.stats.finished(spec.name, outcome, time.monotonic() - admitted)

    @app.after_request
    def invocation_headers(response: Response) -> Response:
        if request.endpoint != "invoke" or not hasattr(g, "started"):
            return response
        elapsed = time.monotonic() - g.started
        response.headers["X-Request-Id"] = g.request_id
        response.headers["traceparent"] = g.tracing.traceparent
        response.headers["X-Duration-Seconds"] = f"{elapsed:.6f}"
        outcome = g.get("outcome") or ("ok" if response.status_code < 400 else "error")
        invocation_log.info(
            f"{request.method} /function/{g.function} {response.status_code}",
            extra={"request_id": g.request_id, "function": g.function, "method": request.method,
                   "status": response.status_code, "outcome": outcome,
                   "duration_ms": round(elapsed * 1000, 3), "trace_id": g.tracing.trace_id},
        )
        return response

    @app.route("/functions", methods=["GET"])
    def functions() -> Any:
        _check_auth(config)
        return {"functions": describe_registry(state.registry, state.runtimes, config.timeout,
                                               bwrap=state.executor.bwrap)}

    @app.route("/stats", methods=["GET"])
    def stats() -> Any:
        _check_auth(config)
        return state.stats.snapshot()

    @app.route("/metrics", methods=["GET"])
    def metrics() -> Response:
        _check_auth(config)
        return Response(generate_latest(state.metrics), content_type=CONTENT_TYPE_LATEST)

    @app.route("/openapi.json", methods=["GET"])
    def openapi() -> Any:
        return openapi_document()

    @app.route("/healthz", methods=["GET"])
    def healthz() -> Any:
        if state.draining:
            return {"status": "draining"}, 503
        return {"status": "ok"}

    @app.errorhandler(FnServeError)
    def fnserve_error(error: FnServeError) -> Response:
        g.setdefault("outcome", error.code)  # refused before admission: log why
        return _error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                400: "bad_request"}.get(error.code or 500, "http_error")
        body = {"error": (error.description or error.name).rstrip("."), "code": code}
        response = Response(json.dumps(body), status=error.code or 500,
                            content_type="application/json")
        if error.code == 405:
            response.headers["Allow"] = ", ".join(METHODS if request.path.startswith(
                "/function/") else ["GET"])
        return response

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        g.setdefault("outcome", "internal")
        return _error_response(FnServeError("internal error"))

