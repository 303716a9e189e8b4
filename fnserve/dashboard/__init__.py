"""The dashboard at GET / (SPEC §10): one page, Jinja2 templates and a small plain-JS
file shipped in the package; no build step, nothing loaded from elsewhere.

The page polls /dashboard/api/state (functions, figures, recent invocations) and
invokes and replays through /dashboard/api/...: the dashboard's own routes, the only
ones its cookie opens (see session.py). The API routes keep asking for the key header.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
)

from ..app import _check_auth, get_state
from ..context import tracing_from
from ..errors import BadRequest, Forbidden, InvalidJSON, PayloadTooLarge
from ..listing import describe_registry
from ..outcome import Outcome, parse_json
from ..service import InvocationRequest, Service
from .session import (
    COOKIE,
    CSRF_HEADER,
    csrf_token,
    new_session,
    same_origin,
    session_nonce,
)

blueprint = Blueprint("dashboard", __name__, template_folder="templates",
                      static_folder="static", static_url_path="/dashboard/static")

RECENT = 30  # invocations the page lists
# the page loads nothing from elsewhere, and no other site may frame it (a replay
# button under someone else's page would be clickjacking)
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@blueprint.after_request
def page_headers(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
    return response


# -- who is asking ----------------------------------------------------------------------


def _nonce(service: Service) -> str | None:
    """The session of this browser (None without --api-key); Unauthorized if it has none,
    unless the request carries the key itself like any API client."""
    key = service.config.api_key
    if not key:
        return None
    nonce = session_nonce(key, request.cookies.get(COOKIE))
    if nonce is None:
        _check_auth(service.config)  # raises Unauthorized
    return nonce


def _check_csrf(service: Service, nonce: str | None, given: str | None) -> None:
    """State-changing requests: from this site, with the page's token."""
    if not same_origin(request.headers.get, request.host):
        raise Forbidden()
    key = service.config.api_key
    if key and nonce is None:
        return  # authenticated by the key header, which no other site can send
    if not given or not hmac.compare_digest(given, csrf_token(key, nonce)):
        raise Forbidden("missing or wrong CSRF token")


# -- the page -----------------------------------------------------------------------------


@blueprint.route("/", methods=["GET"])
def page() -> Any:
    service = get_state(current_app)
    key = service.config.api_key
    nonce = session_nonce(key, request.cookies.get(COOKIE)) if key else None
    if key and nonce is None:
        return render_template("login.html", error=None)
    return render_template("dashboard.html", csrf_token=csrf_token(key, nonce),
                           directory=str(service.config.functions_dir),
                           signed_in=nonce is not None)


@blueprint.route("/dashboard/login", methods=["POST"])
def login() -> Any:
    service = get_state(current_app)
    key = service.config.api_key
    if not same_origin(request.headers.get, request.host):
        raise Forbidden()
    if not key:
        return redirect("/", code=303)
    given = request.form.get("key", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               key.encode("utf-8", "surrogateescape")):
        return render_template("login.html", error="That is not this server's key."), 401
    response = redirect("/", code=303)
    response.set_cookie(COOKIE, new_session(key), httponly=True, samesite="Strict",
                        secure=request.is_secure, path="/")
    return response


@blueprint.route("/dashboard/logout", methods=["POST"])
def logout() -> Any:
    service = get_state(current_app)
    nonce = _nonce(service)
    _check_csrf(service, nonce, request.form.get("csrf_token"))
    response = redirect("/", code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return response


# -- what the page asks for ------------------------------------------------------------------


def _figures_from_stats(service: Service) -> dict[str, dict[str, Any]]:
    figures = {}
    for name, counters in service.stats.snapshot()["functions"].items():
        completed = counters["success_requests"] + counters["failed_requests"]
        figures[name] = {
            "invocations": counters["total_requests"],
            "errors": counters["failed_requests"],
            "error_rate": round(counters["failed_requests"] / completed, 4) if completed
            else None,
            "p50_ms": None, "p95_ms": None,  # the stats keep buckets, not durations
        }
    return figures


@blueprint.route("/dashboard/api/state", methods=["GET"])
def state() -> Any:
    from ..api.history import get_history

    service = get_state(current_app)
    _nonce(service)
    history = get_history(current_app)
    functions = describe_registry(service.registry, service.runtimes, service.config.timeout)
    if history.store is not None:
        figures = history.store.figures()
        recent = history.store.summaries(RECENT)
    else:
        figures, recent = _figures_from_stats(service), []
    for row in functions:
        row["figures"] = figures.get(row["name"], {"invocations": 0, "errors": 0,
                                                   "error_rate": None, "p50_ms": None,
                                                   "p95_ms": None})
    return {"functions": functions, "invocations": recent,
            "figures_from": "history" if history.enabled else "stats",
            "history": history.enabled, "history_max": history.max_records}


@blueprint.route("/dashboard/api/invocations/<request_id>", methods=["GET"])
def invocation(request_id: str) -> Any:
    from ..api.history import find_record

    _nonce(get_state(current_app))
    return find_record(request_id).to_json()


def _answer(outcome: Outcome, invocation: InvocationRequest, duration_ms: float) -> Response:
    body = {
        "status": outcome.status, "outcome": outcome.outcome,
        "content_type": outcome.content_type,
        "body": outcome.body.decode("utf-8", "replace"),
        "request_id": invocation.request_id, "duration_ms": round(duration_ms, 3),
    }
    response = make_response(json.dumps(body))
    response.content_type = "application/json"
    return response


@blueprint.route("/dashboard/api/invoke/<name>", methods=["POST"])
def invoke(name: str) -> Response:
    service = get_state(current_app)
    _check_csrf(service, _nonce(service), request.headers.get(CSRF_HEADER))
    spec = service.registry.get(name)
    form = request.get_json(silent=True)
    if not isinstance(form, dict):
        raise BadRequest("expected {\"event\": \"<JSON text>\", \"parameters\": {...}}")
    text = form.get("event") or ""
    parameters = form.get("parameters") or {}
    if not isinstance(text, str) or not isinstance(parameters, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parameters.items()):
        raise BadRequest("event must be text and parameters an object of strings")
    event = text.encode() if text.strip() else b"{}"
    if len(event) > service.config.max_body:
        raise PayloadTooLarge(f"request body is larger than {service.config.max_body} bytes")
    try:
        parse_json(event)
    except ValueError:
        raise InvalidJSON() from None
    started = time.monotonic()
    invocation = InvocationRequest(spec, event, str(uuid.uuid4()),
                                   tracing_from(request.headers.get), parameters=parameters,
                                   source="http", method="POST")
    outcome = service.invoke(invocation)
    return _answer(outcome, invocation, (time.monotonic() - started) * 1000)


@blueprint.route("/dashboard/api/replay/<request_id>", methods=["POST"])
def replay(request_id: str) -> Response:
    from ..api.history import find_record
    from ..api.history import replay as run_again

    service = get_state(current_app)
    _check_csrf(service, _nonce(service), request.headers.get(CSRF_HEADER))
    started = time.monotonic()
    outcome, invocation = run_again(service, find_record(request_id))
    return _answer(outcome, invocation, (time.monotonic() - started) * 1000)

