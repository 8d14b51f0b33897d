"""A Record for every request: opened before Flask sees it, closed when the response ends.

The outermost WSGI layer of the app, so every answer counts (refusals, 404s,
``/health``, errors raised anywhere) and ``close()`` is the one place a
response ends, however it ends: WSGI servers call it on completion, on a
client gone, and on error alike. It also gives each answer its request id.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from ..policy.keys import KEY_PATTERN, PREFIX
from ..policy.sessions import PREFIX as SESSION_PREFIX
from ..policy.sessions import TOKEN_PATTERN
from .record import ID_HEADER, Observers, Record, request_id

__all__ = ["init_app"]

_ENVIRON_KEY = "gateway.record"


class _Recorder:
    """WSGI middleware: open a Record per request, close it when the body is closed."""

    def __init__(self, app: Callable[..., Iterable[bytes]], observers: Observers) -> None:
        self.app = app
        self.observers = observers

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        record = Record(
            request_id(environ.get("HTTP_X_REQUEST_ID")),
            environ.get("REMOTE_ADDR"),
            environ.get("REQUEST_METHOD", ""),
            self.observers,
        )
        environ[_ENVIRON_KEY] = record
        header = (ID_HEADER, record.request_id)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            record.status = int(status[:3])
            return start_response(status, [*headers, header], exc_info)

        try:
            body = self.app(environ, start)
        except BaseException:
            record.finish()
            raise
        return _Observed(body, record)


class _Observed:
    """The response body as the server sends it: counts what went out, then closes the record."""

    def __init__(self, body: Iterable[bytes], record: Record) -> None:
        self._body = body
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        record = self._record
        for chunk in self._body:
            if record.ttfb is None and chunk:
                record.ttfb = time.monotonic() - record.started
            yield chunk
            # Counted once the server asks for more: the chunk was written.
            record.bytes_out += len(chunk)

    def close(self) -> None:
        record = self._record
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()  # ends the response pipeline first: its stages fill the record in
        finally:
            if record.ttfb is None:
                record.ttfb = time.monotonic() - record.started
            record.finish()


_PATH_LOGGED = 1024  # characters of a path kept in the record
_KEY = re.compile(KEY_PATTERN)
_TOKEN = re.compile(TOKEN_PATTERN)


def _expose_record() -> None:
    record = g.record = request.environ[_ENVIRON_KEY]
    # The path as the client asked for it, so an operator sees what was probed;
    # never the query (where keys are pasted), and bounded, as the request line
    # may be long. The edge replaces it with the normalized upstream path once
    # it has one.
    path = request.path[:_PATH_LOGGED]
    if PREFIX in path:  # a gk_ client key pasted into the path is never logged
        path = _KEY.sub(PREFIX + "[redacted]", path)
    if SESSION_PREFIX in path:  # nor a gs_ session token
        path = _TOKEN.sub(SESSION_PREFIX + "[redacted]", path)
    record.path = path


def init_app(app: Flask) -> None:
    """Wrap ``app`` so every request gets a Record (``g.record``) and a request id.

    ``trustedProxies`` from the config says how many ``X-Forwarded-For`` hops
    to believe for the client's address (werkzeug's ProxyFix); with 0 they are
    ignored. Observers register in ``app.extensions["gateway.observers"]``.
    """
    observers = Observers()
    app.extensions["gateway.observers"] = observers
    app.wsgi_app = _Recorder(app.wsgi_app, observers)
    trusted = app.extensions["gateway.config"].trusted_proxies
    if trusted:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=trusted, x_proto=trusted)
    app.before_request_funcs.setdefault(None, []).insert(0, _expose_record)
