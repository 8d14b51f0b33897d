"""The one error type, the one JSON error shape, and the one table of error codes."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, NamedTuple

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from .record import ID_HEADER, request_id

__all__ = [
    "CODES",
    "GatewayError",
    "config_invalid_app",
    "error_body",
    "init_app",
    "markdown_table",
]

log = logging.getLogger(__name__)


class Code(NamedTuple):
    status: int
    meaning: str


# Every error code the gateway (and gunicorn, answering for it) can send: the
# contract clients code against. Raise sites, the OpenAPI document, the README's
# error list and gunicorn.conf.py's copy all come from (or are tested against) it.
CODES: dict[str, Code] = {
    "bad_request": Code(400, "a request gunicorn or werkzeug cannot parse"),
    "invalid_json": Code(400, "body is not a JSON object, or Content-Type is not JSON"),
    "invalid_envelope": Code(
        400, "unknown field or wrong type in the envelope (`fields` says which)"
    ),
    "invalid_path": Code(400, "path not a plain absolute path"),
    "invalid_header": Code(
        400, "a header name is not a token, or a value holds a control character"
    ),
    "body_not_allowed": Code(400, "a GET, HEAD or OPTIONS request carried a body"),
    "max_tokens_required": Code(
        400, "an LLM call (a JSON body with `model`) without `max_tokens` where a ceiling applies"
    ),
    "missing_client_key": Code(401, "no `Authorization: Bearer` (or `x-api-key`)"),
    "invalid_client_key": Code(
        401, "the key is not in the config, or not valid yet (`notBefore`); a hash is not a key"
    ),
    "expired_client_key": Code(401, "the key's `expires` has passed"),
    "invalid_metrics_token": Code(
        401, "`GET /metrics` without the metrics token (`metrics.tokenRef`)"
    ),
    "method_not_allowed": Code(403, "method outside `allowedMethods`"),
    "path_not_allowed": Code(403, "path outside `allowedPaths`"),
    "origin_not_allowed": Code(403, "browser `Origin` outside `allowedOrigins`"),
    "model_not_allowed": Code(403, "a `model` (body or query) outside `allowedModels`"),
    "max_tokens_not_allowed": Code(403, "`max_tokens` above the client's `maxTokens`"),
    "not_found": Code(404, "no such gateway route"),
    "route_method_not_allowed": Code(405, "e.g. `GET /proxy`"),
    "request_timeout": Code(408, "the request body did not arrive within `bodyTimeoutMs`"),
    "request_too_large": Code(413, "body over `maxRequestBytes`; nothing forwarded"),
    "uri_too_long": Code(414, "request line too long (answered by gunicorn)"),
    "headers_too_large": Code(431, "too many or too large request headers"),
    "rate_limited": Code(429, "over a `limits.requests` rate; see `Retry-After`"),
    "too_many_concurrent": Code(429, "over `limits.concurrent` calls in flight"),
    "quota_exhausted": Code(429, "the `limits.tokens` budget is spent; see `Retry-After`"),
    "internal_error": Code(500, "a gateway bug; the log says where, never with request data"),
    "not_implemented": Code(501, "a transfer coding gunicorn does not support"),
    "upstream_unreachable": Code(502, "could not connect to the upstream"),
    "upstream_error": Code(502, "the upstream closed the connection or sent a broken response"),
    "upstream_tls_error": Code(
        502, "the upstream's TLS certificate could not be verified, or the TLS handshake failed"
    ),
    "secret_in_response": Code(
        502, "the upstream's answer held a configured secret; nothing of it was sent"
    ),
    "config_invalid": Code(
        503,
        "the config is broken: under Passenger, every call until it is fixed "
        "(gunicorn does not start instead); the error log lists the problems",
    ),
    "limits_unavailable": Code(503, "the limit storage is unreachable (and `failOpen` is off)"),
    "upstream_timeout": Code(504, "connect or read timeout before the response started"),
}

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


class GatewayError(Exception):
    """A refusal the client should see: a code from ``CODES`` and a human message."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code)
        self.status = CODES[code].status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def error_body(
    code: str, message: str, request_id: str, fields: dict[str, Any] | None = None
) -> dict:
    """Return the JSON error shape: ``{"error", "message", "request_id"}``, field errors if any."""
    body: dict[str, Any] = {"error": code, "message": message, "request_id": request_id}
    if fields:
        body["fields"] = fields
    return body


def markdown_table() -> str:
    """Return the README's error table, one row per code, ordered by status."""
    rows = ["| status | `error` | when |", "| --- | --- | --- |"]
    for code, (status, meaning) in sorted(CODES.items(), key=lambda item: item[1].status):
        rows.append(f"| {status} | `{code}` | {meaning} |")
    return "\n".join(rows)


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


def _answer(code: str, message: str, fields: dict[str, Any] | None = None):
    """Return the JSON error response for ``code``, noting the code on the request's record."""
    record = g.record
    record.error = code
    response = jsonify(error_body(code, message, record.request_id, fields))
    response.status_code = CODES[code].status
    return response


def _gateway_error(exc: GatewayError):
    response = _answer(exc.code, exc.message, exc.fields)
    response.headers.update(exc.headers)
    return response


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
    logger = logging.getLogger(__package__)
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
