"""Error pages: every refusal and failure answered in the one JSON error shape.

The codes and types are ``gateway.errors``; this module registers the Flask
handlers that turn them (and werkzeug's own errors) into responses. A
transparent call's refusal takes its dialect's shape (``dialect``), and every
refusal carries the headers the official SDKs read: the request id and whether
a retry can succeed.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import CODES, GatewayError, error_body, should_retry
from ..observe.record import ID_HEADER, request_id
from .dialect import call_dialect

__all__ = ["config_invalid_app", "init_app"]

log = logging.getLogger(__name__)


# The codes for errors werkzeug raises itself (routing, body size); any other
# client error is a plain bad_request, any other server error an internal_error.
_WERKZEUG_CODES = {
    CODES[code].status: code
    for code in (
        "bad_request",
        "not_found",
        "route_method_not_allowed",
        "request_too_large",
        "uri_too_long",
        "headers_too_large",
    )
}


def config_invalid_app(problems: list[str]) -> Callable[..., Iterable[bytes]]:
    """Return a WSGI app that answers every request ``503 config_invalid``; log ``problems``.

    For servers that import the app on the first request (Passenger, mod_wsgi):
    an import error there becomes the server's own HTML error page, which no API
    client can read. The problems go to stderr, the server's error log.
    """
    print(f"gateway: the config has {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    print("gateway: answering 503 config_invalid until it is fixed", file=sys.stderr, flush=True)
    status = CODES["config_invalid"].status
    status_line = f"{status} {HTTPStatus(status).phrase}"
    message = "The gateway's config is invalid; its error log lists the problems."

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        body = json.dumps(error_body("config_invalid", message, rid)).encode()
        start_response(
            status_line,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                (ID_HEADER, rid),
            ],
        )
        return [body]

    return app


# The headers each SDK reads its exception's ``request_id`` from (APIStatusError.__init__):
# openai/_exceptions.py reads x-request-id, anthropic/_exceptions.py reads request-id.
_SDK_ID_HEADERS = ("x-request-id", "request-id")


def _answer(
    code: str,
    message: str,
    fields: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
):
    """Return the JSON error response for ``code``, noting the code on the request's record."""
    record = g.record
    record.error = code
    response = jsonify(error_body(code, message, record.request_id, fields, _dialect()))
    response.status_code = CODES[code].status
    response.headers.update(headers or {})
    for name in _SDK_ID_HEADERS:
        response.headers[name] = record.request_id
    retry = should_retry(code, response.headers.get("Retry-After"))
    if retry is not None:
        response.headers["x-should-retry"] = "true" if retry else "false"
    return response


def _dialect() -> str:
    """Return the dialect of this request's refusal: its call's, for a transparent call."""
    call = g.get("transparent")
    if call is None:
        return "none"
    target = call.client.target.dialect if call.client is not None else None
    return call_dialect(target, request.path, request.headers.get("anthropic-version"))


def _gateway_error(exc: GatewayError):
    return _answer(exc.code, exc.message, exc.fields, exc.headers)


def _http_error(exc: HTTPException):
    status = exc.code or 500
    code = _WERKZEUG_CODES.get(status, "bad_request" if status < 500 else "internal_error")
    if code == "request_too_large":
        message = "The request body is larger than this gateway accepts."
    else:
        message = exc.description or exc.name
    response = _answer(code, message)
    # Keep Allow on a 405: clients use it to see what the route accepts.
    response.headers.extend([(k, v) for k, v in exc.get_headers() if k == "Allow"])
    return response


def _unexpected_error(exc: Exception):
    # Log where it happened, never the exception's text: it can hold header values.
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f"{frame.filename}:{frame.lineno}" if frame else "unknown"
    log.error("internal error (%s) at %s", type(exc).__name__, where)
    return _answer("internal_error", "The gateway failed to handle this request.")


def init_app(app: Flask) -> None:
    """Register the JSON error handlers on ``app``; give the gateway's loggers a handler."""
    logger = logging.getLogger("gateway")  # every module of the gateway logs below it
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] %(levelname)s in %(name)s: %(message)s")
        )
        logger.addHandler(handler)
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
