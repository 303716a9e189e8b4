"""The API key check, in constant time whatever the key given.

hmac.compare_digest does not stop at the first differing byte, but it returns at
once when the lengths differ, which tells a guesser the key's length. Both sides
are hashed first (SHA-256), so the comparison is always of 32 bytes against 32.
"""

from __future__ import annotations

import hashlib
import hmac


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(_digest(given), _digest(key))
