"""The stages that read and judge a call, up to the upstream request it becomes.

Each stage takes the ``Exchange``, fills in what it found, and refuses with a
GatewayError. A stage that takes something registers its release with
``exchange.hold``. The envelope and transparent modes differ only in the
stages that read the call (``envelope``/``envelope_call`` and
``transparent``/``transparent_body``).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

from flask import request
from marshmallow import ValidationError

from ..config.load import GatewayConfig
from ..errors import GatewayError, PolicyError
from ..policy import egress
from ..policy.access import Client, normalize_path
from ..policy.headers import client_headers, readable_codings, upstream_headers
from ..policy.keys import KeyItem
from ..policy.sessions import PREFIX as SESSION_PREFIX
from ..spend.admission import admit
from ..upstream.client import Call
from .envelope import encoded_body, encoded_query, load_envelope
from .exchange import Exchange
from .request_body import read_body

__all__ = [
    "authenticate",
    "client_by_key",
    "client_key",
    "envelope",
    "envelope_call",
    "judge_path",
    "outgoing",
    "record",
    "spend",
    "transparent",
    "transparent_body",
]

log = logging.getLogger(__name__)


def record(ex: Exchange) -> None:
    """Fill the request's Record from what the stages found, once every other hold is released."""
    ex.hold(lambda: _fill_record(ex))


def _fill_record(ex: Exchange) -> None:
    record = ex.record
    if ex.client is not None:
        record.client = ex.client.label
        record.target = ex.client.target.name
    if ex.session is not None:
        record.user = ex.session.user
    if ex.method is not None:
        record.method = ex.method
    if ex.path is not None:
        record.path = ex.path
    record.bytes_in = ex.bytes_in
    admission = ex.admission
    if admission is not None and admission.llm.model is not None:
        record.model = admission.llm.model
        if admission.meter is not None:
            record.input_tokens = admission.meter.input_tokens
            record.output_tokens = admission.meter.output_tokens
    if ex.error is not None:
        record.error = ex.error


def authenticate(ex: Exchange) -> None:
    """Find the client by its key (or session token), and check the web origin it calls from."""
    key = client_key()
    if key.startswith(SESSION_PREFIX):
        _authenticate_session(ex, key)
        return
    ex.client, ex.key = client_by_key(ex.config, key)
    ex.origin = request.headers.get("Origin")
    if ex.origin is not None and not ex.client.allows_origin(ex.origin):
        raise GatewayError(
            "origin_not_allowed",
            "This client key may not be used from this web origin; "
            "the operator can add it to the client's allowedOrigins.",
        )


def client_by_key(config: GatewayConfig, key: str) -> tuple[Client, KeyItem]:
    """Return the client whose key ``key`` is, and that key; refuse it as a GatewayError."""
    try:
        return config.client_for(key, datetime.now(UTC))
    except PolicyError as exc:
        if exc.subject is not None:
            # A known client's key outside its window: named, so an operator sees
            # who still holds a retired key (the key itself is never logged).
            log.warning("%s: a client key that %s was used", exc.subject, exc.reason)
        raise GatewayError(exc.code, f"The client key {exc.reason}.", headers=_INVALID) from None


_INVALID = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def _authenticate_session(ex: Exchange, token: str) -> None:
    """Check a session token's signature and expiry, and that the page is on its origin."""
    try:
        ex.client, ex.session = ex.config.session_for(token, datetime.now(UTC))
    except PolicyError as exc:
        raise GatewayError(exc.code, f"The session token {exc.reason}.", headers=_INVALID) from None
    ex.origin = request.headers.get("Origin")
    # Only a browser is held to its Origin header: without one the token is
    # refused, or a copied token would work from any script or server.
    if ex.origin is None or ex.origin.lower() != ex.session.origin:
        raise GatewayError(
            "origin_not_allowed",
            "This session token may be used only from the web page origin it was minted for.",
        )
    if not ex.client.allows_origin(ex.origin):
        raise GatewayError(
            "origin_not_allowed",
            "This session token's origin is no longer in its client's allowedOrigins.",
        )


