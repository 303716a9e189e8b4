"""The dashboard's sign-in with --api-key: a cookie and a CSRF token, both derived from
the key, so every gunicorn worker (and a restarted server) accepts them without shared
state, and changing the key signs every browser out.

- cookie `fnserve_dashboard` = NONCE.MAC, MAC = HMAC-SHA256(key, "session:" NONCE):
  HttpOnly (no script reads it), SameSite=Strict (no other site's request carries it).
  Only the dashboard's routes read it: the API keeps asking for the header.
- the CSRF token = HMAC-SHA256(key, "csrf:" NONCE), written into the page; the page's
  state-changing requests send it in X-CSRF-Token (a custom header: another site cannot
  send one without a CORS preflight that this server never grants).

Without --api-key there is nothing to sign in to; the page's POSTs still need the
header (value "open") and a same-origin Origin / Sec-Fetch-Site.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

COOKIE = "fnserve_dashboard"
CSRF_HEADER = "X-CSRF-Token"
OPEN_TOKEN = "open"  # the CSRF header's value when the server has no key


def _mac(key: str, purpose: str, nonce: str) -> str:
    return hmac.new(key.encode("utf-8", "surrogateescape"), f"{purpose}:{nonce}".encode(),
                    hashlib.sha256).hexdigest()


def new_session(key: str) -> str:
    nonce = secrets.token_hex(16)
    return f"{nonce}.{_mac(key, 'session', nonce)}"


def session_nonce(key: str, cookie: str | None) -> str | None:
    """The nonce of a valid session cookie, else None."""
    if not cookie or "." not in cookie:
        return None
    nonce, _, mac = cookie.partition(".")
    if not hmac.compare_digest(mac.encode(), _mac(key, "session", nonce).encode()):
        return None
    return nonce


def csrf_token(key: str | None, nonce: str | None) -> str:
    if not key or nonce is None:
        return OPEN_TOKEN
    return _mac(key, "csrf", nonce)


def same_origin(header: Callable[[str], str | None], host: str) -> bool:
    """False for a request a browser marks as coming from another site."""
    fetch_site = header("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = header("Origin")
    if origin is not None and origin != "null":
        return origin.partition("://")[2] == host
    return origin != "null"
