"""``/openapi.json`` generated from the marshmallow schemas, and Swagger UI at ``/docs``.

Swagger UI's files come from the swagger-ui-bundle package: no CDN, works offline.
"""

from __future__ import annotations

from http import HTTPStatus

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from ..errors import CODES, error_type
from ..policy.access import METHODS
from .envelope import EnvelopeSchema, ErrorSchema, HealthSchema

__all__ = ["build_spec", "init_app"]

bp = Blueprint("docs", __name__)

_UPSTREAM_ANSWER = {
    "description": "The upstream's answer, passed through (status, headers and body, "
    "streamed as it arrives; Server-Sent Events included).",
    "content": {"*/*": {"schema": {}}},
}

# What "Try it out" sends unless the reader edits it: a chat completion through
# the envelope, which works with the clients in the docs' examples.
ENVELOPE_EXAMPLE = {
    "method": "POST",
    "path": "/chat/completions",
    "headers": {"X-Title": "Try it out"},
    "body": {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    },
}

_DESCRIPTION = """Client keys in, secret upstream keys added, answers streamed back.

**Try it out from this page**: click *Authorize* and enter a client key. The
browser sends this page's origin with every call, so the operator must list it
in that client's `allowedOrigins` (for example `https://gateway.example.com`, or
`http://127.0.0.1:8787` locally); otherwise the gateway answers
`403 origin_not_allowed`. Use the envelope (`POST /proxy`) here: Swagger UI
encodes the `/` inside `{path}` as `%2F`, which the transparent route refuses.

**Errors** have one flat shape, `{"error": "<code>", "message", "request_id"}`,
except in transparent mode, where a refusal reads as the calling SDK's own API
errors do: OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`)
or Anthropic's (`{"type": "error", "error": {"type", "message", "code"}}`), by
the target's `dialect` or else the call's path and `anthropic-version` header.
The gateway's code is `error.code` there; the status and message are the same.
"""

_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>API-key gateway: API docs</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""


def _dialect_error(dialect: str, description: str, envelope: dict) -> dict:
    """Return the JSON schema of a refusal in ``dialect``'s shape (``errors.error_body``)."""
    error = {
        "message": {"type": "string", "description": "The same sentence as in the flat shape."},
        "type": {
            "type": "string",
            "enum": sorted({error_type(dialect, code) for code in CODES}),
            "description": "The kind of refusal, as this API names it.",
        },
        "code": {"type": "string", "enum": list(CODES), "description": "The gateway's code."},
    }
    required = ["message", "type", "code"]
    if dialect == "openai":
        error["param"] = {"type": "string", "nullable": True, "description": "Always null."}
        required.append("param")
    return {
        "type": "object",
        "description": description,
        "required": ["error", "request_id", *envelope],
        "properties": {
            **{name: {"type": "string", "enum": [value]} for name, value in envelope.items()},
            "error": {"type": "object", "required": required, "properties": error},
            "request_id": {"type": "string", "description": "The gateway's request id."},
        },
    }


_ERROR_HEADERS = {
    "X-Gateway-Request-Id": "The gateway's request id.",
    "x-request-id": "The same id, where the OpenAI SDK reads `request_id`.",
    "request-id": "The same id, where the Anthropic SDK reads `request_id`.",
    "x-should-retry": "`false` where no retry can succeed (a 4xx but 408, `quota_exhausted`, "
    "a Retry-After over 60 s); `true` for `rate_limited` and `too_many_concurrent` with a "
    "shorter one. Both SDKs obey it.",
}


def _error_responses(shapes: tuple[str, ...]) -> dict:
    """Return one response per error status, listing the codes it carries (from CODES)."""
    by_status: dict[int, list[str]] = {}
    for code, (status, _) in CODES.items():
        by_status.setdefault(status, []).append(code)
    schema = {"oneOf": list(shapes)} if len(shapes) > 1 else shapes[0]
    where = (
        "`error`" if len(shapes) == 1 else "The code (`error`, or `error.code` in an SDK's shape)"
    )
    headers = {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in _ERROR_HEADERS.items()
    }
    return {
        str(status): {
            "description": f"{HTTPStatus(status).phrase}. {where} is one of: {', '.join(codes)}.",
            "headers": headers,
            "content": {"application/json": {"schema": schema}},
        }
        for status, codes in sorted(by_status.items())
    }


def build_spec() -> dict:
    """Return the OpenAPI 3 document for the gateway's routes."""
    spec = APISpec(
        title="API-key gateway",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": _DESCRIPTION},
    )
    spec.components.schema("Envelope", {"example": ENVELOPE_EXAMPLE}, schema=EnvelopeSchema)
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.schema(
        "OpenAIError",
        _dialect_error(
            "openai",
            "A refusal of a transparent call in OpenAI's shape: to a target with `dialect: "
            "openai`, or (no dialect) on a path that ends in one of OpenAI's endpoints.",
            {},
        ),
    )
    spec.components.schema(
        "AnthropicError",
        _dialect_error(
            "anthropic",
            "A refusal of a transparent call in Anthropic's shape: to a target with `dialect: "
            "anthropic`, or (no dialect) with an `anthropic-version` header.",
            {"type": "error"},
        ),
    )
    spec.components.schema("Health", schema=HealthSchema)
    spec.components.security_scheme(
        "clientKey", {"type": "http", "scheme": "bearer", "description": "Your client key."}
    )
    spec.components.security_scheme(
        "clientKeyHeader",
        {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "The client key, Anthropic-style (transparent mode).",
        },
    )
    security = [{"clientKey": []}, {"clientKeyHeader": []}]

    spec.path(
        path="/proxy",
        operations={
            "post": {
                "summary": "Forward one call described by a JSON envelope",
                "operationId": "proxyEnvelope",
                "security": [{"clientKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": "Envelope"}},
                },
                "responses": {
                    "default": _UPSTREAM_ANSWER,
                    **_error_responses(("Error",)),
                },
            }
        },
    )
    transparent = {
        "summary": "Forward this request as it is to the same path on the client's target",
        "security": security,
        "parameters": [
            {
                "name": "path",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "Path below the target's baseUrl; may hold slashes.",
            }
        ],
        "responses": {
            "default": _UPSTREAM_ANSWER,
            **_error_responses(("Error", "OpenAIError", "AnthropicError")),
        },
    }
    operations = {}
    for method in METHODS:
        operation = {**transparent, "operationId": f"proxyTransparent{method.title()}"}
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            operation["requestBody"] = {"content": {"*/*": {"schema": {}}}}
        operations[method.lower()] = operation
    spec.path(path="/proxy/{path}", operations=operations)
    spec.path(
        path="/health",
        operations={
            "get": {
                "summary": "Say the gateway is up (no key, no upstream call)",
                "operationId": "health",
                "responses": {
                    "200": {
                        "description": "Up",
                        "content": {"application/json": {"schema": "Health"}},
                    }
                },
            }
        },
    )
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_json():
    """Serve the OpenAPI document."""
    return current_app.extensions["gateway.openapi"]


@bp.get("/docs")
def docs():
    """Serve Swagger UI for the OpenAPI document."""
    return _DOCS_PAGE


@bp.get("/docs/<path:filename>")
def docs_asset(filename: str):
    """Serve Swagger UI's own files from the installed package."""
    return send_from_directory(swagger_ui_path, filename)


def init_app(app: Flask) -> None:
    """Build the document once and register the docs routes."""
    app.extensions["gateway.openapi"] = build_spec()
    app.register_blueprint(bp)
