"""The AWS Lambda Invoke API (SPEC §9) as a Flask blueprint: boto3 and the aws CLI work
against FnServe with nothing changed but the endpoint URL.

    POST /2015-03-31/functions/<name>/invocations   Invoke
    GET  /2015-03-31/functions[/]                    ListFunctions
    GET  /2015-03-31/functions/<name>                GetFunction

An Invoke reads top to bottom like /function/<name>: auth (403) -> bounded body (413)
-> signature over that body (403) -> name (404) -> JSON payload and ClientContext (400)
-> the Service (admission 429, deadline, executor, stats, the log line with
source "lambda", history) -> the Outcome in Lambda's wire format. There is no second
executor path: only the translation in and out is Lambda's.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException

from ..app import _read_body, _wait, get_state
from ..config import Config
from ..context import forwarded_env, request_id_from, tracing_from
from ..credentials import same_key, without_server_key
from ..errors import FnServeError, NotFound, PayloadTooLarge
from ..outcome import Outcome, from_error, parse_json
from ..registry import FunctionSpec
from ..service import InvocationRequest, Service, log_invocation
from . import sigv4
from .lambda_errors import (
    InvalidParameterValue,
    InvalidRequestContent,
    InvalidSignature,
    LambdaError,
    RequestTooLarge,
    ResourceNotFound,
    UnrecognizedClient,
    lambda_error_for,
)
from .lambda_functions import LATEST, configuration, memory_size_mb, parse_function_name
from .lambda_results import FUNCTION_ERRORS, function_error, log_tail

log = logging.getLogger("fnserve.lambda")

PREFIX = "/2015-03-31/functions"
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
LOG_TYPES = ("None", "Tail")
DEFAULT_PAGE = 50
MAX_PAGE = 10000

lambda_api = Blueprint("lambda", __name__)


@lambda_api.record_once
def _load_signer(setup: BlueprintSetupState) -> None:
    # with a key, signed requests will come: import botocore now, not on the first one
    service: Service = setup.app.extensions["fnserve"]
    if service.config.api_key:
        sigv4.load_signer()


def _service() -> Service:
    return get_state(current_app)


# -- auth ---------------------------------------------------------------------------


def _key_header_ok(config: Config) -> bool:
    given = request.headers.get("X-API-Key")
    assert config.api_key is not None
    return given is not None and same_key(given, config.api_key)


def _check_auth_headers(config: Config) -> bool:
    """Before the body is read: refuse a request with no credential at all. True when the
    signature still has to be checked against the body."""
    if not config.api_key or _key_header_ok(config):
        return False
    if not sigv4.is_signed(request.headers.get("Authorization")):
        raise UnrecognizedClient()
    return True


def _verify_signature(config: Config, body: bytes) -> None:
    assert config.api_key is not None
    # the path as sent, still percent-encoded: it is what the client signed
    raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") \
        or request.full_path
    raw_path = urlsplit(raw_uri).path if "://" in raw_uri.split("?", 1)[0] \
        else raw_uri.split("?", 1)[0]  # absolute-form (a proxy's request line): its path
    signed = sigv4.SignedRequest(
        method=request.method, raw_path=raw_path,
        query=request.environ.get("QUERY_STRING", ""),
        headers=list(request.headers.items()), body=body)
    try:
        sigv4.verify(signed, config.api_key, time.time())
    except sigv4.Unsigned:
        raise UnrecognizedClient() from None
    except sigv4.BadSignature as exc:
        log.info("Lambda request refused: %s", exc)
        raise InvalidSignature(str(exc) if str(exc).startswith("Signature expired")
                               else None) from None


def _authenticated_body(config: Config) -> bytes:
    signed = _check_auth_headers(config)
    try:
        body = _read_body(config.max_body)
    except PayloadTooLarge:
        raise RequestTooLarge(f"Request must be smaller than {config.max_body} bytes for "
                              f"the InvokeFunction operation") from None
    if signed:
        _verify_signature(config, body)
    return body


def _forwarded(config: Config) -> dict[str, str]:
    """The forwarded headers, less any credential (SPEC §2): an AWS signature never
    reaches the function, nor the server's key."""
    env = without_server_key(forwarded_env(request.headers.get, config.forward_headers),
                             config.api_key or "")
    if sigv4.is_signed(request.headers.get("Authorization")):
        env.pop("HTTP_AUTHORIZATION", None)
    return env


