"""The server's own credential (SPEC §2, §3): checked in constant time, never forwarded.

`--api-key` authenticates a request to FnServe; the header that carried it is
FnServe's, not the function's, so it is taken out of the forwarded headers. Any other
value of the same headers (a function's own bearer token, another key) goes through.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from .context import header_env_name

_API_KEY_ENV = header_env_name("X-API-Key")
_AUTHORIZATION_ENV = header_env_name("Authorization")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def same_key(given: str, key: str) -> bool:
    """Constant time whatever `given` is: hmac.compare_digest does not stop at the first
    differing byte, but returns at once when the lengths differ, which would tell a
    guesser the key's length; so both sides are hashed first, 32 bytes against 32."""
    return hmac.compare_digest(_digest(given), _digest(key))


def bearer_token(authorization: str) -> str:
    """The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), else ""."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def without_server_key(forwarded: Mapping[str, str], key: str) -> dict[str, str]:
    """The forwarded header env minus any header that carried the server's key."""
    env = dict(forwarded)
    if not key:
        return env
    if _API_KEY_ENV in env and same_key(env[_API_KEY_ENV].strip(), key):
        del env[_API_KEY_ENV]
    if _AUTHORIZATION_ENV in env and same_key(bearer_token(env[_AUTHORIZATION_ENV]), key):
        del env[_AUTHORIZATION_ENV]
    return env
