"""FnServe's errors. The HTTP status and the SPEC's error code live on the class.

One Flask error handler (app.py) turns any of these into the JSON error body;
the CLI maps the non-HTTP ones (ConfigError, UsageError) to exit code 2.
"""

from __future__ import annotations

from typing import Any

INVOKE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


class FnServeError(Exception):
    status = 500
    code = "internal"
    message = "internal error"
    # the word statistics, metrics, logs and history use (outcome.py); a refusal
    # before anything ran is logged under its code
    outcome = "internal"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "outcome" not in cls.__dict__:
            cls.outcome = cls.code

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        super().__init__(message or self.message)
        self.extra = extra

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": str(self), "code": self.code}
        if request_id:
            body["request_id"] = request_id
        body.update(self.extra)
        return body


class InvalidJSON(FnServeError):
    status = 400
    code = "invalid_json"
    message = "request body is not valid JSON"


class InvalidCallbackUrl(FnServeError):
    status = 400
    code = "invalid_callback_url"
    message = "X-Callback-Url is not an http or https URL"


class Unauthorized(FnServeError):
    status = 401
    code = "unauthorized"
    message = "missing or wrong API key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="fnserve"'}


class NotFound(FnServeError):
    status = 404
    code = "not_found"
    message = "no such function"


class MethodNotAllowed(FnServeError):
    status = 405
    code = "method_not_allowed"
    message = "method not allowed"

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(INVOKE_METHODS)}


class PayloadTooLarge(FnServeError):
    status = 413
    code = "payload_too_large"
    message = "request body too large"


class TooManyRequests(FnServeError):
    status = 429
    code = "too_many_requests"
    message = "too many requests"
    outcome = "rejected"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class FunctionFailed(FnServeError):
    status = 502
    code = "function_failed"
    message = "function failed"
    outcome = "failed"


class OutputTooLarge(FnServeError):
    status = 502
    code = "output_too_large"
    message = "function output too large"


class BuildFailed(FnServeError):
    status = 502
    code = "build_failed"
    message = "function does not build"


class InitFailed(FnServeError):
    """fork/warm mode: the module does not import, or has no handler (SPEC §8)."""

    status = 502
    code = "init_failed"
    message = "function failed to initialise"


class FunctionTimeout(FnServeError):
    status = 504
    code = "timeout"
    message = "function timed out"
    outcome = "timeout"


class ClientClosed(FnServeError):
    """The client went away; nobody reads this response, it is logged as 499."""

    status = 499
    code = "cancelled"
    message = "client closed the connection"
    outcome = "cancelled"


class Unavailable(FnServeError):
    status = 503
    code = "unavailable"
    message = "server is shutting down"
    outcome = "unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class JobExists(FnServeError):
    """An async invocation reused the request id of a job that is still known."""

    status = 409
    code = "conflict"
    message = "a job with this request id exists"


class QueueUnavailable(FnServeError):
    """The job queue (Redis) cannot be reached: the job was not queued."""

    status = 503
    code = "queue_unavailable"
    message = "the job queue is unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ConfigError(FnServeError):
    """A bad fnserve.toml, flag or FNSERVE_* variable: exit 2 at startup."""

    code = "config"


class UsageError(FnServeError):
    """A bad CLI argument (unknown function, bad --data): exit 2."""

    code = "usage"


class BadRequest(FnServeError):
    """A query parameter out of range (/invocations?limit=...)."""

    status = 400
    code = "bad_request"
    message = "bad request"


class NotReplayable(FnServeError):
    """The recorded request was cut at 64 KiB: running it again would not be a replay."""

    status = 409
    code = "not_replayable"
    message = "the recorded request body was truncated; it cannot be replayed"


class Forbidden(FnServeError):
    """A state-changing dashboard request without its CSRF token or from another site."""

    status = 403
    code = "forbidden"
    message = "cross-site request refused"
