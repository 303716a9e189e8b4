"""The HTTP API (SPEC §3): create_app(config) -> a Flask app.

An invocation reads top to bottom: auth -> registry (404) -> bounded body (413)
-> JSON check (400) -> service.py (limiter 429, context, executor, stats, log,
history) -> the Outcome as the response. The cheapest refusal comes first, and no
slot is taken for a request that is refused anyway. A body over ADMIT_FIRST_ABOVE
(or chunked) is the exception: its slot is reserved before it is read, so that a
429 does not cost the upload (README: the order for large bodies).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from .config import Config
from .context import forwarded_env, request_id_from, tracing_from
from .credentials import bearer_token, same_key, without_server_key
from .disconnect import ClientWatch
from .errors import (
    INVOKE_METHODS,
    ClientClosed,
    FnServeError,
    InvalidJSON,
    MethodNotAllowed,
    PayloadTooLarge,
    Unauthorized,
)
from .executor import Result, Run
from .gunicorn_internals import client_socket
from .listing import describe_registry
from .outcome import Outcome, from_error, parse_json
from .registry import Registry
from .service import InvocationRequest, Service, log_invocation

log = logging.getLogger("fnserve.app")

METHODS = list(INVOKE_METHODS)
DISCONNECT_POLL = 0.25  # seconds between checks that the client is still there
_READ_CHUNK = 64 * 1024
# bodies larger than this (or chunked) are admitted before they are read (issue 8)
ADMIT_FIRST_ABOVE = 64 * 1024


def get_state(app: Flask) -> Service:
    service: Service = app.extensions["fnserve"]
    return service


def create_app(config: Config, registry: Registry | None = None) -> Flask:
    state = Service(config, registry)
    for warning in state.registry.warnings:
        log.warning(warning)
    app = Flask("fnserve")
    app.extensions["fnserve"] = state
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # /function//etc/passwd names "/etc/passwd": a 404 like any bad name, not a 308
    # redirect to another name (set before the routes: each rule copies it when added)
    app.url_map.merge_slashes = False
    _add_routes(app, state)
    from .api.jobs import blueprint as jobs_blueprint  # it uses this module's request checks

    app.register_blueprint(jobs_blueprint)
    from .api.history import register as register_history  # it imports this module

    register_history(app, state)  # recording, /invocations, the dashboard at /
    from .api.lambda_ import lambda_api  # imports this module's request helpers

    app.register_blueprint(lambda_api)
    return app


# -- helpers of the invocation path ----------------------------------------------


def _check_auth(config: Config) -> None:
    if not config.api_key:
        return
    given = request.headers.get("X-API-Key")
    if not given:  # an empty X-API-Key must not hide a good Bearer token
        given = bearer_token(request.headers.get("Authorization", ""))
    if not same_key(given, config.api_key):  # constant time, any length
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


def _discard_body(environ: dict[str, Any], limit: int) -> None:
    """Read and drop at most `limit` + 1 bytes of an unread body, 64 KiB at a time."""
    stream = get_input_stream(environ, safe_fallback=True, max_content_length=None)
    left = limit + 1
    try:
        while left > 0 and (chunk := stream.read(min(_READ_CHUNK, left))):
            left -= len(chunk)
    except (OSError, ValueError):  # the client gave up: nothing more to do
        pass


def _admit_before_reading(limit: int) -> bool:
    """A body larger than ADMIT_FIRST_ABOVE, or of unknown size (chunked), is admitted
    (or refused 429) before it is read, so a refusal costs no upload; a smaller one
    is read first, keeping the SPEC's order of refusals (413, 400, then 429). A
    Content-Length over the limit is still a 413 first: it costs nothing to see."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    if length is None:
        return bool(request.headers.get("Transfer-Encoding"))
    return length > ADMIT_FIRST_ABOVE


def _is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _wait(run: Run, environ: dict[str, Any]) -> Result:
    """The result; if the client disconnects meanwhile, cancel the run (kills its group)."""
    sock = client_socket(environ)
    try:
        if sock is None:  # flask run, test client: no socket to watch
            return run.result()
        client = ClientWatch(sock, environ.get("SERVER_PROTOCOL", ""))
        run.hangup_fd = sock.fileno()  # an inline run watches it itself, and asks
        run.client_gone = client.hangup  # whether a hangup seen there is a disconnect
        while True:
            try:
                return run.result(timeout=DISCONNECT_POLL)
            except TimeoutError:
                if not run.cancelled and client.gone():
                    run.cancel()
    except BaseException:  # never let a function run on after its slot is given back
        run.cancel()
        raise


@functools.cache
def openapi_document() -> dict[str, Any]:
    """docs/openapi.yaml (shipped in the package as fnserve/openapi.yaml), parsed once."""
    text = (Path(__file__).parent / "openapi.yaml").read_text()
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def _response(outcome: Outcome) -> Response:
    response = Response(outcome.body, status=outcome.status, content_type=outcome.content_type)
    response.headers.update(outcome.headers)
    return response


# -- routes -----------------------------------------------------------------------


def _add_routes(app: Flask, state: Service) -> None:
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
        invocation = InvocationRequest(
            spec, b"", g.request_id, g.tracing,
            parameters={key: request.args[key] for key in request.args},
            forwarded=without_server_key(
                forwarded_env(request.headers.get, config.forward_headers),
                config.api_key or ""),
            method=request.method, received_at=g.started)
        slot = None
        if _admit_before_reading(config.max_body):
            reserved = state.reserve(invocation)
            if isinstance(reserved, Outcome):
                g.logged = True  # the service logged it
                refusal = _response(reserved)
                # after the answer is sent: a client that writes its whole body before
                # reading would otherwise get a reset instead of the 429
                refusal.call_on_close(functools.partial(_discard_body, request.environ,
                                                        config.max_body))
                return refusal
            slot = reserved
        try:
            event = _read_body(config.max_body)
            if not event:
                event = b"{}"
            elif _is_json_type(request.mimetype):
                try:
                    parse_json(event)
                except ValueError:
                    raise InvalidJSON() from None
            outcome = state.invoke(dataclasses.replace(invocation, event=event),
                                   watch=functools.partial(_wait, environ=request.environ),
                                   slot=slot)
        finally:
            if slot is not None:
                slot.release()  # a no-op once invoke() took it over
        g.logged = True  # the service logged it
        return _response(outcome)

    @app.after_request
    def invocation_headers(response: Response) -> Response:
        if request.endpoint != "invoke" or not hasattr(g, "started"):
            return response
        elapsed = time.monotonic() - g.started
        response.headers["X-Request-Id"] = g.request_id
        response.headers["traceparent"] = g.tracing.traceparent
        response.headers["X-Duration-Seconds"] = f"{elapsed:.6f}"
        return response

    def refused(error: FnServeError) -> Response:
        """A refusal before the service (401, 404, 413, 400...): the same Outcome mapping
        and the same log line as a run, never counted."""
        outcome = from_error(error, g.get("request_id"))
        if request.endpoint == "invoke" and hasattr(g, "started") and not g.get("logged"):
            g.logged = True
            log_invocation(outcome, function=g.function, request_id=g.request_id,
                           trace_id=g.tracing.trace_id, method=request.method, source="http",
                           received_at=g.started)
        return _response(outcome)

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
        return refused(error)

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
        return refused(FnServeError("internal error"))

