"""The HTTP edge: ``POST /proxy``, ``/proxy/<path>`` and ``GET /health``.

Thin on purpose: parse the request, ask the policy, forward, shape the response.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

from flask import Blueprint, Response, after_this_request, current_app, g, request
from marshmallow import ValidationError
from werkzeug.routing import PathConverter

from ..config.load import GatewayConfig
from ..errors import GatewayError, PolicyError
from ..observe.record import Record
from ..policy import egress
from ..policy.access import METHODS, Client, normalize_path
from ..policy.headers import client_headers, readable_codings, response_headers, upstream_headers
from ..spend.admission import Admission, admit
from ..spend.calls import NOT_PARSED
from ..spend.meter import UsageMeter, metered
from ..upstream.client import Call, UpstreamBroke, body_chunks, prepare
from . import cors
from .envelope import EnvelopeSchema, encoded_body, encoded_query
from .request_body import read_body

__all__ = ["bp"]

bp = Blueprint("gateway", __name__)

# The WSGI environ key under which ``flask explain`` hands a request its Explanation.
EXPLAIN = "gateway.explain"
log = logging.getLogger(__name__)


def _note(step: str, text: str) -> None:
    explanation = request.environ.get(EXPLAIN)
    if explanation is not None:
        explanation.note(step, text)


@bp.record_once
def _register_converter(state) -> None:
    state.app.url_map.converters["anything"] = AnythingConverter


_envelope_schema = EnvelopeSchema()


class AnythingConverter(PathConverter):
    """Like ``path``, but also matches a leading slash, so "//host" can be refused."""

    regex = ".+"
    part_isolating = False


class UpstreamResponse(Response):
    # An upstream response without Content-Type must stay without one.
    default_mimetype = None


def _policy_error(exc: PolicyError) -> GatewayError:
    """Phrase a policy refusal for the client that made the request."""
    if exc.code == "invalid_path":
        message = f"The path {exc.reason}; send a plain absolute path."
    elif exc.code == "invalid_header":
        message = (
            f"Header {exc.subject}: {exc.reason}."
            if exc.subject
            else (f"A header name {exc.reason}.")
        )
    else:
        message = f"This client key {exc.reason}."
    return GatewayError(exc.code, message)


def _config() -> GatewayConfig:
    return current_app.extensions["gateway.config"]


def _client_key() -> str:
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


def _authenticate() -> Client:
    try:
        client, item = _config().client_for(_client_key(), datetime.now(UTC))
    except PolicyError as exc:
        if exc.subject is not None:
            # A known client's key outside its window: named, so an operator sees
            # who still holds a retired key (the key itself is never logged).
            log.warning("%s: a client key that %s was used", exc.subject, exc.reason)
        raise GatewayError(
            exc.code,
            f"The client key {exc.reason}.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    _note("client", client.label)
    _note("key", item.describe())
    g.record.client = client.label
    g.record.target = client.target.name
    origin = request.headers.get("Origin")
    if origin is not None:
        if not client.allows_origin(origin):
            raise GatewayError(
                "origin_not_allowed",
                "This client key may not be used from this web origin; "
                "the operator can add it to the client's allowedOrigins.",
            )
        _note("origin", f"{origin} is in allowedOrigins")
    return client


@bp.before_request
def _answer_preflight():
    """Answer a CORS preflight before any key check: browsers send it without credentials."""
    origin = request.headers.get("Origin")
    if request.method != "OPTIONS" or origin is None:
        return None
    if "Access-Control-Request-Method" not in request.headers:
        return None
    response = Response(status=204)
    response.vary.add("Origin")
    if _config().any_client_allows(origin):
        requested = request.headers.get("Access-Control-Request-Headers")
        response.headers.update(cors.preflight_headers(origin, requested))
    return response


@bp.after_request
def _add_cors_headers(response: Response) -> Response:
    """Let a page read the answer if some client allows its origin.

    An upstream's answer only ever reaches a page its own client allows (any
    other origin is refused before forwarding), and a refusal (401, 403) must be
    readable by any page some client allows, or its developer sees only
    "Failed to fetch".
    """
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Allow-Origin" in response.headers:
        return response
    response.vary.add("Origin")
    if _config().any_client_allows(origin):
        response.headers.update(cors.response_headers(origin, response.headers.keys()))
    return response


def _allowed_path(client: Client, method: str, raw_path: str) -> str:
    """Return the normalized path if ``client`` may call ``method`` on it; raise otherwise."""
    g.record.method = method
    try:
        path = normalize_path(raw_path)
        g.record.path = path
        pattern = client.check(method, path)
    except PolicyError as exc:
        raise _policy_error(exc) from None
    _note("method", f"{method} is in allowedMethods")
    _note("path", f"{path} matches allowedPaths pattern {pattern.text}")
    return path


# Failures that show the upstream never got the call: its token reservation returns whole.
_NOT_SENT = frozenset({"upstream_unreachable", "upstream_tls_error"})


def _forward(call: Call, admission: Admission) -> Response:
    """Send ``call`` and answer with the upstream's response, through the response pipeline.

    The pipeline: upstream chunks -> egress scan -> usage meter -> client. Whatever
    ends the response, ``admission.finish`` runs once (slot freed, tokens settled).
    """
    explanation = request.environ.get(EXPLAIN)
    if explanation is not None:
        # flask explain: everything up to here ran as for a live request; nothing is sent.
        explanation.call, explanation.prepared = call, prepare(call)
        return Response(status=204)
    config = _config()
    record = g.record
    record.forwarding(call.client.target.name)
    try:
        upstream = current_app.extensions["gateway.upstream"].send(call)
    except GatewayError as exc:
        admission.finish(None, sent=exc.code not in _NOT_SENT)
        raise
    headers = response_headers(upstream.raw.headers.items())
    chunks = body_chunks(upstream, call.client)
    if config.guarded:
        headers, dropped = egress.guard_headers(headers, config.guarded)
        for name in dropped:
            _log_block(call, f"response header {name} (dropped)")
        coding = upstream.headers.get("Content-Encoding")
        chunks = egress.scan_body(chunks, config.guarded, coding)
    if admission.llm.model is not None:
        admission.meter = UsageMeter(upstream.headers.get("Content-Type"))
        chunks = metered(chunks, admission.meter)
    status = upstream.status_code
    record.upstream_answered(status, _upstream_request_id(headers))
    headers += admission.headers.items()

    sock = request.environ.get("gunicorn.socket")

    def finish() -> None:
        if sock is not None:
            sock.settimeout(None)  # the server's keep-alive wait applies again
        admission.finish(status)
        if admission.meter is not None:
            record.input_tokens = admission.meter.input_tokens
            record.output_tokens = admission.meter.output_tokens

    try:
        body = _Body(chunks, call, finish, record)
    except GatewayError:
        admission.finish(None)
        raise
    return UpstreamResponse(body, status=status, headers=headers, direct_passthrough=True)


def _upstream_request_id(headers: list[tuple[str, str]]) -> str | None:
    """Return the upstream's own request id (OpenAI's x-request-id, Anthropic's request-id)."""
    for name, value in headers:
        if name.lower() in ("x-request-id", "request-id"):
            return value
    return None


