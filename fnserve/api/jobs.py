"""Async invocations over HTTP (SPEC §11): POST /async-function/<name>, GET /jobs/<id>.

The same checks as /function/<name>, in the same order (auth 401, name 404, body
size 413, body JSON 400), plus the X-Callback-Url; then the invocation goes to the
service's queue (429 when full) and the answer is 202 with its request id. What
happens to the run is counted, logged and recorded by Service.invoke when it runs.
"""

from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from ..callbacks import check_callback_url
from ..context import forwarded_env, request_id_from, tracing_from
from ..credentials import without_server_key
from ..errors import INVOKE_METHODS, FnServeError, InvalidJSON, MethodNotAllowed, NotFound
from ..outcome import from_error, parse_json
from ..service import InvocationRequest, Service, log_invocation

blueprint = Blueprint("jobs", __name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _service() -> Service:
    service: Service = current_app.extensions["fnserve"]
    return service


@blueprint.route("/async-function/", defaults={"name": ""}, methods=list(INVOKE_METHODS),
                 provide_automatic_options=False)
@blueprint.route("/async-function/<path:name>", methods=list(INVOKE_METHODS),
                 provide_automatic_options=False)
def enqueue(name: str) -> Any:
    from ..app import _check_auth, _is_json_type, _read_body

    service = _service()
    config = service.config
    g.started = time.monotonic()
    g.request_id = request_id_from(request.headers.get("X-Request-Id"))
    g.tracing = tracing_from(request.headers.get)
    g.function = name
    try:
        if request.method == "HEAD":  # Flask adds HEAD to GET routes: never queue for it
            raise MethodNotAllowed("HEAD does not invoke functions; use GET or POST")
        _check_auth(config)
        spec = service.registry.get(name)
        g.function = spec.name
        event = _read_body(config.max_body) or b"{}"
        if _is_json_type(request.mimetype):
            try:
                parse_json(event)
            except ValueError:
                raise InvalidJSON() from None
        callback_url = request.headers.get("X-Callback-Url")
        if callback_url is not None:
            check_callback_url(callback_url)
        service.queue.enqueue(InvocationRequest(
            spec, event, g.request_id, g.tracing,
            parameters={key: request.args[key] for key in request.args},
            forwarded=without_server_key(  # the server's key is not the function's
                forwarded_env(request.headers.get, config.forward_headers),
                config.api_key or ""),
            source="async", method=request.method), callback_url)
    except FnServeError as refusal:
        # one log line for a refused job, like a refused /function call; an accepted
        # job gets its line when it runs
        log_invocation(from_error(refusal, g.request_id), function=g.function,
                       request_id=g.request_id, trace_id=g.tracing.trace_id,
                       method=request.method, source="async",
                       received_at=g.started)
        raise
    return jsonify(request_id=g.request_id, status="queued"), 202


@blueprint.route("/jobs/<path:request_id>", methods=["GET"])
def job(request_id: str) -> Any:
    from ..app import _check_auth

    _check_auth(_service().config)
    g.request_id = request_id if _REQUEST_ID.fullmatch(request_id) else None
    if g.request_id is None:
        raise NotFound("no job with that request id")
    found = _service().queue.job(request_id)
    if found is None:
        raise NotFound(f"no job with request id {request_id!r}")
    return found


@blueprint.after_request
def request_headers(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers["X-Request-Id"] = request_id
    tracing = g.get("tracing")
    if tracing is not None:
        response.headers["traceparent"] = tracing.traceparent
    return response

