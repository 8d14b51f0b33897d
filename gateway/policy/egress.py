"""The egress guard: no configured secret reaches a client, in a header or a body.

Plain Python with no Flask imports. The body scan is a stage of the response
pipeline: it passes chunks on as they come, holding back only a tail that could
be the start of a secret (never the end of an SSE event), and raises
``SecretInResponse`` the moment a whole secret shows up.

How a secret may be written back, and the patterns that find it, are
``secret_forms``.
"""

from __future__ import annotations

import contextlib
import errno
import zlib
from collections.abc import Iterable, Iterator

from .secret_forms import GuardedSecrets, guarded_variants

__all__ = [
    "READABLE_CODINGS",
    "SecretInResponse",
    "SecretScanner",
    "guard_headers",
    "guarded_variants",
    "scan_body",
]

# The content codings the guard can decode to scan; the upstream is asked only for these.
READABLE_CODINGS = ("gzip", "deflate")


class SecretInResponse(ConnectionResetError):
    """A secret was found in a response; the client connection must be cut.

    A reset, like an upstream that breaks off, so a cut body never looks whole.
    """

    def __init__(self, where: str) -> None:
        super().__init__(errno.ECONNRESET, "a secret was found in the response")
        self.where = where


class UnreadableEncoding(Exception):
    """The upstream sent a content coding the guard cannot decode, so cannot check."""


def guard_headers(
    headers: Iterable[tuple[str, str]], secrets: GuardedSecrets
) -> tuple[list[tuple[str, str]], list[str]]:
    """Return the headers without those whose value holds a secret, and the dropped names."""
    headers = list(headers)
    # One search over all values ("\n" is in none), and one per value if that finds any.
    if not secrets.found_in(_header_bytes("\n".join(value for _, value in headers))):
        return headers, []
    kept, dropped = [], []
    for name, value in headers:
        if secrets.found_in(_header_bytes(value)):
            dropped.append(name)
        else:
            kept.append((name, value))
    return kept, dropped


def _header_bytes(value: str) -> bytes:
    """Return a header value as the bytes it came as (http.client decodes Latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


class SecretScanner:
    """Scans a byte stream fed in pieces; a secret split across pieces is still found."""

    def __init__(self, secrets: GuardedSecrets) -> None:
        self._secrets = secrets
        self._tail = b""  # the end of the text seen so far that could start a secret

    def feed(self, data: bytes) -> int:
        """Scan ``data``; return how many bytes at the end of all text fed could begin a secret.

        Those bytes are the ones held back from before, plus the end of ``data``.
        Raises ``SecretInResponse`` if a whole secret is now in view.
        """
        window = self._tail + data
        if self._secrets.found_in(window):
            raise SecretInResponse("body")
        held = self._secrets.begun(window)
        self._tail = window[len(window) - held :] if held else b""
        return held

    @property
    def held(self) -> int:
        """How many bytes at the end of the text so far could begin a secret."""
        return len(self._tail)


def scan_body(
    chunks: Iterator[bytes], secrets: GuardedSecrets, coding: str | None
) -> Iterator[bytes]:
    """Pass ``chunks`` on, cut with ``SecretInResponse`` before a secret would be sent.

    Plain bodies are scanned as they are; a gzip or deflate body is decoded on the
    side and the client still gets the original bytes. Only bytes that could start
    a secret are held back, until the next chunk shows whether they do.
    """
    scanner = SecretScanner(secrets)
    decoder = _decoder(coding)
    pending = b""  # received, scanned, not yet sent: it may be the start of a secret
    try:
        for chunk in chunks:
            if decoder is None:
                held = scanner.feed(chunk)
                data = pending + chunk
                pending = data[len(data) - held :] if held else b""
                out = data[: len(data) - held]
            else:
                try:
                    for text in decoder.pieces(chunk):
                        scanner.feed(text)
                except zlib.error:
                    pass  # not valid: the client's decoder fails on it as well
                held = scanner.held
                # Encoded bytes cannot be split where the text is: hold whole chunks.
                data = pending + chunk
                pending, out = (data, b"") if held else (b"", data)
            if out:
                yield out
        if decoder is not None:
            with contextlib.suppress(zlib.error):
                scanner.feed(decoder.flush())
        if pending:
            yield pending
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _decoder(coding: str | None):
    coding = (coding or "identity").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding == "gzip":
        return _Gzip()
    if coding == "deflate":
        return _Deflate()
    raise UnreadableEncoding(coding)


# Decoded text is scanned in pieces of at most this size, so a small compressed
# chunk that inflates to gigabytes (a zip bomb) never sits in memory at once.
_PIECE = 1024 * 1024


def _inflate(inner, data: bytes) -> Iterator[bytes]:
    while data:
        out = inner.decompress(data, _PIECE)
        if out:
            yield out
        data = inner.unconsumed_tail
        if not out and not data:
            return


class _Gzip:
    """gzip, with every member of a multi-member body (clients decode them all)."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        yield from _inflate(self._inner, data)
        while self._inner.eof and self._inner.unused_data:
            rest = self._inner.unused_data
            self._inner = zlib.decompressobj(16 + zlib.MAX_WBITS)
            yield from _inflate(self._inner, rest)

    def flush(self) -> bytes:
        return self._inner.flush()


class _Deflate:
    """HTTP "deflate" is zlib-wrapped, but some servers send raw deflate: take either."""

    def __init__(self) -> None:
        self._inner = None
        self._start = b""

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self._inner is None:
            self._start += data
            if len(self._start) < 2:
                return
            header = self._start[:2]
            zlib_header = (header[0] & 0x0F) == 8 and int.from_bytes(header, "big") % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
            data, self._start = self._start, b""
        yield from _inflate(self._inner, data)

    def flush(self) -> bytes:
        if self._inner is None:
            return b""
        return self._inner.flush()
