"""The one error type and the one JSON error shape."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

__all__ = ["GatewayError", "error_body", "init_app"]

log = logging.getLogger("gateway")

# Stable codes for errors raised by Flask/werkzeug itself (routing, body size).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "route_method_not_allowed",
    413: "request_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


class GatewayError(Exception):
    """A refusal the client should see, with a stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict:
    """Return the JSON error shape: ``{"error", "message"}`` plus field errors if any."""
    body: dict[str, Any] = {"error": code, "message": message}
    if fields:
        body["fields"] = fields
    return body


def _gateway_error(exc: GatewayError):
    response = jsonify(error_body(exc.code, exc.message, exc.fields))
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def _http_error(exc: HTTPException):
    status = exc.code or 500
    code = _HTTP_CODES.get(status, f"http_{status}")
    if status == 413:
        message = "The request body is larger than this gateway accepts."
    else:
        message = exc.description or exc.name
    response = jsonify(error_body(code, message))
    response.status_code = status
    # Keep Allow on a 405: clients use it to see what the route accepts.
    response.headers.extend([(k, v) for k, v in exc.get_headers() if k == "Allow"])
    return response


def _unexpected_error(exc: Exception):
    # Log where it happened, never the exception's text: it can hold header values.
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f"{frame.filename}:{frame.lineno}" if frame else "unknown"
    log.error("internal error (%s) at %s", type(exc).__name__, where)
    response = jsonify(error_body("internal_error", "The gateway failed to handle this request."))
    response.status_code = 500
    return response


def init_app(app: Flask) -> None:
    """Register the JSON error handlers on ``app``; give the gateway's log a handler."""
    # Flask's logger is named after the app ("gateway", the name every module logs
    # under): touching it attaches Flask's stderr handler with time and level.
    app.logger.setLevel(logging.INFO)
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
