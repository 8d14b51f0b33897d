"""Load and validate the YAML config; resolve secrets; report every problem at once."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml
from dotenv import dotenv_values
from flask import Flask
from marshmallow import EXCLUDE, Schema, fields, validate
from werkzeug.http import is_hop_by_hop_header

from .headers import check_header
from .policy import METHODS, Client, PathPattern, PolicyError, Target, key_digest, parse_origin

__all__ = ["ConfigError", "GatewayConfig", "environment", "init_app", "load_config", "parse_config"]

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every reason with its location."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class GatewayConfig:
    """A validated config: the clients by key digest, and the limits."""

    targets: Mapping[str, Target]
    clients: Mapping[bytes, Client]
    secret_names: tuple[str, ...]
    max_request_bytes: int
    body_timeout: float = 30.0

    def client_for(self, key: str) -> Client | None:
        """Return the client whose key is ``key``, or None."""
        return self.clients.get(key_digest(key))

    def any_client_allows(self, origin: str) -> bool:
        """Return whether some client lets a page on ``origin`` call (for preflights)."""
        return any(client.allows_origin(origin) for client in self.clients.values())


# --- schemas -----------------------------------------------------------------

_REQUIRED = {"required": "is required"}


class _Strict(Schema):
    class Meta:
        ordered = True


def _non_empty(hint: str) -> validate.Length:
    return validate.Length(min=1, error=f"must not be empty; {hint}")


class TargetSchema(_Strict):
    baseUrl = fields.String(required=True, error_messages=_REQUIRED)
    defaultHeaders = fields.Dict(keys=fields.String(), values=fields.String())


class ClientSchema(_Strict):
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


class ConfigSchema(_Strict):
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


def _schema_at(path: list[str | int]) -> type[Schema] | None:
    """Return the schema that holds the mapping at ``path`` (for did-you-mean hints)."""
    names = [p for p in path if isinstance(p, str)]
    if len(names) == 0:
        return ConfigSchema
    if len(names) == 2 and names[0] == "targets":
        return TargetSchema
    if len(names) == 2 and names[0] == "clients":
        return ClientSchema
    return None


def _location(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _flatten(errors: Any, path: list[str | int], out: list[str]) -> None:
    """Turn marshmallow's nested error dict into ``location: message`` lines."""
    if isinstance(errors, dict):
        for key, value in errors.items():
            if key in ("value", "key"):
                # Dict fields nest errors as {k: {"value": ...}}; "key" means the key itself.
                _flatten(value, path, out)
            else:
                _flatten(value, [*path, key], out)
        return
    for message in errors if isinstance(errors, list) else [errors]:
        if message == "Unknown field.":
            schema = _schema_at(path[:-1])
            hint = ""
            if schema is not None:
                close = difflib.get_close_matches(str(path[-1]), schema._declared_fields, n=1)
                if close:
                    hint = f"; did you mean {close[0]}?"
            out.append(f"{_location(path)}: unknown field{hint}")
        else:
            text = str(message).rstrip(".")
            out.append(f"{_location(path)}: {text[:1].lower()}{text[1:]}")


# --- cross-checks the schemas cannot express ----------------------------------


def _resolve(name: str, raw: str, env: Mapping[str, str], problems: list[str]) -> str | None:
    missing = [var for var in _VAR.findall(raw) if var not in env]
    if missing:
        for var in missing:
            problems.append(
                f"secrets.{name}: environment variable {var} is not set "
                "(set it in the environment or in .env)"
            )
        return None
    value = _VAR.sub(lambda m: env[m.group(1)], raw)
    if not value.strip():
        problems.append(f"secrets.{name}: resolves to an empty value")
        return None
    if re.search(r"[\r\n\x00]", value):
        problems.append(f"secrets.{name}: value holds a line break or NUL")
        return None
    return value


def _check_headers(where: str, headers: Mapping[str, str], problems: list[str]) -> None:
    for name, value in headers.items():
        try:
            check_header(name, value)
        except PolicyError as exc:
            problems.append(f"{where}.{name}: {exc.message[0].lower()}{exc.message[1:]}")