def client_key() -> str:
    """Return the key or token the request carries, or refuse it ``missing_client_key``."""
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    if not auth and request.headers.get("X-Api-Key", "").strip():
        return request.headers["X-Api-Key"].strip()
    raise GatewayError(
        "missing_client_key",
        "Send your client key as Authorization: Bearer <client key>.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def policy_error(exc: PolicyError) -> GatewayError:
    """Phrase a policy refusal for the client that made the request."""
    if exc.code == "invalid_path":
        message = f"The path {exc.reason}; send a plain absolute path."
    elif exc.code == "invalid_header":
        if exc.subject:
            message = f"Header {exc.subject}: {exc.reason}."
        else:
            message = f"A header name {exc.reason}."
    else:
        message = f"This client key {exc.reason}."
    return GatewayError(exc.code, message)


# --- reading the call: transparent -----------------------------------------------------


def transparent(ex: Exchange) -> None:
    """Take the method and path of a call sent as it is, to ``/proxy/<path>``."""
    ex.method = request.method
    ex.raw_path = _raw_subpath()


def _raw_subpath() -> str:
    """Return the path after ``/proxy`` exactly as the client sent it (still encoded).

    WSGI servers decode PATH_INFO (``%2e%2e%2f`` becomes ``../``), so safety is
    judged on the raw request target instead.
    """
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        raw = quote(request.script_root + request.path, safe="/:@!$&'()*+,;=-._~")
    raw = raw.split("?", 1)[0]
    prefix = quote(request.script_root) + "/proxy/"
    if not raw.startswith(prefix):
        raise GatewayError("invalid_path", "The path must be written plainly after /proxy/.")
    return raw[len(prefix) - 1 :]


def transparent_body(ex: Exchange) -> None:
    """Read the body, query and headers of a call sent as it is."""
    ex.body = _read_body(ex) or None
    if ex.body is not None:
        _refuse_body_on(ex.method)
    ex.query = request.query_string.decode("latin-1")
    ex.headers = list(request.headers.items())


def _read_body(ex: Exchange) -> bytes:
    """Read the request body within ``maxRequestBytes`` and the ``bodyTimeoutMs`` deadline."""
    config = ex.config
    body = read_body(request.environ, config.max_request_bytes, config.body_timeout)
    ex.bytes_in = len(body)
    # From here the socket only sends: a client that stops reading the answer for
    # writeTimeoutMs is dropped, which frees its upstream connection. Once the
    # answer is over the server's own keep-alive wait applies again.
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(config.write_timeout)
        ex.hold(lambda: sock.settimeout(None))
    return body


def _refuse_body_on(method: str) -> None:
    # Upstreams that ignore a body on these methods would read it as the next
    # request on a shared upstream connection.
    if method in ("GET", "HEAD", "OPTIONS"):
        raise GatewayError("body_not_allowed", f"A {method} request cannot carry a body.")


# --- reading the call: the JSON envelope -----------------------------------------------


def envelope(ex: Exchange) -> None:
    """Read the JSON envelope that describes the call: its method and path first."""
    if not request.is_json:
        raise GatewayError("invalid_json", "Send the envelope with Content-Type: application/json.")
    body = _read_body(ex)
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise GatewayError("invalid_json", "The envelope must be a JSON object.")
    try:
        ex.envelope = load_envelope(data)
    except ValidationError as exc:
        raise _invalid_envelope(exc) from None
    ex.method = ex.envelope["method"]
    ex.raw_path = ex.envelope["path"]


def envelope_call(ex: Exchange) -> None:
    """Encode the envelope's query, headers and body as they go on the wire."""
    env = ex.envelope
    ex.headers = list(env.get("headers", {}).items())
    try:
        ex.query = encoded_query(env.get("query", {}))
        if env.get("body") is not None:
            ex.body = encoded_body(env["body"])
    except ValidationError as exc:
        raise _invalid_envelope(exc) from None
    if ex.body is not None:
        _refuse_body_on(ex.method)
        if not any(k.lower() == "content-type" for k, _ in ex.headers):
            ex.headers.append(("Content-Type", "application/json"))
    ex.parsed = env.get("body")


def _invalid_envelope(exc: ValidationError) -> GatewayError:
    return GatewayError("invalid_envelope", "The envelope has invalid fields.", fields=exc.messages)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e99999: Python reads it as inf, which is not JSON
        raise ValueError("a number too large for JSON")
    return value


# --- judging the call ------------------------------------------------------------------


def judge_path(ex: Exchange) -> None:
    """Normalize the path and check the client may call the method on it."""
    try:
        ex.path = normalize_path(ex.raw_path)
        ex.pattern = ex.client.check(ex.method, ex.path)
    except PolicyError as exc:
        raise policy_error(exc) from None


def spend(ex: Exchange) -> None:
    """Apply the client's model, ceiling and limit rules; hold its slot and reservation."""
    try:
        admission = admit(
            ex.client,
            ex.store,
            ex.config.fail_open,
            ex.path,
            ex.body,
            parse_qsl(ex.query, keep_blank_values=True),
            parsed=ex.parsed,
            session=ex.session,
        )
    except PolicyError as exc:
        if exc.code == "invalid_json":
            raise GatewayError("invalid_json", f"The request body {exc.reason}.") from None
        raise policy_error(exc) from None
    ex.admission = admission
    ex.hold(lambda: admission.finish(ex.status, sent=ex.sent))


def outgoing(ex: Exchange) -> None:
    """Build the upstream call: the client's headers filtered, the target's secrets added."""
    try:
        passed = client_headers(ex.headers)
    except PolicyError as exc:
        raise policy_error(exc) from None
    # The upstream gets the gateway's request id, so both logs name the call alike.
    passed.append(("X-Request-ID", ex.record.request_id))
    accept = request.headers.get("Accept-Encoding")
    if ex.admission.llm.model is not None:
        accept = "identity"  # the usage meter reads the answer as it passes
    elif ex.config.guarded:
        accept = readable_codings(accept, egress.READABLE_CODINGS)
    client = ex.client
    ex.call = Call(
        client=client,
        method=ex.method,
        path=ex.path,
        query=ex.query,
        headers=upstream_headers(
            client.target.default_headers, passed, client.secret_headers, accept
        ),
        body=ex.admission.body or ex.body,
    )
