"""The HTTP edge: ``POST /proxy``, ``/proxy/<path>`` and ``GET /health``.

Thin on purpose: each proxy route runs its pipeline (``pipeline``); CORS is answered here.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request
from werkzeug.routing import PathConverter

from ..config.load import GatewayConfig
from ..policy.access import METHODS
from . import cors
from .exchange import OBSERVER, Exchange
from .pipeline import ENVELOPE, TRANSPARENT

__all__ = ["bp"]

bp = Blueprint("gateway", __name__)


@bp.record_once
def _register_converter(state) -> None:
    state.app.url_map.converters["anything"] = AnythingConverter


class AnythingConverter(PathConverter):
    """Like ``path``, but also matches a leading slash, so "//host" can be refused."""

    regex = ".+"
    part_isolating = False


def _config() -> GatewayConfig:
    return current_app.extensions["gateway.config"]


def _exchange() -> Exchange:
    extensions = current_app.extensions
    return Exchange(
        extensions["gateway.config"],
        g.record,
        extensions["gateway.limits"],
        extensions["gateway.upstream"],
        request.environ.get(OBSERVER),
    )


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


@bp.post("/proxy")
def envelope():
    """Forward the call described by a JSON envelope."""
    return ENVELOPE.run(_exchange())


# merge_slashes off: "/proxy//evil.example" must reach the path check (400), not
# be rewritten by a redirect. The raw request target decides the path, not ``rest``.
@bp.route("/proxy/<anything:rest>", methods=METHODS, merge_slashes=False)
def transparent(rest: str):
    """Forward the request as it is to the same path on the client's target."""
    g.transparent = ex = _exchange()  # its refusals take the call's dialect (edge.errors)
    return TRANSPARENT.run(ex)


@bp.get("/health")
def health():
    """Say the gateway is up; needs no key and never touches an upstream."""
    return {"ok": True}
