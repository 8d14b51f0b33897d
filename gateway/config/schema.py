"""The config file's shape: marshmallow schemas, and their errors as located problems."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from ..policy.keys import PREFIX, instant, is_key_item
from ..policy.limits import parse_rate
from ..policy.sessions import parse_ttl
from ..settings import setting

__all__ = [
    "CLIENT_NAME",
    "NAME_RULE",
    "ConfigSchema",
    "ClientSchema",
    "MetricsSchema",
    "TargetSchema",
    "checked_part",
]

_REQUIRED = {"required": "is required"}
# Names go into logs, metrics and messages: plain, short, and never a path like "..".
CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
NAME_RULE = (
    "must be lowercase letters, digits, -, _ or ., start with a letter or digit, "
    "and be at most 64 characters"
)


def _non_empty(hint: str) -> validate.Length:
    return validate.Length(min=1, error=f"must not be empty; {hint}")


def _integer(key: str) -> fields.Integer:
    """Return the field of the integer setting ``key``, its range taken from the settings table."""
    known = setting(key)
    return fields.Integer(strict=True, validate=validate.Range(known.low, known.high))


def _rate(text: str) -> None:
    try:
        parse_rate(text)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


class ScopeLimitsSchema(Schema):
    requests = fields.List(fields.String(validate=_rate))
    concurrent = _integer("clients.<name>.limits.concurrent")
    tokens = fields.List(fields.String(validate=_rate))


def _ttl(text: str) -> None:
    try:
        parse_ttl(text)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


class Instant(fields.Field):
    """An ISO 8601 date or date-time with its offset (YAML may have parsed it already)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return instant(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class SessionsSchema(Schema):
    ttl = fields.String(validate=_ttl)
    limits = fields.Nested(ScopeLimitsSchema)  # per end user, counted for client:user
    notBefore = Instant()


class LimitStorageSchema(Schema):
    storage = fields.String(validate=_non_empty("write sqlite, sqlite:////path or redis://host"))
    failOpen = fields.Boolean(truthy={True}, falsy={False})


class TargetSchema(Schema):
    baseUrl = fields.String(required=True, error_messages=_REQUIRED)
    defaultHeaders = fields.Dict(keys=fields.String(), values=fields.String())
    caBundle = fields.String(validate=_non_empty("write the path of a PEM file"))
    clientCert = fields.String(validate=_non_empty("write the path of a PEM file"))
    clientKey = fields.String(validate=_non_empty("write the path of a PEM file"))
    limits = fields.Nested(ScopeLimitsSchema)
    injectUsage = fields.Boolean(truthy={True}, falsy={False})


def _hash_problem(value: Any, shape: str) -> str:
    # Never echo the value: it may be a live key pasted where its hash belongs.
    if isinstance(value, str) and value.startswith(PREFIX):
        return (
            f"holds a key, not its hash; write {shape} "
            "(`flask --app gateway keys hash` prints it) and keep the key out of the config"
        )
    return f"must be {shape}, the SHA-256 of the key in lowercase hex"


class KeyItem(fields.Field):
    """A key as ``sha256:<hex>``, or a map with ``sha256``, ``expires`` and ``notBefore``.

    Checked by hand, not by a nested schema: a large config has thousands of
    these, and a schema per item doubled the time it took to load.
    """

    _FIELDS = ("sha256", "expires", "notBefore")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if not is_key_item(value):
                raise ValidationError(_hash_problem(value, "sha256:<64 hex digits>"))
            return {"sha256": value.removeprefix("sha256:")}
        if not isinstance(value, dict):
            raise ValidationError(
                "must be sha256:<64 hex digits>, "
                "or a map with sha256 and optional expires and notBefore"
            )
        errors: dict[str, list[str]] = {}
        item = {}
        for name in value.keys() - set(self._FIELDS):
            close = difflib.get_close_matches(str(name), self._FIELDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            errors[str(name)] = [f"unknown field{hint}"]
        digest = value.get("sha256")
        if "sha256" not in value:
            errors["sha256"] = ["is required"]
        elif not (isinstance(digest, str) and is_key_item("sha256:" + digest)):
            errors["sha256"] = [_hash_problem(digest, "<64 hex digits>")]
        else:
            item["sha256"] = digest
        for name in ("expires", "notBefore"):
            if name in value:
                try:
                    item[name] = instant(value[name])
                except ValueError as exc:
                    errors[name] = [str(exc)]
        if "notBefore" in item and "expires" in item and item["notBefore"] >= item["expires"]:
            errors["notBefore"] = ["must be before expires"]
        if errors:
            raise ValidationError(errors)
        return item


class Strings(fields.List):
    """A list of strings, checked in one pass (a large config has tens of thousands)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.String(), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        return super()._deserialize(value, attr, data, **kwargs)  # says which item is wrong


class ClientSchema(Schema):
    keys = fields.List(
        KeyItem(),
        validate=_non_empty("list each key as sha256:<hex> (`flask --app gateway keys new NAME`)"),
    )
    name = fields.String(validate=validate.Regexp(CLIENT_NAME, error=NAME_RULE))
    target = fields.String(required=True, error_messages=_REQUIRED)
    authHeaderRef = fields.String()
    rapidApiKeyRef = fields.String()
    secretHeaders = fields.Dict(keys=fields.String(), values=fields.String())
    allowedMethods = Strings(
        required=True,
        error_messages=_REQUIRED,
        validate=_non_empty('write ["*"] to allow every method'),
    )
    allowedPaths = Strings(
        required=True,
        error_messages=_REQUIRED,
        validate=_non_empty('write ["/**"] to allow every path'),
    )
    allowedOrigins = Strings()
    timeoutMs = _integer("clients.<name>.timeoutMs")
    connectTimeoutMs = _integer("clients.<name>.connectTimeoutMs")
    limits = fields.Nested(ScopeLimitsSchema)
    allowedModels = fields.List(
        fields.String(validate=_non_empty('write a model name, e.g. "openai/gpt-4o-mini"')),
        validate=_non_empty("leave allowedModels out to allow any model"),
    )
    maxTokens = _integer("clients.<name>.maxTokens")
    sessions = fields.Nested(SessionsSchema)


class MetricsSchema(Schema):
    tokenRef = fields.String(required=True, error_messages=_REQUIRED)
    maxModelLabels = _integer("metrics.maxModelLabels")


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
    maxRequestBytes = _integer("maxRequestBytes")
    bodyTimeoutMs = _integer("bodyTimeoutMs")
    writeTimeoutMs = _integer("writeTimeoutMs")
    egressGuard = fields.Boolean(truthy={True}, falsy={False})
    limits = fields.Nested(LimitStorageSchema)
    upstreamIdleMs = _integer("upstreamIdleMs")
    trustedProxies = _integer("trustedProxies")
    metrics = fields.Nested(MetricsSchema)
    sessionSecretRef = fields.String(validate=_non_empty("write the name of a secret"))
    sessionSecretRefs = Strings(validate=_non_empty("write [new, old] while rotating"))


_SECTIONS = {"targets": TargetSchema, "clients": ClientSchema}
_NESTED = {"metrics": MetricsSchema}


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
    try:
        return ConfigSchema().load(raw)  # a valid config: one pass
    except ValidationError as exc:
        errors = exc.messages
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
            _flatten(section_errors, str(section), _NESTED.get(section, ConfigSchema), problems)
    for section in errors.keys() - raw.keys():  # required sections that are missing
        _flatten(errors[section], str(section), ConfigSchema, problems)
    # Values were checked above; load only to apply the schema's types.
    return ConfigSchema(unknown=EXCLUDE).load(passed, partial=True)


def _flatten(errors: Any, where: str, schema: type[Schema] | None, out: list[str]) -> None:
    """Turn marshmallow's nested errors below ``where`` into ``location: message`` lines."""
    if isinstance(errors, dict):
        for key, value in errors.items():
            if key in ("value", "_schema"):
                # Dict fields nest errors as {k: {"value": ...}, k: {"key": ...}};
                # a Nested field given a non-mapping says so under "_schema".
                _flatten(value, where, schema, out)
            elif key == "key":
                _flatten(value, f"{where} (the key)", None, out)
            elif isinstance(key, int):
                _flatten(value, f"{where}[{key}]", None, out)
            else:
                field = schema._declared_fields.get(key) if schema is not None else None
                inner = field.schema.__class__ if isinstance(field, fields.Nested) else schema
                _flatten(value, f"{where}.{key}", inner, out)
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
