"""Validate a config read from YAML; resolve its secrets; report every problem at once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from werkzeug.http import is_hop_by_hop_header

from ..errors import ConfigError, PolicyError
from ..policy.access import Client, Target
from ..policy.headers import check_header
from ..policy.keys import KeyItem, key_digest
from ..policy.secret_forms import GuardedSecrets, guarded_variants
from ..policy.sessions import MIN_SECRET_LENGTH, Session, SessionKeys
from ..settings import GLOBAL, default
from ..upstream import tls
from .clients import build_clients, client_labels, limit_set
from .schema import checked_part

__all__ = ["SECRET_VARIABLE", "GatewayConfig", "parse_config"]

# A `${VAR}` reference in a secret.
SECRET_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class GatewayConfig:
    """A validated config: the clients, every key by its digest, and the limits."""

    targets: Mapping[str, Target]
    clients: tuple[Client, ...]
    keys: Mapping[bytes, tuple[Client, KeyItem]] = field(repr=False)
    secret_names: tuple[str, ...]
    max_request_bytes: int
    body_timeout: float = default("bodyTimeoutMs") / 1000
    write_timeout: float = default("writeTimeoutMs") / 1000
    guarded: GuardedSecrets | None = field(default=None, repr=False)  # what the egress guard blocks
    # Every client's allowedOrigins together: one set lookup per browser request.
    origins: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()
    limit_storage: str = default("limits.storage")  # where counts live (spend.store)
    fail_open: bool = default("limits.failOpen")  # admit uncounted when storage is down
    upstream_idle: float = default("upstreamIdleMs") / 1000
    trusted_proxies: int = default("trustedProxies")  # X-Forwarded-For hops believed
    metrics_token: str | None = field(default=None, repr=False)  # None: no /metrics
    # Each GLOBAL setting's value as the config has it (its default if not written).
    settings: Mapping[str, Any] = field(default_factory=dict)
    max_model_labels: int = default("metrics.maxModelLabels")  # model label values per worker
    sessions: SessionKeys | None = field(default=None, repr=False)  # None: no sessions
    by_label: Mapping[str, Client] = field(default_factory=dict, repr=False)

    def client_for(self, key: str, now: datetime) -> tuple[Client, KeyItem]:
        """Return the client whose key is ``key`` and that key; raise ``PolicyError`` if none.

        One dict lookup by the key's digest, whatever the number of keys; a
        hash sent as if it were a key is just an unknown key.
        """
        found = self.keys.get(key_digest(key))
        if found is None:
            raise PolicyError("invalid_client_key", "is not known to this gateway")
        client, item = found
        try:
            item.check(now)
        except PolicyError as exc:
            raise PolicyError(exc.code, exc.reason, subject=client.label) from None
        return found

    def session_for(self, token: str, now: datetime) -> tuple[Client, Session]:
        """Return the client and session of a ``gs_`` token; raise ``PolicyError`` if refused."""
        if self.sessions is None:
            raise PolicyError("invalid_session_token", "is not accepted: sessions are off here")
        session = self.sessions.verify(token, now.timestamp())
        client = self.by_label.get(session.client)
        rules = client.sessions if client is not None else None
        if rules is None:
            raise PolicyError("invalid_session_token", "names a client that takes no sessions")
        if rules.not_before is not None and session.issued < rules.not_before.timestamp():
            raise PolicyError("invalid_session_token", "was minted before sessions.notBefore")
        if session.expires - session.issued > rules.ttl:
            raise PolicyError("invalid_session_token", "outlives the client's sessions.ttl")
        return client, session

    def any_client_allows(self, origin: str) -> bool:
        """Return whether some client lets a page on ``origin`` call (preflights, refusals)."""
        return "*" in self.origins or origin.lower() in self.origins


# --- cross-checks the schemas cannot express ----------------------------------


def _resolve(name: str, raw: str, env: Mapping[str, str], problems: list[str]) -> str | None:
    missing = [var for var in SECRET_VARIABLE.findall(raw) if var not in env]
    if missing:
        for var in missing:
            problems.append(
                f"secrets.{name}: environment variable {var} is not set "
                "(set it in the environment or in .env)"
            )
        return None
    value = SECRET_VARIABLE.sub(lambda m: env[m.group(1)], raw)
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


_TLS_FIELDS = {"caBundle": "ca_bundle", "clientCert": "client_cert", "clientKey": "client_key"}


def _check_tls(
    where: str, spec: dict[str, Any], base_dir: Path, problems: list[str], warnings: list[str]
) -> dict[str, str]:
    """Check a target's TLS files; return them as Target fields, with absolute paths."""
    paths = {key: (base_dir / spec[key]).absolute() for key in _TLS_FIELDS if key in spec}
    if not paths:
        return {}
    before = len(problems)
    if "baseUrl" in spec and urlsplit(spec["baseUrl"]).scheme != "https":
        for key in paths:
            problems.append(f"{where}.{key}: applies only to an https baseUrl")
        return {}
    if "clientKey" in paths and "clientCert" not in paths:
        problems.append(f"{where}.clientKey: needs clientCert, the certificate it belongs to")
    if "caBundle" in paths:
        problem = tls.ca_bundle_problem(paths["caBundle"])
        if problem:
            problems.append(
                f"{where}.caBundle: {paths['caBundle']}: {problem}; write the path of a PEM "
                "file with the CA certificate(s), relative to the config file"
            )
    if "clientCert" in paths:
        key = paths.get("clientKey")
        for field_name, problem in tls.client_cert_problems(paths["clientCert"], key):
            problems.append(f"{where}.{field_name}: {paths[field_name]}: {problem}")
        warning = tls.key_file_warning(key or paths["clientCert"])
        if warning:
            warnings.append(f"{where}.{'clientKey' if key else 'clientCert'}: {warning}")
    if len(problems) > before:
        return {}
    return {_TLS_FIELDS[key]: str(path) for key, path in paths.items()}


