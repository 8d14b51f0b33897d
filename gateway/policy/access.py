"""Who may call what: client keys, methods, path safety and patterns, origins.

Plain Python with no Flask imports, so every rule is testable without a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import PolicyError
from .limits import LimitSet

if TYPE_CHECKING:
    from .keys import KeyItem
    from .models import ModelPattern
    from .sessions import SessionPolicy

__all__ = [
    "METHODS",
    "Client",
    "PathPattern",
    "Target",
    "normalize_path",
    "parse_origin",
]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_PATH_LENGTH = 2048

# Percent-escapes of unreserved characters (RFC 3986 2.3) mean the same as the
# plain character; decoding them makes what we match exactly what we send.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
# Escapes we refuse outright: they decode to a separator, a dot, a percent sign
# (double encoding), a control character, or a byte outside ASCII (overlong
# UTF-8, unicode look-alikes of dots and slashes).
_REFUSED_ESCAPES = frozenset(b"/\\.%") | frozenset(range(0x20)) | frozenset(range(0x7F, 0x100))
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Everything a plain absolute path may hold: RFC 3986 pchar and "/", less "@".
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:%/]*")


def normalize_path(raw: str) -> str:
    """Return ``raw`` as a plain absolute path, or raise ``PolicyError("invalid_path")``.

    ``raw`` is the path exactly as the client wrote it (still percent-encoded).
    """

    def refuse(why: str) -> PolicyError:
        return PolicyError("invalid_path", why)

    if not raw.startswith("/"):
        raise refuse("must start with /")
    if len(raw) > MAX_PATH_LENGTH:
        raise refuse(f"is longer than {MAX_PATH_LENGTH} characters")
    if "?" in raw or "#" in raw:
        raise refuse("must not hold ? or #; put query parameters in query")
    if "\\" in raw:
        raise refuse("must not hold a backslash")
    if "@" in raw:
        raise refuse("must not hold @")
    if "//" in raw:
        raise refuse("must not hold an empty segment (//)")
    if not _PATH_CHARS.fullmatch(raw):
        raise refuse(
            "holds a space, a control character or a character that must be percent-encoded"
        )

    def decode(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        if byte in _REFUSED_ESCAPES:
            raise refuse(f"holds the escape %{match.group(1)}, which is not allowed")
        return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()

    if "%" in raw:
        if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
            raise refuse("holds a % that is not a percent-escape")
        raw = _ESCAPE.sub(decode, raw)
    for segment in raw.split("/")[1:]:
        # "..;x" is ".." to servlet containers: judge the part before ";".
        if segment and set(segment.split(";", 1)[0]) <= {"."} and segment[0] == ".":
            raise refuse("must not hold . or .. segments")
        # Windows servers (IIS) drop trailing dots and spaces: "..%20" and "x." would
        # become ".." and "x" there, after the gateway matched them as written.
        if segment.endswith((".", "%20")):
            raise refuse("must not hold a segment ending in a dot or a space")
    return raw


@dataclass(frozen=True)
class PathPattern:
    """An allowedPaths entry: exact segments, ``*`` for one segment, ``**`` for any."""

    text: str
    segments: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        """Return the pattern for ``text``, or raise ``ValueError`` saying what to write."""
        if not isinstance(text, str) or not text.startswith("/"):
            raise ValueError('must start with /; write "/**" to allow every path')
        if text == "/**":
            return cls(text, ("**",))
        literal = text.replace("*", "x")
        try:
            normalized = normalize_path(literal)
        except PolicyError as exc:
            raise ValueError(f"the pattern {exc.reason}") from None
        if normalized != literal:
            raise ValueError("write the pattern without percent-escapes of plain characters")
        segments = tuple(text.split("/")[1:])
        for segment in segments:
            if "*" in segment and segment not in ("*", "**"):
                raise ValueError("use * and ** only as whole segments, e.g. /models/* or /v1/**")
        if "/**/**" in text + "/":
            raise ValueError("write ** once: /**/** means the same as /**")
        return cls(text, segments)

    def matches(self, path: str) -> bool:
        """Return whether the normalized ``path`` is inside this pattern."""
        return _match(self.segments, path.split("/")[1:])


def _match(pattern: tuple[str, ...], parts: list[str]) -> bool:
    """Match segments against a pattern in O(len(pattern) * len(parts)) steps at most.

    The classic wildcard walk: on a mismatch, go back only to the latest ``**``
    and let it take one more segment. Earlier ``**`` never need retrying, so no
    pattern can make a path cost more than this product.
    """
    p = i = 0
    star_p, star_i = -1, 0
    while i < len(parts):
        if p < len(pattern) and pattern[p] == "**":
            star_p, star_i = p, i
            p += 1
        elif p < len(pattern) and (
            pattern[p] == parts[i] or (pattern[p] == "*" and parts[i] != "")
        ):
            p += 1
            i += 1
        elif star_p >= 0:
            star_i += 1
            p, i = star_p + 1, star_i
        else:
            return False
    while p < len(pattern) and pattern[p] == "**":
        p += 1
    return p == len(pattern)


def parse_origin(text: str) -> str:
    """Return ``text`` as a browser origin (``scheme://host[:port]``) or raise ``ValueError``."""
    match = re.fullmatch(r"(https?)://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?", text)
    if not match:
        raise ValueError(
            'must be an exact origin such as "https://app.example.com" '
            '(scheme, host and optional port; no path or trailing slash), or "*"'
        )
    return text.lower()


@dataclass(frozen=True)
class Target:
    """An upstream API: where calls go, the headers every call carries, what TLS it trusts.

    The TLS paths are absolute: ``ca_bundle`` replaces the default trust store for
    this target only; ``client_cert`` (with ``client_key``, unless the key is in
    the same file) is presented to upstreams that require mutual TLS.
    """

    name: str
    base_url: str
    default_headers: tuple[tuple[str, str], ...] = ()
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    limits: LimitSet = LimitSet()  # all clients of this target together
    inject_usage: bool = True  # ask OpenAI-style streams for usage when a budget applies


@dataclass(frozen=True)
class Client:
    """One client's policy. ``label`` names it in logs and messages, never by its key."""

    label: str
    target: Target
    secret_headers: tuple[tuple[str, str], ...] = field(repr=False)
    methods: frozenset[str]
    paths: tuple[PathPattern, ...]
    origins: frozenset[str] = frozenset()
    read_timeout: float = 30.0
    connect_timeout: float = 5.0
    keys: tuple[KeyItem, ...] = field(default=(), repr=False)
    limits: LimitSet = LimitSet()
    models: tuple[ModelPattern, ...] = ()  # allowedModels; empty: any model
    max_tokens: int | None = None
    sessions: SessionPolicy | None = None  # may mint browser session tokens

    def check(self, method: str, path: str) -> PathPattern:
        """Return the pattern that allows ``method`` on the normalized ``path``, or raise."""
        if "*" not in self.methods and method not in self.methods:
            raise PolicyError("method_not_allowed", f"may not use {method}")
        for pattern in self.paths:
            if pattern.matches(path):
                return pattern
        raise PolicyError("path_not_allowed", "may not call this path")

    def allows_origin(self, origin: str) -> bool:
        """Return whether a browser page on ``origin`` may use this client key."""
        return "*" in self.origins or origin.lower() in self.origins
