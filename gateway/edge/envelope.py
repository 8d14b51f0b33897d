"""The ``POST /proxy`` envelope: what a caller may send, validated with marshmallow."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from marshmallow import Schema, ValidationError, fields, pre_load, validate

from ..policy.access import METHODS

__all__ = [
    "EnvelopeSchema",
    "ErrorSchema",
    "HealthSchema",
    "encoded_body",
    "encoded_query",
    "load_envelope",
]

_SCALARS = (str, int, float, bool)

# Bounds far above what real APIs use (a few dozen headers, a handful of query
# parameters), checked before anything is looked at one by one, so a huge
# envelope is refused in constant time instead of stalling a worker.
MAX_QUERY_ITEMS = 1000  # name=value pairs, counting each item of a list
MAX_HEADERS = 100
MAX_NAME_LENGTH = 256
MAX_VALUE_LENGTH = 8192
MAX_QUERY_LENGTH = 16384  # the encoded query string


class QueryValue(fields.Field):
    """A query value: a string, number or boolean, or a list of those."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, _SCALARS) for item in items):
            raise ValidationError("must be a string, number or boolean, or a list of those")
        return value


class EnvelopeSchema(Schema):
    """One upstream call described as JSON."""

    method = fields.String(
        load_default="GET",
        validate=validate.OneOf(METHODS),
        metadata={"description": "HTTP method, case-insensitive.", "enum": list(METHODS)},
    )
    path = fields.String(
        required=True,
        metadata={
            "description": "Path below the target's baseUrl, starting with /.",
            "example": "/chat/completions",
        },
    )
    query = fields.Dict(
        keys=fields.String(),
        values=QueryValue(),
        metadata={"description": "Query parameters; a list repeats the parameter."},
    )
    headers = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "Extra request headers; credentials and hop-by-hop headers are dropped."
        },
    )
    body = fields.Raw(
        allow_none=True,
        metadata={"description": "Any JSON value, sent upstream as the JSON body."},
    )

    @pre_load
    def _upper_method(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": data["method"].upper()}
        return data

    @pre_load
    def _bounded(self, data: Any, **kwargs: Any) -> Any:
        """Refuse oversized query and headers before any of their items is read."""
        if not isinstance(data, dict):
            return data
        problems: dict[str, list[str]] = {}
        query = data.get("query")
        if isinstance(query, dict):
            items = sum(len(v) if isinstance(v, list) else 1 for v in query.values())
            if items > MAX_QUERY_ITEMS:
                problems["query"] = [f"more than {MAX_QUERY_ITEMS} parameters"]
            elif _too_long(query):
                problems["query"] = [_LENGTHS]
        headers = data.get("headers")
        if isinstance(headers, dict):
            if len(headers) > MAX_HEADERS:
                problems["headers"] = [f"more than {MAX_HEADERS} headers"]
            elif _too_long(headers):
                problems["headers"] = [_LENGTHS]
        if problems:
            raise ValidationError(problems)
        return data


_SCHEMA = EnvelopeSchema()
_METHODS = frozenset(METHODS)
_FIELDS = frozenset(_SCHEMA.fields)  # no field has a data_key of its own


def load_envelope(data: dict[str, Any]) -> dict[str, Any]:
    """Return ``data`` loaded by EnvelopeSchema; raise its ValidationError if invalid.

    Nearly every envelope is plain (known fields, strings where strings go), and
    marshmallow costs more than the rest of reading the call: a plain one is
    loaded here to the very dict the schema returns, anything else goes through
    the schema, so every refusal keeps its exact ``fields``.
    """
    loaded = _plain(data)
    return _SCHEMA.load(data) if loaded is None else loaded


def _plain(data: dict[str, Any]) -> dict[str, Any] | None:
    """Return what the schema would load from ``data`` if it is plainly valid, else None."""
    if not data.keys() <= _FIELDS:
        return None
    method = data.get("method", "GET")
    path = data.get("path")
    if not (isinstance(method, str) and isinstance(path, str)):
        return None
    method = method.upper()
    if method not in _METHODS:
        return None
    loaded: dict[str, Any] = {"method": method, "path": path}
    if "query" in data:
        query = data["query"]
        if not (isinstance(query, dict) and _plain_query(query)):
            return None
        loaded["query"] = dict(query)
    if "headers" in data:
        headers = data["headers"]
        if not (isinstance(headers, dict) and _plain_headers(headers)):
            return None
        loaded["headers"] = dict(headers)
    if "body" in data:
        loaded["body"] = data["body"]
    return loaded


def _plain_query(query: dict[Any, Any]) -> bool:
    # Bounded first, as the schema's _bounded is: a huge query costs no more here.
    items = sum(len(v) if isinstance(v, list) else 1 for v in query.values())
    if items > MAX_QUERY_ITEMS or _too_long(query):
        return False
    for name, value in query.items():
        if not isinstance(name, str):
            return False
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, _SCALARS):
                return False
    return True


def _plain_headers(headers: dict[Any, Any]) -> bool:
    if len(headers) > MAX_HEADERS or _too_long(headers):
        return False
    return all(isinstance(name, str) and isinstance(value, str) for name, value in headers.items())


class HealthSchema(Schema):
    ok = fields.Boolean(required=True)


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "Stable error code."})
    message = fields.String(required=True, metadata={"description": "What went wrong."})
    request_id = fields.String(
        required=True,
        metadata={"description": "The gateway's request id (also in X-Gateway-Request-Id)."},
    )
    fields_ = fields.Dict(data_key="fields", metadata={"description": "Per-field problems."})


def _text(value: str | int | float | bool) -> str:
    # JSON's spelling for booleans, as every web API expects, not Python's True.
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


_LENGTHS = f"a name longer than {MAX_NAME_LENGTH} or a value longer than {MAX_VALUE_LENGTH}"


def _too_long(mapping: dict[Any, Any]) -> bool:
    for name, value in mapping.items():
        if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
            return True
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and len(item) > MAX_VALUE_LENGTH:
                return True
    return False


def encoded_query(query: dict[str, Any]) -> str:
    """Return the envelope's query as it goes on the wire, lists repeated.

    Raises ValidationError naming ``query`` for text the wire cannot carry (a lone
    surrogate) or a URL longer than upstreams accept.
    """
    pairs = []
    for name, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, _text(item)))
    try:
        text = urlencode(pairs)
    except UnicodeEncodeError:
        raise ValidationError({"query": ["holds text that is not valid Unicode"]}) from None
    if len(text) > MAX_QUERY_LENGTH:
        raise ValidationError({"query": [f"encodes to more than {MAX_QUERY_LENGTH} characters"]})
    return text


def encoded_body(body: Any) -> bytes:
    """Return the envelope's body as compact JSON bytes; ValidationError names ``body``."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValidationError({"body": ["holds text that is not valid Unicode"]}) from None