def _check_storage(url: str, problems: list[str]) -> None:
    if url == "sqlite" or url.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        return
    problems.append(
        "limits.storage: write sqlite (a file in the instance folder), "
        "sqlite:////absolute/path.sqlite3, or redis://host:6379/0"
    )


def _value(data: Mapping[str, Any], key: str) -> Any:
    """Return the top-level setting ``key`` (dotted below a section) or its table default."""
    *sections, name = key.split(".")
    for section in sections:
        data = data.get(section) or {}
    return data.get(name, default(key))


def parse_config(raw: Any, env: Mapping[str, str], base_dir: Path | None = None) -> GatewayConfig:
    """Validate ``raw`` (the parsed YAML) and resolve secrets from ``env``.

    Relative file paths in it are relative to ``base_dir`` (the config file's
    folder; the working directory if None).
    """
    base_dir = base_dir or Path()
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping with targets, secrets and clients"])
    problems: list[str] = []
    warnings: list[str] = []
    clients_raw = raw.get("clients")
    labels = client_labels(clients_raw, problems) if isinstance(clients_raw, dict) else {}

    def name_of(section: str, key: Any) -> str:
        return labels[key] if section == "clients" else str(key)

    # Keep checking what the schema accepted, so every problem is reported at once.
    data = checked_part(raw, name_of, problems)

    targets: dict[str, Target] = {}
    for name, spec in data.get("targets", {}).items():
        where = f"targets.{name}"
        if "baseUrl" in spec:
            _check_base_url(f"{where}.baseUrl", spec["baseUrl"], problems)
            warning = tls.plain_http_warning(spec["baseUrl"])
            if warning:
                warnings.append(f"{where}.baseUrl: {warning}")
        defaults = spec.get("defaultHeaders", {})
        _check_headers(f"{where}.defaultHeaders", defaults, problems)
        for header in defaults:
            if header.lower() in ("host", "content-length") or is_hop_by_hop_header(header):
                problems.append(
                    f"{where}.defaultHeaders.{header}: the gateway sets this header itself"
                )
        tls_files = _check_tls(where, spec, base_dir, problems, warnings)
        targets[name] = Target(
            name,
            spec.get("baseUrl", "").rstrip("/"),
            tuple(defaults.items()),
            **tls_files,
            limits=limit_set(spec.get("limits", {})),
            inject_usage=spec.get("injectUsage", default("targets.<name>.injectUsage")),
        )

    secrets = {
        name: _resolve(name, raw_value, env, problems)
        for name, raw_value in data.get("secrets", {}).items()
    }
    # What the egress guard keeps from clients: each secret as sent, and each
    # variable inside it (the raw key in "Bearer ${KEY}" is what an upstream echoes).
    guarded = [value for value in secrets.values() if value is not None]
    for raw_value in data.get("secrets", {}).values():
        guarded += [env[var] for var in SECRET_VARIABLE.findall(raw_value) if var in env]
    storage = _value(data, "limits.storage")
    _check_storage(storage, problems)
    clients, keys = build_clients(
        clients_raw if isinstance(clients_raw, dict) else {},
        data.get("clients", {}),
        labels,
        targets if "targets" in data else None,
        secrets,
        problems,
    )
    metrics_token = _metrics_token(data.get("metrics"), secrets, keys, problems)
    sessions = _session_keys(data, secrets, keys, clients, problems)
    if problems:
        raise ConfigError(problems)
    return GatewayConfig(
        targets=targets,
        clients=clients,
        keys=keys,
        origins=frozenset(origin for client in clients for origin in client.origins),
        secret_names=tuple(secrets),
        max_request_bytes=_value(data, "maxRequestBytes"),
        body_timeout=_value(data, "bodyTimeoutMs") / 1000,
        write_timeout=_value(data, "writeTimeoutMs") / 1000,
        guarded=guarded_variants(guarded) if _value(data, "egressGuard") else None,
        warnings=tuple(warnings),
        limit_storage=storage,
        fail_open=_value(data, "limits.failOpen"),
        upstream_idle=_value(data, "upstreamIdleMs") / 1000,
        trusted_proxies=_value(data, "trustedProxies"),
        metrics_token=metrics_token,
        settings={known.key: _value(data, known.key) for known in GLOBAL},
        max_model_labels=_value(data, "metrics.maxModelLabels"),
        sessions=sessions,
        by_label={client.label: client for client in clients},
    )


