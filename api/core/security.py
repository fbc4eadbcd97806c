"""API keys: ``akl-<prefix>-<secret>``. Only sha256(key) is stored; the prefix finds the row and
``hmac.compare_digest`` compares the hashes. The secret has 256 random bits, so a fast hash is
enough (no password stretching needed). Keys never reach logs: only the prefix does."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_SCHEME = "akl"
PREFIX_BYTES = 6  # 12 hex characters
SECRET_BYTES = 32


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once to the operator
    prefix: str
    key_hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    prefix = secrets.token_hex(PREFIX_BYTES)
    key = f"{KEY_SCHEME}-{prefix}-{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(key=key, prefix=prefix, key_hash=hash_key(key))


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, else None."""
    parts = key.split("-", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or len(parts[1]) != 2 * PREFIX_BYTES or not parts[2]:
        return None
    if len(key) > 256:
        return None
    return parts[1]


def verify_key(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), key_hash)