def _check_base_url(where: str, url: str, problems: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: must be an http or https URL such as https://api.example.com/v1")
    elif parts.username or parts.password or parts.query or parts.fragment:
        problems.append(f"{where}: must not hold credentials, a query or a fragment")


def _build_client(
    key: str,
    spec: dict[str, Any],
    index: int,
    targets: Mapping[str, Target],
    secrets: Mapping[str, str | None],
    problems: list[str],
) -> Client | None:
    where = f"clients.{key}"
    before = len(problems)
    if not key or not re.fullmatch(r"[\x21-\x7e]+", key):
        problems.append(f"{where}: a client key must be printable ASCII with no spaces")
    complete = all(name in spec for name in ("target", "allowedMethods", "allowedPaths"))
    target = targets.get(spec.get("target"))
    if "target" in spec and target is None:
        known = ", ".join(sorted(targets)) or "none"
        problems.append(
            f"{where}.target: unknown target {spec['target']!r}; known targets: {known}"
        )

    refs = [(f"{where}.authHeaderRef", "Authorization", spec.get("authHeaderRef"))]
    refs.append((f"{where}.rapidApiKeyRef", "X-RapidAPI-Key", spec.get("rapidApiKeyRef")))
    for header, ref in spec.get("secretHeaders", {}).items():
        refs.append((f"{where}.secretHeaders.{header}", header, ref))
        try:
            check_header(header, "")
        except PolicyError:
            problems.append(f"{where}.secretHeaders.{header}: not a valid header name")
    secret_headers = []
    for location, header, ref in refs:
        if ref is None:
            continue
        if ref not in secrets:
            known = ", ".join(sorted(secrets)) or "none"
            problems.append(f"{location}: unknown secret {ref!r}; known secrets: {known}")
        elif secrets[ref] is not None:
            secret_headers.append((header, secrets[ref]))

    methods = set()
    for i, method in enumerate(spec.get("allowedMethods", [])):
        if method == "*" or method.upper() in METHODS:
            methods.add(method.upper())
        else:
            problems.append(
                f"{where}.allowedMethods[{i}]: unknown method {method!r}; "
                f'use {", ".join(METHODS)}, or "*" for all'
            )
    paths = []
    for i, text in enumerate(spec.get("allowedPaths", [])):
        try:
            paths.append(PathPattern.compile(text))
        except ValueError as exc:
            problems.append(f"{where}.allowedPaths[{i}]: {exc}")
    origins = set()
    for i, text in enumerate(spec.get("allowedOrigins", [])):
        try:
            origins.add("*" if text == "*" else parse_origin(text))
        except ValueError as exc:
            problems.append(f"{where}.allowedOrigins[{i}]: {exc}")

    if len(problems) > before or target is None or not complete:
        return None
    return Client(
        label=f"client#{index + 1}",
        target=target,
        secret_headers=tuple(secret_headers),
        methods=frozenset(methods),
        paths=tuple(paths),
        origins=frozenset(origins),
        read_timeout=spec.get("timeoutMs", 30_000) / 1000,
        connect_timeout=spec.get("connectTimeoutMs", 5_000) / 1000,
    )


def parse_config(raw: Any, env: Mapping[str, str]) -> GatewayConfig:
    """Validate ``raw`` (the parsed YAML) and resolve secrets from ``env``."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping with targets, secrets and clients"])
    problems: list[str] = []
    errors = ConfigSchema().validate(raw)
    _flatten(errors, [], problems)
    # Keep checking what the schema accepted, so every problem is reported at once.
    data = ConfigSchema(unknown=EXCLUDE).load(_valid_part(raw, errors), partial=True)

    targets: dict[str, Target] = {}
    for name, spec in data.get("targets", {}).items():
        _check_base_url(f"targets.{name}.baseUrl", spec["baseUrl"], problems)
        defaults = spec.get("defaultHeaders", {})
        _check_headers(f"targets.{name}.defaultHeaders", defaults, problems)
        for header in defaults:
            if header.lower() in ("host", "content-length") or is_hop_by_hop_header(header):
                problems.append(
                    f"targets.{name}.defaultHeaders.{header}: the gateway sets this header itself"
                )
        targets[name] = Target(name, spec["baseUrl"].rstrip("/"), tuple(defaults.items()))

    secrets = {
        name: _resolve(name, raw_value, env, problems)
        for name, raw_value in data.get("secrets", {}).items()
    }
    clients: dict[bytes, Client] = {}
    for index, (key, spec) in enumerate(data.get("clients", {}).items()):
        client = _build_client(key, spec, index, targets, secrets, problems)
        if client is not None:
            clients[key_digest(key)] = client
    if problems:
        raise ConfigError(problems)
    return GatewayConfig(
        targets=targets,
        clients=clients,
        secret_names=tuple(secrets),
        max_request_bytes=data.get("maxRequestBytes", DEFAULT_MAX_REQUEST_BYTES),
        body_timeout=data.get("bodyTimeoutMs", 30_000) / 1000,
    )


def _valid_part(raw: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    """Return ``raw`` less what the schema rejected, keeping the valid fields of an entry."""
    result = {}
    for section, value in raw.items():
        if section not in errors:
            result[section] = value
        elif section in ("targets", "clients", "secrets") and isinstance(value, dict):
            section_errors = errors[section] if isinstance(errors[section], dict) else {}
            result[section] = {}
            for name, entry in value.items():
                entry_errors = section_errors.get(name)
                if entry_errors is None:
                    result[section][name] = entry
                    continue
                bad = entry_errors.get("value") if isinstance(entry_errors, dict) else None
                if "key" not in entry_errors and isinstance(bad, dict) and isinstance(entry, dict):
                    result[section][name] = {k: v for k, v in entry.items() if k not in bad}
    return result


# --- reading the file ----------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice (the second would silently win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str]) -> GatewayConfig:
    """Read the YAML file at ``path`` and return the validated config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: file not found; copy instance/config.example.yaml to "
                "instance/config.yaml or set GATEWAY_CONFIG"
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot be read ({type(exc).__name__})"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "is not valid YAML"
        raise ConfigError([f"{where}: {problem}"]) from None
    try:
        return parse_config(raw, env)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None


# --- wiring --------------------------------------------------------------------


def environment(app: Flask) -> Mapping[str, str]:
    """Return the variables secrets resolve from: ``.env`` first, the real environment wins.

    Tests pass ``GATEWAY_ENVIRON`` instead.
    """
    if app.config.get("GATEWAY_ENVIRON") is not None:
        return app.config["GATEWAY_ENVIRON"]
    env_file = app.config["GATEWAY_ENV_FILE"]
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file else {}
    return {**values, **os.environ}


def init_app(app: Flask) -> None:
    """Load the YAML named by ``GATEWAY_CONFIG`` into ``app.config["GATEWAY"]``.

    Under the ``flask`` CLI a broken config does not stop the app from loading,
    so that ``flask check-config`` can report it; everywhere else it raises.
    """
    try:
        config = load_config(app.config["GATEWAY_CONFIG"], environment(app))
    except ConfigError:
        if click.get_current_context(silent=True) is None:
            raise
        app.config["GATEWAY"] = None
        return
    app.config["GATEWAY"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
