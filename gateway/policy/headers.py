"""Which headers pass, in which order, in each direction. No Flask imports."""

from __future__ import annotations

import re
from collections.abc import Iterable

from werkzeug.http import is_hop_by_hop_header

from ..errors import PolicyError

__all__ = [
    "check_header",
    "is_token",
    "client_headers",
    "connection_names",
    "readable_codings",
    "response_headers",
    "upstream_headers",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Printable latin-1 plus tab: what a WSGI server will write back without error.
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")

# Never taken from a client: credentials (ours go last), framing the gateway
# owns, and browser or hop details that describe the hop to us, not upstream.
_CLIENT_BLOCKED = frozenset(
    {
        "authorization",
        "x-api-key",
        "x-rapidapi-key",
        "host",
        "content-length",
        "cookie",
        "expect",
        "accept-encoding",
        "origin",
        "referer",
        "forwarded",
        "x-real-ip",
        # Honoured by some upstreams (Google APIs, Rails, Laravel, Express, IIS
        # rewrite) as the real method or path: they would defeat allowedMethods
        # and allowedPaths.
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    }
)
_CLIENT_BLOCKED_PREFIXES = ("proxy-", "sec-", "x-forwarded-")

# Never passed back: cookies (the gateway is not a session), headers the WSGI
# server writes itself, CORS (ours are set by the gateway), and host-wide rules
# an upstream has no business setting for the gateway's own domain.
_RESPONSE_BLOCKED = frozenset(
    {
        "set-cookie",
        "set-cookie2",
        "date",
        "server",
        "alt-svc",
        "strict-transport-security",
        "x-gateway-request-id",  # the gateway's own, added to every answer
    }
)


def is_token(name: str) -> bool:
    """Return whether ``name`` is a valid header name (an RFC 9110 token)."""
    return _TOKEN.fullmatch(name) is not None


def check_header(name: str, value: str) -> None:
    """Raise ``PolicyError("invalid_header")`` if ``name: value`` could split a request."""
    if not is_token(name):
        raise PolicyError("invalid_header", "holds a character not allowed in header names")
    if re.search(r"[\r\n\x00]", value):
        raise PolicyError("invalid_header", "value holds a line break or NUL", subject=name)
    if not _SAFE_VALUE.fullmatch(value):
        raise PolicyError(
            "invalid_header",
            "value holds a control character or a character outside Latin-1",
            subject=name,
        )
    if value != value.strip(" \t"):
        raise PolicyError("invalid_header", "value starts or ends with white space", subject=name)


def connection_names(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Return the lower-cased header names that ``Connection`` marks as hop-by-hop."""
    names: set[str] = set()
    for key, value in headers:
        if key.lower() == "connection":
            names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(names)


def _blocked_from_client(lower: str, extra: frozenset[str]) -> bool:
    return (
        lower in _CLIENT_BLOCKED
        or lower in extra
        or lower.startswith(_CLIENT_BLOCKED_PREFIXES)
        or is_hop_by_hop_header(lower)
    )


def client_headers(
    headers: Iterable[tuple[str, str]],
) -> list[tuple[str, str]]:
    """Return the client's headers that may go upstream; raise on an injection attempt."""
    headers = list(headers)
    for name, value in headers:
        check_header(name, value)
    extra = connection_names(headers)
    return [(k, v) for k, v in headers if not _blocked_from_client(k.lower(), extra)]


def upstream_headers(
    defaults: Iterable[tuple[str, str]],
    client: Iterable[tuple[str, str]],
    secrets: Iterable[tuple[str, str]],
    accept_encoding: str | None,
) -> dict[str, str]:
    """Merge headers in order: target defaults, client headers, then secrets (which win)."""
    merged: dict[str, tuple[str, str]] = {}
    for name, value in (*defaults, *client, *secrets):
        merged[name.lower()] = (name, value)
    # The caller decodes the body, so it alone says which encodings it takes.
    merged["accept-encoding"] = ("Accept-Encoding", accept_encoding or "identity")
    return dict(merged.values())


def readable_codings(accept_encoding: str | None, readable: tuple[str, ...]) -> str:
    """Return ``accept_encoding`` less the codings outside ``readable`` ("identity" if none)."""
    kept = []
    for item in (accept_encoding or "").split(","):
        coding = item.split(";", 1)[0].strip().lower()
        if coding in readable or coding == "identity":
            kept.append(item.strip())
    return ", ".join(kept) or "identity"


def _is_event_stream(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower() == "text/event-stream"
    return False


def _stream_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Ask proxies in front not to hold back or recompress an event stream.

    nginx buffers a proxied response unless ``X-Accel-Buffering: no``; caches,
    CDNs and Apache's proxy filters leave a ``no-transform`` response unchanged.
    The upstream's own Cache-Control directives are kept.
    """
    cache = [v for k, v in headers if k.lower() == "cache-control"]
    rest = [(k, v) for k, v in headers if k.lower() not in ("cache-control", "x-accel-buffering")]
    directives = ", ".join(cache)
    if "no-transform" not in directives.lower():
        directives = f"{directives}, no-transform" if directives else "no-transform"
    return [*rest, ("Cache-Control", directives), ("X-Accel-Buffering", "no")]


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the upstream response headers that go back to the client."""
    headers = list(headers)
    hop = connection_names(headers)
    passed = [
        (k, v)
        for k, v in headers
        if not (
            k.lower() in _RESPONSE_BLOCKED
            or k.lower() in hop
            or is_hop_by_hop_header(k)
            or k.lower().startswith("access-control-")
            or not is_token(k)
            or not _SAFE_VALUE.fullmatch(v)
        )
    ]
    return _stream_headers(passed) if _is_event_stream(passed) else passed
