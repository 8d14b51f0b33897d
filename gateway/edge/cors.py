"""Which browser origins may call, and the CORS headers that say so. No Flask imports."""

from __future__ import annotations

from collections.abc import Iterable

from ..policy.access import METHODS
from ..policy.headers import is_token

__all__ = ["preflight_headers", "response_headers"]

# Named explicitly: a "*" in Allow-Headers never covers Authorization.
_ALWAYS_ALLOWED = ("Authorization", "Content-Type", "x-api-key")
# Response headers a page can read without being told (the CORS safelist).
_SAFELISTED = frozenset(
    {
        "cache-control",
        "content-language",
        "content-length",
        "content-type",
        "expires",
        "last-modified",
        "pragma",
    }
)
MAX_AGE = 600


def preflight_headers(origin: str, requested_headers: str | None) -> dict[str, str]:
    """Return the headers of a 204 answer to a preflight from an allowed ``origin``."""
    names = list(_ALWAYS_ALLOWED)
    seen = {name.lower() for name in names}
    for name in (requested_headers or "").split(","):
        name = name.strip()
        if is_token(name) and name.lower() not in seen:
            names.append(name)
            seen.add(name.lower())
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(METHODS),
        "Access-Control-Allow-Headers": ", ".join(names),
        "Access-Control-Max-Age": str(MAX_AGE),
    }


def response_headers(origin: str, present: Iterable[str]) -> dict[str, str]:
    """Return the CORS headers for an allowed ``origin``, exposing the headers ``present``."""
    headers = {"Access-Control-Allow-Origin": origin}
    exposed = sorted(
        {
            name
            for name in present
            if name.lower() not in _SAFELISTED and not name.lower().startswith("access-control-")
        }
    )
    if exposed:
        headers["Access-Control-Expose-Headers"] = ", ".join(exposed)
    return headers
