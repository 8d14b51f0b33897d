"""The ``POST /proxy`` envelope: what a caller may send, validated with marshmallow."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, validate

from .policy import METHODS

__all__ = ["EnvelopeSchema", "HealthSchema", "ErrorSchema", "query_params"]

_SCALARS = (str, int, float, bool)


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


class HealthSchema(Schema):
    ok = fields.Boolean(required=True)


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "Stable error code."})
    message = fields.String(required=True, metadata={"description": "What went wrong."})
    fields_ = fields.Dict(data_key="fields", metadata={"description": "Per-field problems."})


def _text(value: str | int | float | bool) -> str:
    # JSON's spelling for booleans, as every web API expects, not Python's True.
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def query_params(query: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the envelope's query as (name, value) pairs, lists repeated."""
    pairs = []
    for name, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, _text(item)))
    return pairs
