"""Refusals and errors: the one table of error codes and the types that carry them.

The bottom of the house: every package may import it, it imports nothing of the
gateway and no Flask. ``GatewayError`` is what a client sees (a code from
``CODES`` and a message); ``PolicyError`` is a rule's refusal, phrased by the
edge; ``ConfigError`` lists every problem of a config with its location.
``error_body`` writes a refusal in the one flat shape, or in the error shape of
an API whose SDK made the call (``DIALECTS``), with the same code and message.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import click

__all__ = [
    "CODES",
    "DIALECTS",
    "MAX_RETRY_WAIT",
    "Code",
    "ConfigError",
    "GatewayError",
    "PolicyError",
    "dialect_table",
    "error_body",
    "error_type",
    "markdown_table",
    "read_error",
    "should_retry",
]


class Code(NamedTuple):
    status: int
    meaning: str


# Every error code the gateway (and gunicorn, answering for it) can send: the
# contract clients code against. Raise sites, the OpenAPI document, the docs'
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
        400, "an LLM call without `max_tokens` (or its provider's ceiling) where a ceiling applies"
    ),
    "model_required": Code(
        400,
        "a JSON body without its model in the body's `model` field (or the path), a `null` "
        "model, or a key such as `Model` that an upstream could read as `model`, where a "
        "model, ceiling or budget rule applies",
    ),
    "invalid_model": Code(
        400, "a model name (body, `models` list, path or query) not 1 to 256 printable characters"
    ),
    "invalid_choice_count": Code(
        400, "`n`, `best_of` or `candidateCount` not a whole number from 1 to 128"
    ),
    "invalid_session_request": Code(
        400, "`POST /sessions` without a valid `user`, `origin` or `ttl` (`fields` says which)"
    ),
    "missing_client_key": Code(401, "no `Authorization: Bearer` (or `x-api-key`)"),
    "invalid_client_key": Code(
        401, "the key is not in the config, or not valid yet (`notBefore`); a hash is not a key"
    ),
    "expired_client_key": Code(401, "the key's `expires` has passed"),
    "invalid_session_token": Code(
        401,
        "a `gs_` session token that is forged or altered, signed with a secret the gateway "
        "does not hold, minted before `sessions.notBefore`, or of a client without `sessions`",
    ),
    "expired_session_token": Code(401, "the session token's `expires` has passed; mint a new one"),
    "invalid_metrics_token": Code(
        401, "`GET /metrics` without the metrics token (`metrics.tokenRef`)"
    ),
    "method_not_allowed": Code(403, "method outside `allowedMethods`"),
    "path_not_allowed": Code(403, "path outside `allowedPaths`"),
    "origin_not_allowed": Code(
        403,
        "browser `Origin` outside `allowedOrigins`; for a session token, an `Origin` other "
        "than the token's, or none",
    ),
    "sessions_not_allowed": Code(403, "`POST /sessions` by a client without `sessions`"),
    "model_not_allowed": Code(
        403, "a model (body, `models` list, path or query) outside `allowedModels`"
    ),
    "max_tokens_not_allowed": Code(403, "`max_tokens` above the client's `maxTokens`"),
    "model_not_priced": Code(
        403, "a model with no entry in `prices`, called by a client or target with `limits.cost`"
    ),
    "not_found": Code(404, "no such gateway route"),
    "route_method_not_allowed": Code(405, "e.g. `GET /proxy`"),
    "request_timeout": Code(408, "the request body did not arrive within `bodyTimeoutMs`"),
    "request_too_large": Code(413, "body over `maxRequestBytes`; nothing forwarded"),
    "uri_too_long": Code(414, "request line too long (answered by gunicorn)"),
    "headers_too_large": Code(431, "too many or too large request headers"),
    "rate_limited": Code(429, "over a `limits.requests` rate; see `Retry-After`"),
    "too_many_concurrent": Code(429, "over `limits.concurrent` calls in flight"),
    "quota_exhausted": Code(
        429,
        "a `limits.tokens` or `limits.cost` budget cannot pay for the call; `RateLimit-*` "
        "describe it, see `Retry-After`",
    ),
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


# The APIs whose error shape a refusal can take (``none``: the flat shape). A
# target's ``dialect`` names one; see ``edge.dialect`` for how a call picks one.
DIALECTS = ("openai", "anthropic", "none")

# The kind of a refusal (``error.type``) in each API's shape: by code, else by
# status, else "client" below 500 and "server" from 500 on. The kinds are the
# ones each API sends itself: OpenAI's invalid_request_error for every refusal
# but a 429 (a bad key included), insufficient_quota for a spent quota, and
# server_error; Anthropic's one type per status (its SDK lists them in
# anthropic/types/shared/error_type.py).
_TYPES: dict[str, dict[int | str, str]] = {
    "openai": {
        429: "requests",
        "quota_exhausted": "insufficient_quota",
        "client": "invalid_request_error",
        "server": "server_error",
    },
    "anthropic": {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        "client": "invalid_request_error",
        "server": "api_error",
    },
}


def error_type(dialect: str, code: str) -> str:
    """Return the ``error.type`` that ``dialect``'s SDK reads for the gateway's ``code``."""
    types = _TYPES[dialect]
    status = CODES[code].status
    if code in types:
        return types[code]
    if status in types:
        return types[status]
    return types["client" if status < 500 else "server"]


def error_body(
    code: str,
    message: str,
    request_id: str,
    fields: dict[str, Any] | None = None,
    dialect: str = "none",
) -> dict:
    """Return a refusal's JSON body in ``dialect``'s shape; the flat one for ``none``.

    Flat: ``{"error", "message", "request_id"}`` and field errors if any. Each
    API's shape carries the gateway's code as ``error.code`` and the same message.
    """
    if dialect == "openai":
        kind = error_type(dialect, code)
        error = {"message": message, "type": kind, "param": None, "code": code}
        return {"error": error, "request_id": request_id}
    if dialect == "anthropic":
        error = {"type": error_type(dialect, code), "message": message, "code": code}
        return {"type": "error", "error": error, "request_id": request_id}
    body: dict[str, Any] = {"error": code, "message": message, "request_id": request_id}
    if fields:
        body["fields"] = fields
    return body


def read_error(body: Any) -> tuple[str, str]:
    """Return the code and message of an error body in any of ``error_body``'s shapes."""
    if not isinstance(body, dict):
        return "?", ""
    error = body.get("error")
    if isinstance(error, dict):  # OpenAI's or Anthropic's shape
        body = error
        error = error.get("code")
    return str(error or "?"), str(body.get("message", ""))


