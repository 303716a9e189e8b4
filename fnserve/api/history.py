"""GET /invocations, GET /invocations/<id>, POST /invocations/<id>/replay (SPEC §10).

A blueprint over fnserve.history (reads) and Service.invoke (replay), with the same
auth as /functions. `register()` is the one call create_app makes: it opens the
history, hooks the recording listener into the service, and adds this blueprint
and the dashboard's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from ..app import _check_auth, _response, get_state
from ..context import tracing_from
from ..errors import BadRequest, NotFound
from ..history import DEFAULT_LIMIT, MAX_LIMIT, HistoryStore, Record
from ..outcome import Outcome
from ..recording import History, attach_history
from ..replay import check_replayable
from ..service import InvocationRequest, Service

blueprint = Blueprint("history", __name__)


def register(app: Flask, service: Service) -> History:
    history = attach_history(service)
    app.extensions["fnserve.history"] = history
    app.register_blueprint(blueprint)
    from ..dashboard import blueprint as dashboard

    app.register_blueprint(dashboard)
    return history


def get_history(app: Flask) -> History:
    history: History = app.extensions["fnserve.history"]
    return history


def _store_or_404() -> HistoryStore:
    store = get_history(current_app).store
    if store is None:
        raise NotFound("the history is off (the server runs with --history off)")
    return store


def find_record(request_id: str) -> Record:
    record = _store_or_404().get(request_id)
    if record is None:
        raise NotFound(f"no invocation {request_id[:128]!r} in the history")
    return record


def replay(service: Service, record: Record) -> tuple[Outcome, InvocationRequest]:
    """Run `record` again through the service: same function, event, parameters and
    method; a new request id; replay_of set. Headers were never stored, so none is
    forwarded."""
    check_replayable(record)
    spec = service.registry.get(record.function)
    invocation = InvocationRequest(
        spec, record.request or b"{}", str(uuid.uuid4()), tracing_from(request.headers.get),
        parameters=dict(record.parameters), source="replay", method=record.method,
        replay_of=record.request_id)
    return service.invoke(invocation), invocation


def invocation_response(outcome: Outcome, invocation: InvocationRequest) -> Response:
    """The Outcome with the headers every invocation response has (SPEC §3)."""
    response = _response(outcome)
    response.headers["X-Request-Id"] = invocation.request_id
    response.headers["traceparent"] = invocation.tracing.traceparent
    elapsed = time.monotonic() - invocation.received_at
    response.headers["X-Duration-Seconds"] = f"{elapsed:.6f}"
    return response


@blueprint.route("/invocations", methods=["GET"])
def list_invocations() -> Any:
    _check_auth(get_state(current_app).config)
    store = _store_or_404()
    try:
        limit = int(request.args.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise BadRequest("limit must be a number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    records, following = store.list(
        function=request.args.get("function") or None,
        outcome=request.args.get("outcome") or None,
        limit=limit, before=request.args.get("before") or None)
    return {"invocations": [record.to_json() for record in records], "next": following}


@blueprint.route("/invocations/<request_id>", methods=["GET"])
def show_invocation(request_id: str) -> Any:
    _check_auth(get_state(current_app).config)
    return find_record(request_id).to_json()


@blueprint.route("/invocations/<request_id>/replay", methods=["POST"])
def replay_invocation(request_id: str) -> Response:
    service = get_state(current_app)
    _check_auth(service.config)
    outcome, invocation = replay(service, find_record(request_id))
    return invocation_response(outcome, invocation)
