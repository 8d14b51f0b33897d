"""Reading a client's request body: within a size limit and a deadline, however it is framed.

Works on the WSGI environ, so it holds for gunicorn, Passenger and any other server.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from werkzeug.exceptions import ClientDisconnected

from ..errors import GatewayError

__all__ = ["read_body"]

_PIECE = 64 * 1024

try:  # The server's own parse errors (bad chunk framing, a forbidden trailer).
    from gunicorn.http.errors import ParseException as _FramingError
except ImportError:  # pragma: no cover - another WSGI server
    _FramingError = ValueError


class _Late(Exception):
    """The body deadline passed."""


def read_body(environ: dict[str, Any], limit: int, timeout: float) -> bytes:
    """Return the whole request body, or raise 413, 408 or 400 as a GatewayError.

    ``limit`` holds for any framing: a Content-Length over it is refused before
    reading, a chunked body is refused as soon as it passes it; nothing is
    forwarded either way. ``timeout`` is a deadline for the whole body, not per
    byte, so a client sending a byte at a time cannot hold a connection slot.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        if not length.isdigit():
            raise GatewayError("bad_request", "The Content-Length header is not a number.")
        expected = int(length)
        if expected > limit:
            raise _too_large()
    elif environ.get("wsgi.input_terminated"):
        expected = None  # chunked: read to the end, which the server marks
    else:
        return b""
    sock = environ.get("gunicorn.socket")
    deadline = time.monotonic() + timeout
    pieces, size = [], 0
    try:
        with _deadline(timeout):
            while expected is None or size < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Late
                if sock is not None:
                    # Other servers than gevent's: at least each wait is bounded.
                    sock.settimeout(remaining)
                want = _PIECE if expected is None else min(_PIECE, expected - size)
                piece = stream.read(want)
                if not piece:
                    break
                size += len(piece)
                if size > limit:
                    raise _too_large()
                pieces.append(piece)
    except (_Late, TimeoutError, OSError, ClientDisconnected):
        # The deadline stays on the socket: the server's drain of the rest fails fast too.
        raise GatewayError("request_timeout", "The request body did not arrive in time.") from None
    except _FramingError:
        raise GatewayError(
            "bad_request", "The request body's framing is broken (chunk sizes or trailers)."
        ) from None
    if expected is not None and size < expected:
        raise GatewayError("request_timeout", "The request body ended before its Content-Length.")
    return b"".join(pieces)


def _too_large() -> GatewayError:
    return GatewayError(
        "request_too_large", "The request body is larger than this gateway accepts."
    )


def _deadline(seconds: float) -> contextlib.AbstractContextManager[Any]:
    """Under gevent, cut the whole read at the deadline, however the server loops on recv."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return contextlib.nullcontext()
    # gevent's Timeout is itself the context: started on entry, cancelled on exit.
    return sys.modules["gevent"].Timeout(seconds, _Late)