def _log_block(call: Call, where: str) -> None:
    log.warning(
        "%s: egress guard: a secret in the %s from target %s",
        call.client.label,
        where,
        call.client.target.name,
    )


class _Body:
    """The end of the response pipeline: what the WSGI server iterates and closes.

    Its first chunk is read before the response starts, so a failure that early
    (an upstream break, a secret in the first bytes) still gets a clean JSON error;
    later, the same failures cut the connection. ``close()`` ends every stage,
    however the response ended: completed, client gone, or cut.
    """

    def __init__(
        self, chunks: Iterator[bytes], call: Call, on_close: Callable[[], None], record: Record
    ) -> None:
        self._chunks = chunks
        self._call = call
        self._on_close = on_close
        self._record = record
        try:
            self._first = next(chunks, b"")
        except UpstreamBroke as exc:
            raise exc.failure() from None
        except egress.SecretInResponse:
            _log_block(call, "response body (before it was sent)")
            raise GatewayError(
                "secret_in_response", "The upstream's answer held a secret; it was not sent."
            ) from None
        except egress.UnreadableEncoding:
            chunks.close()
            raise GatewayError(
                "upstream_error",
                "The upstream's answer is in an encoding the gateway cannot check.",
            ) from None

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            yield self._first
        try:
            yield from self._chunks
        except UpstreamBroke as exc:
            self._record.error = exc.failure().code
            raise
        except egress.SecretInResponse:
            self._record.error = "secret_in_response"
            _log_block(self._call, "response body (the stream was cut)")
            raise

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._on_close()


def _read_body() -> bytes:
    """Read the request body within ``maxRequestBytes`` and the ``bodyTimeoutMs`` deadline."""
    config = _config()
    body = read_body(request.environ, config.max_request_bytes, config.body_timeout)
    g.record.bytes_in = len(body)
    # From here the socket only sends: a client that stops reading the answer for
    # writeTimeoutMs is dropped, which frees its upstream connection. Once the
    # answer is over the server's own keep-alive wait applies again.
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(config.write_timeout)

        @after_this_request
        def _restore(response: Response) -> Response:
            # A streamed answer (direct passthrough) is closed through _Body, which
            # restores it too; werkzeug calls these only for the others.
            response.call_on_close(lambda: sock.settimeout(None))
            return response

    return body