# The longest Retry-After worth waiting out in a call: the OpenAI SDK gives up
# on any over 120 s (openai/_constants.py MAX_RETRY_AFTER_DELAY), the Anthropic
# SDK sleeps whatever it is told (anthropic/_base_client.py
# _calculate_retry_timeout, up to 49 days); a minute is a wait a caller expects.
MAX_RETRY_WAIT = 60


def should_retry(code: str, retry_after: str | None) -> bool | None:
    """Return what ``x-should-retry`` says for a refusal: whether a retry can succeed.

    Both SDKs obey the header before their own rule, which retries every 408,
    409, 429 and 5xx (``_should_retry`` in openai/ and anthropic/_base_client.py,
    openai 3.51 and anthropic 2.10; only the OpenAI SDK first refuses a
    Retry-After over 120 s); the value must be exactly "true" or "false".
    False for a refusal no retry changes (a 4xx but 408, a spent budget, a wait
    over ``MAX_RETRY_WAIT``), True for a rate or slot that frees soon, None (no
    header: the SDK decides) for a timeout or a failure.
    """
    status = CODES[code].status
    if code in ("rate_limited", "too_many_concurrent"):
        wait = int(retry_after) if retry_after and retry_after.isdigit() else 0
        return wait <= MAX_RETRY_WAIT
    if status == 408 or status >= 500:
        return None
    return False


def dialect_table() -> str:
    """Return the README's table of the ``error.type`` each API's shape gives, by status."""
    rows = ["| status | OpenAI `error.type` | Anthropic `error.type` |", "| --- | --- | --- |"]
    for status in sorted({known.status for known in CODES.values()}):
        kinds: dict[tuple[str, str], list[str]] = {}
        for name in (name for name, known in CODES.items() if known.status == status):
            pair = (error_type("openai", name), error_type("anthropic", name))
            kinds.setdefault(pair, []).append(name)
        for (openai, anthropic), names in kinds.items():
            where = str(status) if len(kinds) == 1 else f"{status} (`{'`, `'.join(names)}`)"
            rows.append(f"| {where} | `{openai}` | `{anthropic}` |")
    return "\n".join(rows)


def markdown_table() -> str:
    """Return the error table of docs/reference/errors.md, one row per code, by status."""
    rows = ["| status | `error` | when |", "| --- | --- | --- |"]
    for code, (status, meaning) in sorted(CODES.items(), key=lambda item: item[1].status):
        rows.append(f"| {status} | `{code}` | {meaning} |")
    return "\n".join(rows)


class PolicyError(Exception):
    """A request outside what a client's policy allows.

    ``code`` is a stable error code; ``reason`` is a sentence fragment ("must start
    with /") that each caller phrases into its own message; ``subject`` names what
    the reason is about (a header name), where that is not already known.
    """

    def __init__(self, code: str, reason: str, subject: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.reason = reason
        self.subject = subject


class ConfigError(click.ClickException):
    """The config cannot be used; ``problems`` lists every reason with its location.

    A ClickException, so that any ``flask`` command whose app cannot be built
    prints the problem list and exits 1 instead of showing a traceback.
    """

    def __init__(self, problems: list[str]) -> None:
        lines = [f"The config has {len(problems)} problem(s):", *(f"  {p}" for p in problems)]
        super().__init__("\n".join(lines))
        self.problems = problems
