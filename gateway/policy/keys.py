"""Client keys: the ``gk_`` format and its checksum, SHA-256 items, validity windows.

Plain Python with no Flask imports. The gateway stores only the SHA-256 of a key
and looks a presented key up by that digest, so it never compares plaintext.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from ..errors import PolicyError

__all__ = [
    "KEY_PATTERN",
    "KeyItem",
    "checksum_ok",
    "instant",
    "is_key_item",
    "key_digest",
    "key_item",
    "new_key",
]

PREFIX = "gk_"
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
# 43 characters drawn uniformly from 62 carry 43 * log2(62) = 256.03 bits.
_RANDOM_CHARS = 43
# CRC32 of the random part in base62; 62**6 > 2**32, so six characters always hold it.
_CHECKSUM_CHARS = 6
# What a secret scanner looks for (docs/reference/cli.md gives it); checksum_ok confirms a match.
KEY_PATTERN = rf"\b{PREFIX}[0-9A-Za-z]{{{_RANDOM_CHARS + _CHECKSUM_CHARS}}}\b"
_ITEM = re.compile(r"sha256:([0-9a-f]{64})")


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode("ascii")), _CHECKSUM_CHARS)


def new_key() -> str:
    """Return a new client key: ``gk_``, 256 random bits in base62, a CRC32 checksum."""
    random_part = "".join(secrets.choice(_BASE62) for _ in range(_RANDOM_CHARS))
    return PREFIX + random_part + _checksum(random_part)


def checksum_ok(key: str) -> bool:
    """Return whether ``key`` has the ``gk_`` shape and its checksum matches."""
    if not re.fullmatch(KEY_PATTERN, key):
        return False
    random_part = key[len(PREFIX) : len(PREFIX) + _RANDOM_CHARS]
    return key[len(PREFIX) + _RANDOM_CHARS :] == _checksum(random_part)


def key_digest(key: str) -> bytes:
    """Return the digest a client key is looked up by (no timing leak on the key)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_item(key: str) -> str:
    """Return the config item that stands for ``key``: ``sha256:<hex>``."""
    return "sha256:" + key_digest(key).hex()


def is_key_item(text: str) -> bool:
    """Return whether ``text`` is a ``sha256:<64 lowercase hex>`` item."""
    return _ITEM.fullmatch(text) is not None


def instant(value: date | datetime | str) -> datetime:
    """Return ``value`` (ISO 8601 date or date-time) as an aware UTC datetime.

    A date means midnight UTC. A date-time must say its offset (``Z``,
    ``+02:00``): a bare one could mean any zone. Raise ``ValueError`` otherwise.
    """
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "must be an ISO 8601 date or date-time, e.g. 2027-01-31 or 2027-01-31T00:00:00Z"
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a date-time needs a UTC offset, e.g. 2027-01-31T00:00:00Z")
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    raise ValueError("must be an ISO 8601 date or date-time, e.g. 2027-01-31")


def _iso(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class KeyItem:
    """One key a client accepts: its digest, and when it is valid."""

    digest: bytes
    expires: datetime | None = None
    not_before: datetime | None = None
    plaintext: bool = False  # written as the client's map key, not as a hash

    def active(self, now: datetime) -> bool:
        """Return whether the key is valid at ``now``."""
        return (self.not_before is None or now >= self.not_before) and (
            self.expires is None or now < self.expires
        )

    def describe(self) -> str:
        """Say what kind of key this is and when it is valid (no digest, no key)."""
        parts = ["plaintext in the config" if self.plaintext else "sha256 item"]
        if self.not_before is not None:
            parts.append(f"valid from {_iso(self.not_before)}")
        if self.expires is not None:
            parts.append(f"expires {_iso(self.expires)}")
        return ", ".join(parts)

    def check(self, now: datetime) -> None:
        """Raise ``PolicyError`` unless the key is valid at ``now``."""
        if self.expires is not None and now >= self.expires:
            raise PolicyError("expired_client_key", f"expired at {_iso(self.expires)}")
        if self.not_before is not None and now < self.not_before:
            # Refused as unknown: a key handed out early must not work early.
            raise PolicyError("invalid_client_key", "is not valid yet")
