"""SigV4 verification (fnserve/api/sigv4.py) against requests signed by botocore's own
client-side signer, the one boto3 and the aws CLI use: what it signs must verify, and
any change to what it signed, or the wrong key, or a stale date, must not."""

from __future__ import annotations

import hashlib
import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fnserve.api.sigv4 import BadSignature, SignedRequest, Unsigned, is_signed, verify

SECRET = "k-sigv4-secret"
HOST = "127.0.0.1:8080"
ARN_PATH = ("/2015-03-31/functions/arn%3Aaws%3Alambda%3Aeu-west-1%3A123456789012%3Afunction"
            "%3Ahello/invocations")


def signed(path: str = "/2015-03-31/functions/hello/invocations", *, query: str = "",
           body: bytes = b'{"a": 1}', secret: str = SECRET, service: str = "lambda",
           region: str = "us-east-1", headers: dict[str, str] | None = None,
           method: str = "POST") -> SignedRequest:
    url = f"http://{HOST}{path}" + (f"?{query}" if query else "")
    aws = AWSRequest(method=method, url=url, data=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
    SigV4Auth(Credentials("AKIDEXAMPLE", secret), service, region).add_auth(aws)
    prepared = aws.prepare()
    pairs = [(name, value) for name, value in prepared.headers.items()]
    pairs.append(("Host", HOST))  # the HTTP client adds it on the wire
    parts = urlsplit(prepared.url)
    return SignedRequest(method, parts.path, parts.query, pairs, body)


def replace_header(request: SignedRequest, name: str, value: str) -> SignedRequest:
    headers = [(k, v) for k, v in request.headers if k.lower() != name.lower()]
    return SignedRequest(request.method, request.raw_path, request.query,
                         [*headers, (name, value)], request.body)


def test_what_botocore_signs_verifies() -> None:
    verify(signed(), SECRET, time.time())


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "local"])
def test_any_region_and_percent_encoded_arns_and_queries_verify(region: str) -> None:
    verify(signed(ARN_PATH, query="Qualifier=%24LATEST", region=region), SECRET, time.time())
    verify(signed("/2015-03-31/functions/", query="MaxItems=2&Marker=b%20c", method="GET",
                  body=b""), SECRET, time.time())


def test_an_unsigned_header_may_be_added_but_a_signed_one_not_changed() -> None:
    request = signed(headers={"X-Amz-Invocation-Type": "Event"})
    verify(SignedRequest(request.method, request.raw_path, request.query,
                         [*request.headers, ("User-Agent", "added by a proxy")], request.body),
           SECRET, time.time())
    with pytest.raises(BadSignature):
        verify(replace_header(request, "X-Amz-Invocation-Type", "RequestResponse"), SECRET,
               time.time())


def test_wrong_key_is_refused() -> None:
    with pytest.raises(BadSignature, match="does not match"):
        verify(signed(secret="another key"), SECRET, time.time())


@pytest.mark.parametrize("change", ["body", "path", "query", "method"])
def test_any_change_to_what_was_signed_is_refused(change: str) -> None:
    request = signed(query="Qualifier=%24LATEST")
    tampered = {
        "body": SignedRequest(request.method, request.raw_path, request.query,
                              request.headers, b'{"a": 2}'),
        "path": SignedRequest(request.method, request.raw_path.replace("hello", "other"),
                              request.query, request.headers, request.body),
        "query": SignedRequest(request.method, request.raw_path, "Qualifier=1",
                               request.headers, request.body),
        "method": SignedRequest("PUT", request.raw_path, request.query, request.headers,
                                request.body),
    }[change]
    with pytest.raises(BadSignature):
        verify(tampered, SECRET, time.time())


def test_a_date_more_than_15_minutes_away_is_refused() -> None:
    request = signed()
    verify(request, SECRET, time.time() + 14 * 60)
    for skew in (16 * 60, -16 * 60):
        with pytest.raises(BadSignature, match="Signature expired"):
            verify(request, SECRET, time.time() + skew)


def test_another_service_is_refused() -> None:
    with pytest.raises(BadSignature, match="service 's3'"):
        verify(signed(service="s3"), SECRET, time.time())


def test_unsigned_and_malformed_requests() -> None:
    request = signed()
    no_auth = SignedRequest(request.method, request.raw_path, request.query,
                            [(k, v) for k, v in request.headers if k != "Authorization"],
                            request.body)
    with pytest.raises(Unsigned):
        verify(no_auth, SECRET, time.time())
    with pytest.raises(Unsigned):
        verify(replace_header(request, "Authorization", f"Bearer {SECRET}"), SECRET,
               time.time())
    for bad in ("AWS4-HMAC-SHA256 Credential=x", "AWS4-HMAC-SHA256 Signature=zz, a=b",
                "AWS4-HMAC-SHA256 Credential=A/20260101/r/lambda/aws4_request, "
                "SignedHeaders=x-amz-date, Signature=" + "0" * 64):
        with pytest.raises(BadSignature):
            verify(replace_header(request, "Authorization", bad), SECRET, time.time())
    with pytest.raises(BadSignature, match="X-Amz-Date"):
        verify(replace_header(request, "X-Amz-Date", "yesterday"), SECRET, time.time())
    assert is_signed(dict(request.headers)["Authorization"])
    assert not is_signed(None) and not is_signed("Bearer x")


def test_a_declared_payload_hash_is_signed_and_checked_against_the_body() -> None:
    unsigned_payload = signed(headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    verify(unsigned_payload, SECRET, time.time())
    other = hashlib.sha256(b"another body").hexdigest()
    with pytest.raises(BadSignature, match="body's hash"):
        verify(signed(headers={"X-Amz-Content-SHA256": other}), SECRET, time.time())
    right = hashlib.sha256(b'{"a": 1}').hexdigest()
    verify(signed(headers={"X-Amz-Content-SHA256": right}), SECRET, time.time())
