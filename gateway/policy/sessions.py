"""Browser sessions: short-lived ``gs_`` tokens bound to one client, one user and one origin.

Plain Python with no Flask imports. A token is stateless: ``gs_``, the base64url
of its claims (client, user, origin, issued, expires, key id) as JSON, a dot,
and the base64url of an HMAC-SHA256 of that text under the session secret. Any
gateway holding the secret checks it and nothing is stored, so it works across
workers and hosts. The key id names which of the secrets signed it: the first
secret signs, every listed one verifies (rotation), and none else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import PolicyError
from .limits import LimitSet

__all__ = [
    "MAX_TTL",
    "MIN_SECRET_LENGTH",
    "PREFIX",
    "TOKEN_PATTERN",
    "Session",
    "SessionKeys",
    "SessionPolicy",
    "check_user",
    "format_ttl",
    "parse_ttl",
    "rfc3339",
]

PREFIX = "gs_"
MAX_TTL = 24 * 3600  # a token outliving a day is a key, not a session
MIN_SECRET_LENGTH = 32
MAX_USER_LENGTH = 128
_MAX_TOKEN_LENGTH = 2048  # claims of a 128-character user and a long origin fit easily
# What a secret scanner (and the gateway's own log redaction) looks for.
TOKEN_PATTERN = rf"{PREFIX}[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{{43}}"
_TOKEN = re.compile(rf"{PREFIX}([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{{43}})")
_DURATION = re.compile(r"([1-9][0-9]{0,5})(s|m|h)")
_UNITS = {"s": 1, "m": 60, "h": 3600}
# Signed with the text: a MAC made for anything else never passes as a token's.
_CONTEXT = b"gateway-session-v1."
_CLAIMS = {"c": str, "u": str, "o": str, "i": int, "e": int, "k": str}


def parse_ttl(text: object) -> int:
    """Return the seconds of a duration such as ``"90s"``, ``"15m"``, ``"24h"``, or raise."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) * _UNITS[match.group(2)] > MAX_TTL:
        raise ValueError('must be a duration such as "90s", "15m" or "2h", at most 24h')
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_ttl(seconds: int) -> str:
    """Return ``seconds`` as the shortest duration text ``parse_ttl`` reads back."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_user(value: object) -> str:
    """Return ``value`` if it is a user id (1 to 128 printable characters), or raise."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_LENGTH:
        raise ValueError(f"must be 1 to {MAX_USER_LENGTH} characters")
    if not value.isprintable():
        raise ValueError("must hold printable characters only")
    return value


def rfc3339(epoch: int) -> str:
    """Return ``epoch`` seconds as an RFC 3339 UTC time, e.g. 2027-01-31T00:00:00Z."""
    return f"{datetime.fromtimestamp(epoch, UTC):%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class SessionPolicy:
    """A client's ``sessions:``: the longest token it mints, its per-user limits, its cut-off."""

    ttl: int
    limits: LimitSet = LimitSet()
    not_before: datetime | None = None  # tokens issued earlier are refused


@dataclass(frozen=True)
class Session:
    """What a valid token says: for which client, user and origin, and until when."""

    client: str
    user: str
    origin: str
    issued: int  # epoch seconds
    expires: int
    key_id: str

    @property
    def scope(self) -> str:
        """Return the limit scope of this session's user (client names hold no colon)."""
        return f"user:{self.client}:{self.user}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_id(secret: bytes) -> str:
    # Derived by the MAC, so it says nothing about the secret.
    return _b64(hmac.new(secret, b"gateway-session-key-id", hashlib.sha256).digest()[:6])


class SessionKeys:
    """The session secrets: the first signs new tokens, each one verifies."""

    def __init__(self, secrets: Sequence[str]) -> None:
        encoded = [secret.encode("utf-8") for secret in secrets]
        self._signing = encoded[0]
        self._by_id = {_key_id(secret): secret for secret in encoded}

    def __repr__(self) -> str:
        return f"SessionKeys({len(self._by_id)} secret(s))"  # never the secrets

    def mint(self, client: str, user: str, origin: str, ttl: int, now: float) -> Session:
        """Return a session for ``user`` of ``client`` on ``origin``, valid ``ttl`` seconds."""
        issued = int(now)
        return Session(client, user, origin, issued, issued + ttl, _key_id(self._signing))

    def token(self, session: Session) -> str:
        """Return the signed ``gs_`` token of ``session`` (signed with its key id's secret)."""
        claims = {"c": session.client, "u": session.user, "o": session.origin}
        claims |= {"i": session.issued, "e": session.expires, "k": session.key_id}
        text = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
        mac = hmac.new(self._by_id[session.key_id], _CONTEXT + text.encode(), hashlib.sha256)
        return f"{PREFIX}{text}.{_b64(mac.digest())}"

    def verify(self, token: str, now: float) -> Session:
        """Return the session ``token`` carries; raise ``PolicyError`` if forged or expired."""
        match = _TOKEN.fullmatch(token) if len(token) <= _MAX_TOKEN_LENGTH else None
        claims = _claims(match.group(1)) if match else None
        if claims is None:
            raise PolicyError("invalid_session_token", "is not a session token of this gateway")
        secret = self._by_id.get(claims["k"])
        if secret is None:
            raise PolicyError(
                "invalid_session_token", "was signed with a secret this gateway does not hold"
            )
        expected = hmac.new(secret, _CONTEXT + match.group(1).encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(match.group(2))):
            raise PolicyError("invalid_session_token", "has a signature that does not match")
        session = Session(
            claims["c"], claims["u"], claims["o"], claims["i"], claims["e"], claims["k"]
        )
        if now >= session.expires:
            raise PolicyError("expired_session_token", f"expired at {rfc3339(session.expires)}")
        return session


def _claims(text: str) -> dict | None:
    """Return the claims encoded in ``text`` if they have the token's shape, else None."""
    try:
        claims = json.loads(_unb64(text))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(claims, dict) or claims.keys() != _CLAIMS.keys():
        return None
    for name, kind in _CLAIMS.items():
        if type(claims[name]) is not kind:  # not bool for int
            return None
    return claims
