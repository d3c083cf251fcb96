"""API keys: `cmk_<key id>_<secret>`, random, shown once, stored only as a keyed hash.

The key id (16 hex digits, 64 bits) is public: it names the key in listings and revocations, and finds
its record. The secret (32 random bytes, base64url) is what proves the caller; chatmesh keeps only an
HMAC-SHA256 of the whole key under a server-side key (`api_key_pepper`), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "cmk_"
_KEY_PATTERN = re.compile(r"cmk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
# Longer than any well-formed key; a longer header is refused before any pattern matching.
MAX_KEY_CHARS = 128


def generate_key() -> tuple[str, str]:
    """A new (key id, whole key)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_key_id(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if len(key) > MAX_KEY_CHARS:
        return None
    match = _KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


class KeyHasher:
    """HMAC-SHA256 of whole keys under the pepper."""

    def __init__(self, pepper: str) -> None:
        self._mac = hmac.new(pepper.encode(), digestmod=hashlib.sha256)

    def __call__(self, key: str) -> str:
        mac = self._mac.copy()
        mac.update(key.encode())
        return mac.hexdigest()

    def matches(self, key: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self(key), stored_hash)