def _read_envelope() -> dict:
    if not request.is_json:
        raise GatewayError("invalid_json", "Send the envelope with Content-Type: application/json.")
    body = _read_body()
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise GatewayError("invalid_json", "The envelope must be a JSON object.")
    try:
        return _envelope_schema.load(data)
    except ValidationError as exc:
        raise _invalid_envelope(exc) from None


def _invalid_envelope(exc: ValidationError) -> GatewayError:
    return GatewayError("invalid_envelope", "The envelope has invalid fields.", fields=exc.messages)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e99999: Python reads it as inf, which is not JSON
        raise ValueError("a number too large for JSON")
    return value


def _outgoing_headers(
    client: Client, headers: list[tuple[str, str]], admission: Admission
) -> dict[str, str]:
    try:
        passed = client_headers(headers)
    except PolicyError as exc:
        raise _policy_error(exc) from None
    # The upstream gets the gateway's request id, so both logs name the call alike.
    passed.append(("X-Request-ID", g.record.request_id))
    accept = request.headers.get("Accept-Encoding")
    if admission.llm.model is not None:
        accept = "identity"  # the usage meter reads the answer as it passes
    elif _config().guarded:
        accept = readable_codings(accept, egress.READABLE_CODINGS)
    return upstream_headers(client.target.default_headers, passed, client.secret_headers, accept)


def _spend(
    client: Client, path: str, body: bytes | None, query: str, parsed: Any = NOT_PARSED
) -> Admission:
    """Apply the client's model, ceiling and limit rules to one call (spend.admit)."""
    config = _config()
    dry = EXPLAIN in request.environ  # flask explain: check the limits, count nothing
    try:
        admission = admit(
            client,
            current_app.extensions["gateway.limits"],
            config.fail_open,
            path,
            body,
            parse_qsl(query, keep_blank_values=True),
            parsed=parsed,
            dry=dry,
        )
    except PolicyError as exc:
        if exc.code == "invalid_json":
            raise GatewayError("invalid_json", f"The request body {exc.reason}.") from None
        raise _policy_error(exc) from None
    if admission.llm.model is not None:
        g.record.model = admission.llm.model
        _note("model", f"{admission.llm.model} (max tokens {admission.llm.ceiling or 'not set'})")
    if admission.headers:
        limits = ", ".join(f"{k}: {v}" for k, v in admission.headers.items())
        _note("limits", f"admitted now ({limits})")
    return admission


@bp.post("/proxy")
def envelope():
    """Forward the call described by a JSON envelope."""
    client = _authenticate()
    env = _read_envelope()
    path = _allowed_path(client, env["method"], env["path"])
    headers = list(env.get("headers", {}).items())
    body = None
    try:
        query = encoded_query(env.get("query", {}))
        if env.get("body") is not None:
            body = encoded_body(env["body"])
    except ValidationError as exc:
        raise _invalid_envelope(exc) from None
    if body is not None:
        _refuse_body_on(env["method"])
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "application/json"))
    admission = _spend(client, path, body, query, env.get("body"))
    call = Call(
        client=client,
        method=env["method"],
        path=path,
        query=query,
        headers=_outgoing_headers(client, headers, admission),
        body=admission.body or body,
    )
    return _forward(call, admission)


def _refuse_body_on(method: str) -> None:
    # Upstreams that ignore a body on these methods would read it as the next
    # request on a shared upstream connection.
    if method in ("GET", "HEAD", "OPTIONS"):
        raise GatewayError("body_not_allowed", f"A {method} request cannot carry a body.")


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


# merge_slashes off: "/proxy//evil.example" must reach the path check (400), not
# be rewritten by a redirect. The raw request target decides the path, not ``rest``.
@bp.route("/proxy/<anything:rest>", methods=METHODS, merge_slashes=False)
def transparent(rest: str):
    """Forward the request as it is to the same path on the client's target."""
    client = _authenticate()
    path = _allowed_path(client, request.method, _raw_subpath())
    body = _read_body() or None
    if body is not None:
        _refuse_body_on(request.method)
    query = request.query_string.decode("latin-1")
    admission = _spend(client, path, body, query)
    call = Call(
        client=client,
        method=request.method,
        path=path,
        query=query,
        headers=_outgoing_headers(client, list(request.headers.items()), admission),
        body=admission.body or body,
    )
    return _forward(call, admission)


@bp.get("/health")
def health():
    """Say the gateway is up; needs no key and never touches an upstream."""
    return {"ok": True}
