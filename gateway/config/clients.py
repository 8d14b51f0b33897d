"""Build each client from its config entry: its name, its keys, its policy.

A client entry with ``keys:`` is named by its map key and accepts the keys whose
SHA-256 is listed; any other entry is seed-style: its map key is the plaintext
key, with an optional ``name:``. Problems name a client by its name, or by its
position (``client#3``), never by its key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from ..errors import PolicyError
from ..policy.access import METHODS, Client, PathPattern, Target, parse_origin
from ..policy.headers import check_header
from ..policy.keys import KeyItem, is_key_item, key_digest
from ..policy.limits import LimitSet, parse_cost, parse_rate
from ..policy.models import ModelPattern
from ..policy.prices import Price, PriceTable
from ..policy.sessions import SessionPolicy, parse_ttl
from ..settings import default
from .schema import CLIENT_NAME, NAME_RULE

__all__ = ["build_clients", "client_labels", "is_named", "limit_set", "price_table"]

_READ_TIMEOUT_MS = default("clients.<name>.timeoutMs")
_CONNECT_TIMEOUT_MS = default("clients.<name>.connectTimeoutMs")


def is_named(spec: Any) -> bool:
    """Return whether the raw entry ``spec`` is a named client (it has ``keys:``)."""
    return isinstance(spec, dict) and "keys" in spec


def client_labels(clients: Mapping[Any, Any], problems: list[str]) -> dict[Any, str]:
    """Return how each raw client entry is named: its name if valid and free, else its position."""
    labels: dict[Any, str] = {}
    taken: dict[str, str] = {}
    for i, (key, spec) in enumerate(clients.items()):
        position = f"client#{i + 1}"
        name = key if is_named(spec) else spec.get("name") if isinstance(spec, dict) else None
        labels[key] = position
        if is_named(spec) and not (isinstance(key, str) and CLIENT_NAME.match(key)):
            # Not echoed: it may be a plaintext key that was given keys: by mistake.
            problems.append(
                f"clients.{position}: a client with keys is named by its map key, which {NAME_RULE}"
            )
        elif isinstance(name, str) and CLIENT_NAME.match(name):
            if name in taken:
                problems.append(
                    f"clients.{position}: the name {name!r} is already used by "
                    f"{taken[name]}; names must be unique"
                )
            else:
                labels[key] = name
                taken[name] = position
    return labels


def _key_items(
    key: Any, spec: dict[str, Any], named: bool, where: str, problems: list[str]
) -> list[KeyItem]:
    if named:
        if "name" in spec:
            problems.append(
                f"{where}.name: a client with keys is named by its map key; remove name"
            )
        return [
            KeyItem(bytes.fromhex(item["sha256"]), item.get("expires"), item.get("notBefore"))
            for item in spec.get("keys", [])
        ]
    if not isinstance(key, str) or not re.fullmatch(r"[\x21-\x7e]+", key):
        problems.append(f"{where}: a client key must be printable ASCII with no spaces")
        return []
    if is_key_item(key):
        problems.append(
            f"{where}: the map key is a key hash; a client with hashed keys is named by its "
            "map key and lists the hash under keys: (see docs/guides/upgrading-from-seed.md)"
        )
        return []
    return [KeyItem(key_digest(key), plaintext=True)]


# Thousands of clients share a few patterns: each is compiled once (and the
# clients share the pattern objects).
_pattern = functools.lru_cache(maxsize=4096)(PathPattern.compile)


def _build_client(
    label: str,
    spec: dict[str, Any],
    keys: list[KeyItem],
    targets: Mapping[str, Target] | None,
    secrets: Mapping[str, str | None],
    problems: list[str],
) -> Client | None:
    where = f"clients.{label}"
    before = len(problems)
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
            paths.append(_pattern(text))
        except ValueError as exc:
            problems.append(f"{where}.allowedPaths[{i}]: {exc}")
    origins = set()
    for i, text in enumerate(spec.get("allowedOrigins", [])):
        try:
            origins.add("*" if text == "*" else parse_origin(text))
        except ValueError as exc:
            problems.append(f"{where}.allowedOrigins[{i}]: {exc}")

    if "sessions" in spec and not origins:
        problems.append(
            f"{where}.sessions: needs allowedOrigins, the web origins its session tokens are for"
        )
    _check_ceilings(where, spec, target, problems)
    if len(problems) > before or target is None or not complete or not keys:
        return None
    return Client(
        label=label,
        target=target,
        secret_headers=tuple(secret_headers),
        methods=frozenset(methods),
        paths=tuple(paths),
        origins=frozenset(origins),
        read_timeout=spec.get("timeoutMs", _READ_TIMEOUT_MS) / 1000,
        connect_timeout=spec.get("connectTimeoutMs", _CONNECT_TIMEOUT_MS) / 1000,
        keys=tuple(keys),
        limits=limit_set(spec.get("limits", {})),
        models=tuple(ModelPattern.compile(text) for text in spec.get("allowedModels", [])),
        max_tokens=spec.get("maxTokens"),
        default_max_tokens=spec.get("defaultMaxTokens", target.default_max_tokens),
        sessions=_sessions(spec["sessions"]) if "sessions" in spec else None,
    )


def _check_ceilings(
    where: str, spec: dict[str, Any], target: Target | None, problems: list[str]
) -> None:
    """Refuse a default ceiling above the client's maxTokens: every call using it would fail."""
    ceiling = spec.get("maxTokens")
    if ceiling is None:
        return
    if spec.get("defaultMaxTokens", 0) > ceiling:
        problems.append(f"{where}.defaultMaxTokens: must be at most maxTokens ({ceiling})")
    elif "defaultMaxTokens" not in spec and (target and target.default_max_tokens or 0) > ceiling:
        problems.append(
            f"{where}.maxTokens: is below its target's defaultMaxTokens "
            f"({target.default_max_tokens}); set the client's own defaultMaxTokens"
        )


