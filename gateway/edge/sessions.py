"""``POST /sessions``: the app's server mints a browser session token for one of its users.

Thin: the signing is ``policy.sessions``. A blueprint of its own, so the CORS
hooks of the proxy routes never apply: minting is answered to servers only,
and a page that holds a client key cannot read a token minted with it.
"""

from __future__ import annotations

import json
import time

from flask import Blueprint, current_app, g, jsonify, request
from marshmallow import RAISE, Schema, ValidationError, fields

from ..config.load import GatewayConfig
from ..errors import GatewayError
from ..policy.access import parse_origin
from ..policy.sessions import PREFIX, check_user, format_ttl, parse_ttl, rfc3339
from .request_body import read_body
from .stages import client_by_key, client_key

__all__ = ["bp"]

bp = Blueprint("sessions", __name__)

# A mint request is a user id, an origin and a ttl: a few hundred bytes.
_MAX_BODY = 8192


def _checked(rule):
    def validate(value: str) -> None:
        try:
            rule(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    return validate


class MintSchema(Schema):
    """The body of ``POST /sessions``."""

    class Meta:
        unknown = RAISE

    user = fields.String(required=True, validate=_checked(check_user))
    origin = fields.String(required=True, validate=_checked(parse_origin))
    ttl = fields.String(validate=_checked(parse_ttl))


_schema = MintSchema()


@bp.post("/sessions")
def mint():
    """Mint a session token for a user of the calling client, on one of its origins."""
    config: GatewayConfig = current_app.extensions["gateway.config"]
    key = client_key()
    if key.startswith(PREFIX):
        raise GatewayError(
            "invalid_client_key",
            "A session token cannot mint sessions; the app's server mints them with its "
            "client key.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    client, _ = client_by_key(config, key)
    g.record.client = client.label
    if client.sessions is None or config.sessions is None:
        raise GatewayError(
            "sessions_not_allowed",
            "This client key may not mint session tokens; the operator can give its client "
            "a sessions: entry.",
        )
    data = _mint_request(config)
    origin = parse_origin(data["origin"])
    if not client.allows_origin(origin):
        raise GatewayError(
            "origin_not_allowed",
            "This client key may not mint session tokens for this origin; the operator can "
            "add it to the client's allowedOrigins.",
        )
    ttl = parse_ttl(data["ttl"]) if "ttl" in data else client.sessions.ttl
    if ttl > client.sessions.ttl:
        raise GatewayError(
            "invalid_session_request",
            "The ttl is longer than this client's sessions allow.",
            fields={"ttl": [f"must be at most {format_ttl(client.sessions.ttl)}"]},
        )
    session = config.sessions.mint(client.label, data["user"], origin, ttl, time.time())
    g.record.user = session.user
    answer = jsonify(
        token=config.sessions.token(session),
        user=session.user,
        origin=session.origin,
        expires=rfc3339(session.expires),
    )
    answer.status_code = 201
    answer.headers["Cache-Control"] = "no-store"
    return answer


def _mint_request(config: GatewayConfig) -> dict:
    """Read and check the body of a mint request."""
    if not request.is_json:
        raise GatewayError("invalid_json", "Send the request with Content-Type: application/json.")
    body = read_body(request.environ, _MAX_BODY, config.body_timeout)
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(None)  # read_body left its deadline on the socket
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise GatewayError("invalid_json", "The request body must be a JSON object.")
    try:
        return _schema.load(data)
    except ValidationError as exc:
        raise GatewayError(
            "invalid_session_request",
            "The session request has invalid fields.",
            fields=exc.messages,
        ) from None
