"""botocore's SigV4 signer, made to verify (fnserve/api/sigv4.py imports this on first use).

Only the choices that differ from signing are overridden: exactly the headers the
client signed, the query from its decoded pairs, the body's hash as received, and
the derived key from sigv4's daily cache.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl, quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from .sigv4 import SERVICE, Authorization, SignedRequest, signing_key


class ExactHeadersSigV4(SigV4Auth):
    """botocore's SigV4 with exactly the headers the client signed, no more, no fewer."""

    def __init__(self, secret: str, authorization: Authorization,
                 request: SignedRequest) -> None:
        super().__init__(Credentials(authorization.access_key, secret), SERVICE,
                         authorization.region)
        self._secret = secret
        self._region = authorization.region
        self._signed_headers = authorization.signed_headers
        self._request = request
        self._query = parse_qsl(request.query, keep_blank_values=True)

    def canonical_query_string(self, request: AWSRequest) -> str:
        # from the decoded pairs, re-encoded and sorted as SigV4 (and botocore) define it
        pairs = sorted((quote(key, safe="-_.~"), quote(value, safe="-_.~"))
                       for key, value in self._query)
        return "&".join(f"{key}={value}" for key, value in pairs)

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name in self._signed_headers:
            for value in self._request.all(name):
                headers[name] = value
        return headers

    def payload(self, request: AWSRequest) -> str:
        # as botocore's client side: the declared X-Amz-Content-SHA256 (checked against the
        # body in verify), else the hash of the body as received
        declared = self._request.header("X-Amz-Content-SHA256")
        return declared if declared is not None else \
            hashlib.sha256(self._request.body).hexdigest()

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        key = signing_key(self._secret, request.context["timestamp"][:8], self._region)
        return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
