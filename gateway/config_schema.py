"""The config file's shape: marshmallow schemas, and their errors as located problems."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

__all__ = ["ConfigSchema", "ClientSchema", "TargetSchema", "checked_part"]

_REQUIRED = {"required": "is required"}


def _non_empty(hint: str) -> validate.Length:
    return validate.Length(min=1, error=f"must not be empty; {hint}")


class TargetSchema(Schema):
    baseUrl = fields.String(required=True, error_messages=_REQUIRED)
    defaultHeaders = fields.Dict(keys=fields.String(), values=fields.String())


class ClientSchema(Schema):
    target = fields.String(required=True, error_messages=_REQUIRED)
    authHeaderRef = fields.String()
    rapidApiKeyRef = fields.String()
    secretHeaders = fields.Dict(keys=fields.String(), values=fields.String())
    allowedMethods = fields.List(
        fields.String(),
        required=True,
        error_messages=_REQUIRED,
        validate=_non_empty('write ["*"] to allow every method'),
    )
    allowedPaths = fields.List(
        fields.String(),
        required=True,
        error_messages=_REQUIRED,
        validate=_non_empty('write ["/**"] to allow every path'),
    )
    allowedOrigins = fields.List(fields.String())
    timeoutMs = fields.Integer(strict=True, validate=validate.Range(1, 3_600_000))
    connectTimeoutMs = fields.Integer(strict=True, validate=validate.Range(1, 600_000))


class ConfigSchema(Schema):
    targets = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(TargetSchema),
        required=True,
        error_messages=_REQUIRED,
    )
    secrets = fields.Dict(keys=fields.String(), values=fields.String())
    clients = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(ClientSchema),
        required=True,
        error_messages=_REQUIRED,
    )
    maxRequestBytes = fields.Integer(strict=True, validate=validate.Range(1024, 2**40))
    bodyTimeoutMs = fields.Integer(strict=True, validate=validate.Range(100, 3_600_000))
    writeTimeoutMs = fields.Integer(strict=True, validate=validate.Range(100, 3_600_000))
    egressGuard = fields.Boolean(truthy={True}, falsy={False})
    upstreamIdleMs = fields.Integer(strict=True, validate=validate.Range(0, 600_000))


_SECTIONS = {"targets": TargetSchema, "clients": ClientSchema}


def checked_part(
    raw: dict[Any, Any], name_of: Callable[[str, Any], str], problems: list[str]
) -> dict[str, Any]:
    """Validate ``raw``; add each problem to ``problems``; return what passed.

    What passed is every valid top-level field, and every entry of ``targets``,
    ``secrets`` and ``clients`` with its invalid fields left out, so the caller
    can go on checking it and report every problem at once. ``name_of(section,
    key)`` says how an entry is named in a problem (a client by position, never
    by its key).
    """
    errors = ConfigSchema().validate(raw)
    passed: dict[str, Any] = {}
    for section, value in raw.items():
        if section not in errors:
            passed[section] = value
            continue
        section_errors = errors[section]
        if section in ("targets", "clients", "secrets") and isinstance(value, dict):
            passed[section] = {}
            for key, entry in value.items():
                entry_errors = section_errors.get(key) if isinstance(section_errors, dict) else None
                where = f"{section}.{name_of(section, key)}"
                if entry_errors is None:
                    passed[section][key] = entry
                    continue
                _flatten(entry_errors, where, _SECTIONS.get(section), problems)
                bad = entry_errors.get("value") if isinstance(entry_errors, dict) else None
                if "key" not in entry_errors and isinstance(bad, dict) and isinstance(entry, dict):
                    passed[section][key] = {k: v for k, v in entry.items() if k not in bad}
        else:
            _flatten(section_errors, str(section), ConfigSchema, problems)
    for section in errors.keys() - raw.keys():  # required sections that are missing
        _flatten(errors[section], str(section), ConfigSchema, problems)
    # Values were checked above; load only to apply the schema's types.
    return ConfigSchema(unknown=EXCLUDE).load(passed, partial=True)


def _flatten(errors: Any, where: str, schema: type[Schema] | None, out: list[str]) -> None:
    """Turn marshmallow's nested errors below ``where`` into ``location: message`` lines."""
    if isinstance(errors, dict):
        for key, value in errors.items():
            if key == "value":
                # Dict fields nest errors as {k: {"value": ...}, k: {"key": ...}}.
                _flatten(value, where, schema, out)
            elif key == "key":
                _flatten(value, f"{where} (the key)", None, out)
            elif isinstance(key, int):
                _flatten(value, f"{where}[{key}]", None, out)
            else:
                _flatten(value, f"{where}.{key}", schema, out)
        return
    for message in errors if isinstance(errors, list) else [errors]:
        if message == "Unknown field.":
            field = where.rsplit(".", 1)[-1]
            hint = ""
            if schema is not None:
                close = difflib.get_close_matches(field, schema._declared_fields, n=1)
                if close:
                    hint = f"; did you mean {close[0]}?"
            out.append(f"{where}: unknown field{hint}")
        else:
            text = str(message).rstrip(".")
            out.append(f"{where}: {text[:1].lower()}{text[1:]}")
