"""AWS Signature Version 4 verification for the Lambda API (SPEC §9).

The server recomputes the signature a client made with the secret key: the same
canonical request (method, percent-encoded path, sorted query, the headers the
client named in SignedHeaders, the body's SHA-256), the same string to sign, the
same HMAC chain. botocore's own signer does that work, so the server canonicalises
exactly as boto3 and the aws CLI do instead of a second, hand-rolled copy of the
rules; only the choice of headers differs: exactly the request's SignedHeaders.
botocore is imported on first use (load_signer), so a server without --api-key
never pays for it.

Any region and any access key id are accepted (the key is the only secret);
the service must be `lambda` and X-Amz-Date within MAX_SKEW of the server's clock.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from calendar import timegm
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.awsrequest import AWSRequest

    from ._signer import ExactHeadersSigV4

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "lambda"
MAX_SKEW = 15 * 60  # seconds between X-Amz-Date and the server's clock
_AMZ_DATE = re.compile(r"(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z")
_FIELD = re.compile(r"\s*(Credential|SignedHeaders|Signature)=([^,\s]*)\s*")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_HEADER_LIST = re.compile(r"[a-z0-9-]+(;[a-z0-9-]+)*")


class Unsigned(Exception):
    """The request carries no AWS signature at all."""


class BadSignature(Exception):
    """A signature is there, but malformed, stale, for another service, or wrong."""


@dataclass(frozen=True)  # not slots: cached_property needs the instance __dict__
class SignedRequest:
    """What the verifier needs of an HTTP request, as it came over the wire."""

    method: str
    raw_path: str  # percent-encoded, exactly as sent (before the server decodes it)
    query: str  # the raw query string
    headers: Sequence[tuple[str, str]]
    body: bytes

    @functools.cached_property
    def _by_name(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        return index

    def header(self, name: str) -> str | None:
        values = self._by_name.get(name.lower())
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return self._by_name.get(name, [])


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str  # YYYYMMDD of the credential scope
    region: str
    signed_headers: tuple[str, ...]
    signature: str


def is_signed(authorization: str | None) -> bool:
    return (authorization or "").lstrip().startswith(ALGORITHM + " ")


def _parse_authorization(value: str) -> Authorization:
    scheme, _, rest = value.strip().partition(" ")
    if scheme != ALGORITHM:
        raise Unsigned()
    fields: dict[str, str] = {}
    for part in rest.split(","):
        match = _FIELD.fullmatch(part)
        if match is None or match.group(1) in fields:
            raise BadSignature("the Authorization header is malformed")
        fields[match.group(1)] = match.group(2)
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise BadSignature("the Authorization header is malformed")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
        raise BadSignature("the credential scope is malformed")
    access_key, date, region, service, _ = scope
    if service != SERVICE:
        raise BadSignature(f"the signature is for service {service[:40]!r}, not {SERVICE!r}")
    signed = fields["SignedHeaders"]
    if not _HEADER_LIST.fullmatch(signed) or "host" not in signed.split(";"):
        raise BadSignature("SignedHeaders must list lower-case names and include host")
    if not _SIGNATURE.fullmatch(fields["Signature"]):
        raise BadSignature("the signature is malformed")
    return Authorization(access_key, date, region, tuple(signed.split(";")),
                          fields["Signature"])


@functools.lru_cache(maxsize=64)
def signing_key(secret: str, date: str, region: str) -> bytes:
    """SigV4's derived key, HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
    "aws4_request"): the same for a day and region, so derived once, not per request."""
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, SERVICE, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def load_signer() -> tuple[type[ExactHeadersSigV4], type[AWSRequest]]:
    """botocore's signer and request classes, imported once, on first use."""
    from botocore.awsrequest import AWSRequest

    from ._signer import ExactHeadersSigV4

    return ExactHeadersSigV4, AWSRequest


def _timestamp(request: SignedRequest, scope_date: str, now: float) -> str:
    amz_date = request.header("X-Amz-Date")
    if not amz_date:
        raise BadSignature("X-Amz-Date is missing")
    match = _AMZ_DATE.fullmatch(amz_date)
    try:
        if match is None:
            raise ValueError(amz_date)
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        when = timegm(datetime(year, month, day, hour, minute, second).timetuple())
    except ValueError:
        raise BadSignature("X-Amz-Date is not a date like 20261201T120000Z") from None
    if amz_date[:8] != scope_date:
        raise BadSignature("the credential scope's date is not the day of X-Amz-Date")
    if abs(now - when) > MAX_SKEW:
        raise BadSignature(f"Signature expired: {amz_date} is not within 15 minutes of the "
                           f"server's time")
    return amz_date


def verify(request: SignedRequest, secret: str, now: float) -> None:
    """Return if `request` carries a valid SigV4 signature made with `secret`, else raise
    Unsigned (no signature) or BadSignature."""
    authorization = request.header("Authorization")
    if not authorization:
        raise Unsigned()
    parsed = _parse_authorization(authorization)
    timestamp = _timestamp(request, parsed.date, now)
    for name in parsed.signed_headers:
        if request.header(name) is None:
            raise BadSignature(f"signed header {name!r} is not in the request")
    host = request.header("Host") or "localhost"
    signer_class, request_class = load_signer()
    aws_request = request_class(method=request.method, url=f"http://{host}{request.raw_path}")
    aws_request.context["timestamp"] = timestamp
    signer = signer_class(secret, parsed, request)
    canonical = signer.canonical_request(aws_request)
    expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
    if not hmac.compare_digest(expected.encode(), parsed.signature.encode()):
        raise BadSignature("the signature does not match")
    declared = request.header("X-Amz-Content-SHA256")
    if declared not in (None, "UNSIGNED-PAYLOAD") and not hmac.compare_digest(
            declared.encode(), hashlib.sha256(request.body).hexdigest().encode()):
        raise BadSignature("X-Amz-Content-SHA256 is not the body's hash")
