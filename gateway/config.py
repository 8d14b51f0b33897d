"""Load and validate the YAML config; resolve secrets; report every problem at once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml
from dotenv import dotenv_values
from flask import Flask
from werkzeug.http import is_hop_by_hop_header

from .config_schema import checked_part
from .egress import guarded_variants
from .headers import check_header
from .policy import METHODS, Client, PathPattern, PolicyError, Target, key_digest, parse_origin

__all__ = ["ConfigError", "GatewayConfig", "environment", "init_app", "load_config", "parse_config"]

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
# Below the 5 s keep-alive timeout of uvicorn, Node and many load balancers' backends.
DEFAULT_UPSTREAM_IDLE_MS = 4_000
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(click.ClickException):
    """The config cannot be used; ``problems`` lists every reason with its location.

    A ClickException, so that any ``flask`` command whose app cannot be built
    prints the problem list and exits 1 instead of showing a traceback.
    """

    def __init__(self, problems: list[str]) -> None:
        lines = [f"The config has {len(problems)} problem(s):", *(f"  {p}" for p in problems)]
        super().__init__("\n".join(lines))
        self.problems = problems


@dataclass(frozen=True)
class GatewayConfig:
    """A validated config: the clients by key digest, and the limits."""

    targets: Mapping[str, Target]
    clients: Mapping[bytes, Client]
    secret_names: tuple[str, ...]
    max_request_bytes: int
    body_timeout: float = 30.0
    write_timeout: float = 60.0
    guarded: tuple[bytes, ...] = field(default=(), repr=False)  # what the egress guard blocks
    upstream_idle: float = DEFAULT_UPSTREAM_IDLE_MS / 1000

    def client_for(self, key: str) -> Client | None:
        """Return the client whose key is ``key``, or None."""
        return self.clients.get(key_digest(key))

    def any_client_allows(self, origin: str) -> bool:
        """Return whether some client lets a page on ``origin`` call (for preflights)."""
        return any(client.allows_origin(origin) for client in self.clients.values())


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
            problems.append(f"{where}.{name}: {exc.reason}")


def _check_base_url(where: str, url: str, problems: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: must be an http or https URL such as https://api.example.com/v1")
    elif parts.username or parts.password or parts.query or parts.fragment:
        problems.append(f"{where}: must not hold credentials, a query or a fragment")


def _build_client(
    key: str,
    label: str,
    spec: dict[str, Any],
    targets: Mapping[str, Target] | None,
    secrets: Mapping[str, str | None],
    problems: list[str],
) -> Client | None:
    where = f"clients.{label}"
    before = len(problems)
    if not key or not re.fullmatch(r"[\x21-\x7e]+", key):
        problems.append(f"{where}: a client key must be printable ASCII with no spaces")
    complete = all(name in spec for name in ("target", "allowedMethods", "allowedPaths"))
    # None when the targets section itself is broken: that problem is reported already.
    target = None if targets is None else targets.get(spec.get("target"))
    if "target" in spec and target is None and targets is not None:
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
        label=label,
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
    clients_raw = raw.get("clients")
    labels = (
        {key: f"client#{i + 1}" for i, key in enumerate(clients_raw)}
        if isinstance(clients_raw, dict)
        else {}
    )

    def name_of(section: str, key: Any) -> str:
        return labels[key] if section == "clients" else str(key)

    # Keep checking what the schema accepted, so every problem is reported at once.
    data = checked_part(raw, name_of, problems)

    targets: dict[str, Target] = {}
    for name, spec in data.get("targets", {}).items():
        where = f"targets.{name}"
        if "baseUrl" in spec:
            _check_base_url(f"{where}.baseUrl", spec["baseUrl"], problems)
        defaults = spec.get("defaultHeaders", {})
        _check_headers(f"{where}.defaultHeaders", defaults, problems)
        for header in defaults:
            if header.lower() in ("host", "content-length") or is_hop_by_hop_header(header):
                problems.append(
                    f"{where}.defaultHeaders.{header}: the gateway sets this header itself"
                )
        targets[name] = Target(name, spec.get("baseUrl", "").rstrip("/"), tuple(defaults.items()))

    secrets = {
        name: _resolve(name, raw_value, env, problems)
        for name, raw_value in data.get("secrets", {}).items()
    }
    # What the egress guard keeps from clients: each secret as sent, and each
    # variable inside it (the raw key in "Bearer ${KEY}" is what an upstream echoes).
    guarded = [value for value in secrets.values() if value is not None]
    for raw_value in data.get("secrets", {}).values():
        guarded += [env[var] for var in _VAR.findall(raw_value) if var in env]
    clients: dict[bytes, Client] = {}
    for key, spec in data.get("clients", {}).items():
        known_targets = targets if "targets" in data else None
        client = _build_client(key, labels[key], spec, known_targets, secrets, problems)
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
        write_timeout=data.get("writeTimeoutMs", 60_000) / 1000,
        guarded=guarded_variants(guarded) if data.get("egressGuard", True) else (),
        upstream_idle=data.get("upstreamIdleMs", DEFAULT_UPSTREAM_IDLE_MS) / 1000,
    )


# --- reading the file ----------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice (the second would silently win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping below refuses it with its mark
        if duplicate:
            # Not the key itself: under clients it is a client key.
            raise yaml.constructor.ConstructorError(
                None, None, "a key written twice in the same mapping", key_node.start_mark
            )
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
        raise ConfigError([_yaml_problem(path, exc)]) from None
    except RecursionError:
        raise ConfigError([f"{path}: is nested too deeply to be a gateway config"]) from None
    try:
        return parse_config(raw, env)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
    except RecursionError:
        raise ConfigError([f"{path}: is nested too deeply to be a gateway config"]) from None


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """Say where the YAML broke, and what PyYAML was reading when it did."""

    def at(mark: yaml.Mark | None) -> str:
        return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)

    problem = getattr(exc, "problem", None) or "is not valid YAML"
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    text = f"{at(getattr(exc, 'problem_mark', None))}: {problem}"
    if context:
        text += f" ({context}"
        if context_mark is not None:
            text += f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
        text += ")"
    return text


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
    """Load the config named by ``GATEWAY_CONFIG`` into ``app.extensions``.

    A broken config raises ConfigError: whatever loads the app (gunicorn, flask
    run, Passenger) fails with the problem list rather than serve a part of it.
    """
    config = load_config(app.config["GATEWAY_CONFIG"], environment(app))
    app.extensions["gateway.config"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