def _session_keys(
    data: Mapping[str, Any],
    secrets: Mapping[str, str | None],
    keys: Mapping[bytes, Any],
    clients: tuple[Client, ...],
    problems: list[str],
) -> SessionKeys | None:
    """Return the secrets that sign and verify session tokens, or None when none are set."""
    if "sessionSecretRef" in data and "sessionSecretRefs" in data:
        problems.append(
            "sessionSecretRefs: write either sessionSecretRef or sessionSecretRefs, not both"
        )
        return None
    where = "sessionSecretRefs" if "sessionSecretRefs" in data else "sessionSecretRef"
    refs = data.get("sessionSecretRefs") or ([data[where]] if where in data else [])
    if not refs:
        for client in clients:
            if client.sessions is not None:
                problems.append(
                    f"clients.{client.label}.sessions: needs sessionSecretRef at the top level, "
                    f"the name of a secret of {MIN_SECRET_LENGTH}+ characters that signs tokens"
                )
        return None
    values = []
    for i, ref in enumerate(refs):
        location = f"{where}[{i}]" if where == "sessionSecretRefs" else where
        if ref not in secrets:
            known = ", ".join(sorted(secrets)) or "none"
            problems.append(f"{location}: unknown secret {ref!r}; known secrets: {known}")
        elif secrets[ref] is not None and len(secrets[ref]) < MIN_SECRET_LENGTH:
            problems.append(
                f"{location}: secret {ref!r} is shorter than {MIN_SECRET_LENGTH} characters; "
                "use a long random secret (openssl rand -hex 32)"
            )
        elif secrets[ref] is not None and key_digest(secrets[ref]) in keys:
            problems.append(f"{location}: secret {ref!r} is also a client key")
        elif secrets[ref] is not None:
            values.append(secrets[ref])
    return SessionKeys(values) if len(values) == len(refs) else None


# The shortest metrics token accepted: anyone who guesses it reads the counts.
MIN_METRICS_TOKEN_LENGTH = 16


def _metrics_token(
    spec: dict[str, Any] | None,
    secrets: Mapping[str, str | None],
    keys: Mapping[bytes, Any],
    problems: list[str],
) -> str | None:
    """Return the token ``GET /metrics`` needs, or None when metrics are off."""
    if spec is None:
        return None
    ref = spec["tokenRef"]
    if ref not in secrets:
        known = ", ".join(sorted(secrets)) or "none"
        problems.append(f"metrics.tokenRef: unknown secret {ref!r}; known secrets: {known}")
        return None
    token = secrets[ref]
    if token is None:
        return None  # the secret's own problem is reported already
    if len(token) < MIN_METRICS_TOKEN_LENGTH:
        problems.append(
            f"metrics.tokenRef: secret {ref!r} is shorter than {MIN_METRICS_TOKEN_LENGTH} "
            "characters; use a long random token (openssl rand -hex 32)"
        )
    if key_digest(token) in keys:
        problems.append(
            f"metrics.tokenRef: secret {ref!r} is also a client key; a client key must not "
            "read the metrics"
        )
    return token


# --- reading the file ----------------------------------------------------------