def _sessions(spec: dict[str, Any]) -> SessionPolicy:
    """Return a client's ``sessions:`` policy (its values were checked by the schema)."""
    return SessionPolicy(
        ttl=parse_ttl(spec.get("ttl", default("clients.<name>.sessions.ttl"))),
        limits=limit_set(spec.get("limits", {})),
        not_before=spec.get("notBefore"),
    )


def limit_set(spec: dict[str, Any]) -> LimitSet:
    """Return the limits of a ``limits:`` entry (its rates were checked by the schema)."""
    return LimitSet(
        requests=tuple(parse_rate(text) for text in spec.get("requests", [])),
        concurrent=spec.get("concurrent"),
        tokens=tuple(parse_rate(text) for text in spec.get("tokens", [])),
        cost=tuple(parse_cost(text) for text in spec.get("cost", [])),
    )


def price_table(spec: dict[str, Any]) -> PriceTable:
    """Return the prices of a ``prices:`` entry, in the order written (checked by the schema)."""
    return PriceTable.build(
        (pattern, Price(price["input"], price["output"])) for pattern, price in spec.items()
    )


def build_clients(
    raw: Mapping[Any, Any],
    checked: Mapping[Any, dict[str, Any]],
    labels: Mapping[Any, str],
    targets: Mapping[str, Target] | None,
    secrets: Mapping[str, str | None],
    problems: list[str],
) -> tuple[tuple[Client, ...], dict[bytes, tuple[Client, KeyItem]]]:
    """Return the clients built from the ``checked`` entries, and every key by its digest.

    ``raw`` is the entries as written (``checked`` leaves out invalid fields, so
    a named client whose keys are all invalid must still be told from a seed one).
    """
    clients = []
    by_digest: dict[bytes, tuple[Client, KeyItem]] = {}
    first_seen: dict[bytes, str] = {}
    for key, spec in checked.items():
        named = is_named(raw[key])
        where = f"clients.{labels[key]}"
        items = _key_items(key, spec, named, where, problems)
        for i, item in enumerate(items):
            location = f"{where}.keys[{i}]" if named else where
            if item.digest in first_seen:
                problems.append(
                    f"{location}: the same key as {first_seen[item.digest]}; "
                    "a key belongs to one client, listed once"
                )
            else:
                first_seen[item.digest] = location
        client = _build_client(labels[key], spec, items, targets, secrets, problems)
        if client is not None:
            clients.append(client)
            by_digest.update((item.digest, (client, item)) for item in items)
    return tuple(clients), by_digest