# -- the request's parts ---------------------------------------------------------------


def _spec(service: Service, name: str) -> FunctionSpec:
    function = parse_function_name(name, request.args.get("Qualifier"))
    g.function = function.name[:140]
    g.function_arn = function.arn
    if not function.latest:
        raise ResourceNotFound(f"Function not found: {function.arn}")
    try:
        spec = service.registry.get(function.name)
    except NotFound:
        raise ResourceNotFound(f"Function not found: {function.arn}") from None
    g.function = spec.name
    return spec


def _choice(header: str, allowed: tuple[str, ...]) -> str:
    value = request.headers.get(header, allowed[0])
    if value not in allowed:
        raise InvalidParameterValue(f"{header} must be one of {', '.join(allowed)}, "
                                    f"not {value[:40]!r}")
    return value


def _client_context() -> Any:
    header = request.headers.get("X-Amz-Client-Context")
    if header is None:
        return None
    try:
        context = json.loads(base64.b64decode(header, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidRequestContent("Client context must be a valid Base64-encoded JSON "
                                    "object.") from None
    if not isinstance(context, dict):
        raise InvalidRequestContent("Client context must be a valid Base64-encoded JSON "
                                    "object.")
    return context


def _payload(body: bytes) -> bytes:
    if not body:
        return b"{}"
    try:
        parse_json(body)
    except ValueError:
        raise InvalidRequestContent("Could not parse request body into json: the payload "
                                    "is not valid JSON") from None
    return body


# -- routes ---------------------------------------------------------------------------


@lambda_api.before_request
def _start() -> None:
    g.started = time.monotonic()
    g.request_id = request_id_from(request.headers.get("X-Request-Id"))
    g.tracing = tracing_from(request.headers.get)


@lambda_api.route(f"{PREFIX}/<path:name>/invocations", methods=["POST"])
def invoke(name: str) -> Response:
    service = _service()
    config = service.config
    g.function = name[:140]
    body = _authenticated_body(config)
    spec = _spec(service, name)
    invocation_type = _choice("X-Amz-Invocation-Type", INVOCATION_TYPES)
    log_type = _choice("X-Amz-Log-Type", LOG_TYPES)
    event = _payload(body)
    invocation = InvocationRequest(
        spec, event, g.request_id, g.tracing, forwarded=_forwarded(config), source="lambda",
        method="POST", client_context=_client_context(), received_at=g.started)
    if invocation_type == "DryRun":
        return Response(status=204)
    if invocation_type == "Event":
        # queued (SPEC §11) like /async-function: the run's log line and history record
        # come when it runs; its request id is the x-amzn-RequestId answered now
        service.enqueue(invocation)
        g.logged = True
        return Response(status=202)
    outcome = service.invoke(invocation, watch=functools.partial(_wait,
                                                                 environ=request.environ))
    g.logged = True
    return _invoke_response(outcome, spec, config, tail=log_type == "Tail")


def _invoke_response(outcome: Outcome, spec: FunctionSpec, config: Config,
                     tail: bool) -> Response:
    deadline = spec.deadline(config.timeout)
    if outcome.outcome == "ok":
        response = Response(outcome.body, status=200, content_type=outcome.content_type)
    elif outcome.outcome in FUNCTION_ERRORS:
        body = function_error(outcome, g.request_id, deadline, config.max_output)
        response = Response(json.dumps(body), status=200, content_type="application/json")
        response.headers["X-Amz-Function-Error"] = "Unhandled"
    else:  # refused (429), draining (503) or a fault of FnServe: Lambda's error shapes
        error = outcome.error if outcome.error is not None else FnServeError()
        return _lambda_error_response(lambda_error_for(error))
    if tail:
        response.headers["X-Amz-Log-Result"] = log_tail(outcome, g.request_id, deadline,
                                                        memory_size_mb(spec))
    return response


@lambda_api.route(f"{PREFIX}", methods=["GET"])
@lambda_api.route(f"{PREFIX}/", methods=["GET"])
def list_functions() -> Any:
    service = _service()
    _authenticated_body(service.config)
    page = request.args.get("MaxItems", str(DEFAULT_PAGE))
    if not page.isdigit() or not 1 <= int(page) <= MAX_PAGE:
        raise InvalidParameterValue(f"MaxItems must be a number from 1 to {MAX_PAGE}")
    marker = request.args.get("Marker") or ""
    specs = sorted((spec for spec in service.registry if spec.name >= marker),
                   key=lambda spec: spec.name)
    shown, rest = specs[:int(page)], specs[int(page):]
    functions = [configuration(spec, service.runtimes[spec.runtime], service.config.timeout)
                 for spec in shown]
    # the marker is the next name to show: opaque to clients, stable across pages
    return {"Functions": functions, "NextMarker": rest[0].name if rest else None}


@lambda_api.route(f"{PREFIX}/<path:name>", methods=["GET"])
def get_function(name: str) -> Any:
    service = _service()
    _authenticated_body(service.config)
    spec = _spec(service, name)
    return {"Configuration": configuration(spec, service.runtimes[spec.runtime],
                                           service.config.timeout)}


# -- answers ----------------------------------------------------------------------------


def _lambda_error_response(error: LambdaError) -> Response:
    response = Response(json.dumps(error.lambda_body()), status=error.status,
                        content_type="application/json")
    response.headers.update(error.headers)
    return response


@lambda_api.after_request
def _lambda_headers(response: Response) -> Response:
    if hasattr(g, "request_id"):
        response.headers["x-amzn-RequestId"] = g.request_id
    if request.endpoint == "lambda.invoke" and hasattr(g, "started"):
        response.headers["X-Amz-Executed-Version"] = LATEST
        response.headers["X-Request-Id"] = g.request_id
        response.headers["traceparent"] = g.tracing.traceparent
        response.headers["X-Duration-Seconds"] = f"{time.monotonic() - g.started:.6f}"
    return response


@lambda_api.errorhandler(FnServeError)
def _refused(error: FnServeError) -> Response:
    """A refusal on a Lambda route, in Lambda's shape; an Invoke refused before the
    service still gets its one log line, never a count."""
    lambda_error = lambda_error_for(error, g.get("function_arn"))
    if request.endpoint == "lambda.invoke" and hasattr(g, "started") \
            and not g.get("logged"):
        g.logged = True
        log_invocation(from_error(error, g.request_id), function=g.get("function", ""),
                       request_id=g.request_id, trace_id=g.tracing.trace_id, method="POST",
                       source="lambda", received_at=g.started)
    return _lambda_error_response(lambda_error)


@lambda_api.errorhandler(Exception)
def _internal(error: Exception) -> Response:
    """Anything else raised on a Lambda route still answers in Lambda's shape, so botocore
    reads a name and a message rather than an HTML page."""
    if isinstance(error, HTTPException):  # werkzeug's own refusals (a malformed request)
        status = error.code or 500
        response = Response(json.dumps({"Type": "User" if status < 500 else "Service",
                                        "message": error.description or error.name}),
                            status=status, content_type="application/json")
        response.headers["X-Amzn-ErrorType"] = "InvalidRequestContentException" \
            if status < 500 else "ServiceException"
        return response
    log.exception("internal error on %s %s", request.method, request.path)
    return _refused(FnServeError("internal error"))
