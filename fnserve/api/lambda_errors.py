"""The Lambda API's error shapes (SPEC §9): status on the class, the name in X-Amzn-ErrorType.

botocore reads the error's name from the X-Amzn-ErrorType header and its message from
the body's `message`; the body is `{"Type": "User", "message": "..."}` as Lambda sends.
FnServe's own refusals raised on a Lambda route (404, 413, 429, ...) are translated by
`lambda_error_for`, so the checks themselves are shared with /function/<name>.
"""

from __future__ import annotations

from typing import Any

from ..errors import FnServeError, NotFound, PayloadTooLarge, TooManyRequests


class LambdaError(FnServeError):
    status = 500
    code = "internal"
    error_type = "ServiceException"
    kind = "Service"
    message = "An internal error occurred in FnServe."

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Amzn-ErrorType": self.error_type}

    def lambda_body(self) -> dict[str, Any]:
        return {"Type": self.kind, "message": str(self), **self.extra}


class ResourceNotFound(LambdaError):
    status = 404
    code = "not_found"
    error_type = "ResourceNotFoundException"
    kind = "User"
    message = "Function not found"


class InvalidRequestContent(LambdaError):
    status = 400
    code = "invalid_json"
    error_type = "InvalidRequestContentException"
    kind = "User"
    message = "Could not parse request body into json"


class InvalidParameterValue(LambdaError):
    status = 400
    code = "invalid_parameter"
    error_type = "InvalidParameterValueException"
    kind = "User"
    message = "Invalid parameter value"


class RequestTooLarge(LambdaError):
    status = 413
    code = "payload_too_large"
    error_type = "RequestTooLargeException"
    kind = "User"
    message = "Request must be smaller than 6291456 bytes for the InvokeFunction operation"


class TooManyLambdaRequests(LambdaError):
    status = 429
    code = "too_many_requests"
    error_type = "TooManyRequestsException"
    kind = "User"
    message = "Rate Exceeded."

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        super().__init__(message, Reason="ConcurrentInvocationLimitExceeded", **extra)

    @property
    def headers(self) -> dict[str, str]:
        return {**super().headers, "Retry-After": "1"}


class UnrecognizedClient(LambdaError):
    status = 403
    code = "unauthorized"
    error_type = "UnrecognizedClientException"
    kind = "User"
    message = "The security token included in the request is invalid."


class InvalidSignature(LambdaError):
    status = 403
    code = "unauthorized"
    error_type = "InvalidSignatureException"
    kind = "User"
    message = ("The request signature we calculated does not match the signature you "
               "provided. Check your AWS Secret Access Key and signing method.")


class ResourceConflict(LambdaError):
    """An Event whose request id (X-Request-Id) is that of a job still known."""

    status = 409
    code = "conflict"
    error_type = "ResourceConflictException"
    kind = "User"
    message = "A job with this request id exists."


class ServiceUnavailable(LambdaError):
    """Draining (SIGTERM): nothing ran, so an SDK's retry elsewhere is the right move."""

    status = 500
    code = "unavailable"
    message = "FnServe is shutting down."


def lambda_error_for(error: FnServeError, function_arn: str | None = None) -> LambdaError:
    """The Lambda shape of any FnServe error raised on a Lambda route."""
    if isinstance(error, LambdaError):
        return error
    if isinstance(error, NotFound):
        return ResourceNotFound(f"Function not found: {function_arn}" if function_arn
                                else "Function not found")
    if isinstance(error, PayloadTooLarge):
        return RequestTooLarge()
    if isinstance(error, TooManyRequests):
        return TooManyLambdaRequests()
    if error.code == "unavailable":
        return ServiceUnavailable()
    if error.code == "conflict":
        return ResourceConflict()
    if error.code == "queue_unavailable":  # nothing was queued: a retry is safe
        return LambdaError("The job queue is unavailable; the invocation was not queued.")
    if error.code == "invalid_json":
        return InvalidRequestContent()
    return LambdaError()
