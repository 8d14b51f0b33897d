"""``flask check-config`` and ``flask keys``: validate a config, make and hash client keys.

Secrets are never printed; a key is printed once, by ``keys new``, and never read back.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from ..config.load import GatewayConfig
from ..config.schema import CLIENT_NAME, NAME_RULE
from ..config.source import environment, hand_over, load_config, read_config
from ..errors import ConfigError
from ..policy.access import Client, Target
from ..policy.keys import PREFIX, checksum_ok, is_key_item, key_digest, key_item, new_key
from ..settings import GLOBAL
from ..upstream import tls

__all__ = ["init_app"]

EXPIRY_WARNING = timedelta(days=14)
_MIGRATE = (
    "hash it with `flask --app gateway keys hash` and list the hash under keys: "
    "(docs/guides/upgrading-from-seed.md)"
)


def _keys_summary(client: Client, now: datetime) -> str:
    if any(item.plaintext for item in client.keys):
        return "key: plaintext in the config"
    active = sum(item.active(now) for item in client.keys)
    return f"keys: {active} of {len(client.keys)} active"


def _warnings(client: Client, now: datetime) -> list[str]:
    where = f"clients.{client.label}"
    if any(item.plaintext for item in client.keys):
        return [f"{where}: the client key is written in plaintext in the config; {_MIGRATE}"]
    found = []
    for i, item in enumerate(client.keys):
        if item.expires is None:
            continue
        when = f"{item.expires:%Y-%m-%dT%H:%M:%SZ}"
        if item.expires <= now:
            found.append(f"{where}.keys[{i}]: expired at {when}; remove it")
        elif item.expires - now <= EXPIRY_WARNING:
            days = (item.expires - now).days
            found.append(
                f"{where}.keys[{i}]: expires at {when} (in {days} days); "
                f"give the client a new key (`flask --app gateway keys new {client.label}`)"
            )
    if not any(item.active(now) for item in client.keys):
        found.append(f"{where}: no key is active now, so every call is refused")
    return found


def _trust(target: Target) -> str:
    if not target.base_url.startswith("https:"):
        return ""
    trust = f"trusts only {target.ca_bundle}" if target.ca_bundle else "default trust store"
    if target.client_cert:
        trust += f"; client certificate {target.client_cert}"
    return f" ({trust})"


def _probe(config: GatewayConfig, timeout: float) -> tuple[list[str], int]:
    lines, failed = [], 0
    for target in config.targets.values():
        if not target.base_url.startswith("https:"):
            continue
        problem = tls.probe(target, timeout)
        failed += problem is not None
        lines.append(f"  {target.name}: {problem or 'TLS handshake OK'}")
    return [f"probe: TLS handshake with each https target ({failed} failed):", *lines], failed


def _shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _summary(path: str, config: GatewayConfig, now: datetime) -> list[str]:
    lines = [f"{path}: OK"]
    lines.append(f"targets ({len(config.targets)}):")
    lines += [f"  {t.name}: {t.base_url}{_trust(t)}" for t in config.targets.values()]
    lines.append(f"secrets ({len(config.secret_names)}), all resolved:")
    lines += [f"  {name}" for name in config.secret_names]
    changed = [known for known in GLOBAL if config.settings[known.key] != known.default]
    lines.append(f"settings ({len(changed)} not at their default):")
    lines += [
        f"  {known.key}: {_shown(config.settings[known.key])} (default {_shown(known.default)})"
        for known in changed
    ]
    lines.append(f"clients ({len(config.clients)}):")
    warnings = []
    for client in config.clients:
        methods = ", ".join(sorted(client.methods))
        paths = ", ".join(p.text for p in client.paths)
        secrets = ", ".join(name for name, _ in client.secret_headers) or "no secret"
        lines.append(
            f"  {client.label} -> {client.target.name}: {methods} on {paths}; "
            f"sends {secrets}; {_keys_summary(client, now)}"
        )
        warnings += _warnings(client, now)
    if warnings:
        lines.append(f"warnings ({len(warnings)}):")
        lines += [f"  {warning}" for warning in warnings]
    return lines


@click.command("check-config")
@click.option(
    "--config",
    "path",
    type=click.Path(dir_okay=False),
    help="The YAML file to check (default: GATEWAY_CONFIG or instance/config.yaml).",
)
@click.option(
    "--probe",
    is_flag=True,
    help="Also connect to each https target and check its TLS handshake (no request is sent).",
)
@click.option(
    "--probe-timeout", default=5.0, show_default=True, help="Seconds to wait for each target."
)
@click.option(
    "--hand-over",
    "hand_over_fd",
    type=int,
    hidden=True,
    help="gunicorn.conf.py's: write what was checked to this open file descriptor.",
)
@with_appcontext
def check_config(
    path: str | None, probe: bool, probe_timeout: float, hand_over_fd: int | None
) -> None:
    """Validate the gateway config and print a summary, or every problem found.

    It reads the file itself: the app's own config is not needed (it may be
    missing or broken), only where secrets come from. Warnings (plaintext keys,
    keys about to expire, TLS files and plain http) do not fail the check; a
    failed ``--probe`` exits 1.
    """
    path = path or current_app.config["GATEWAY_CONFIG"]
    env = environment(current_app)
    try:
        text = read_config(path)  # read once: what is handed over is what was checked
        config = load_config(path, env, text)
    except ConfigError as exc:
        click.echo(exc.format_message(), err=True)
        raise SystemExit(1) from None
    if hand_over_fd is not None:
        with open(hand_over_fd, "wb", closefd=False) as out:
            out.write(hand_over(path, text, env))
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("\n".join(_summary(path, config, datetime.now(UTC))))
    if probe:
        lines, failed = _probe(config, probe_timeout)
        click.echo("\n".join(lines))
        if failed:
            raise SystemExit(1)


@click.group("keys")
def keys() -> None:
    """Make new client keys and hash existing ones for the config."""


@keys.command("new")
@click.argument("name")
def keys_new(name: str) -> None:
    """Print a new client key for client NAME, once, and the config item that stands for it."""
    if not CLIENT_NAME.match(name):
        raise click.BadParameter(NAME_RULE, param_hint="NAME")
    key = new_key()
    if not checksum_ok(key):  # the format promised to scanners, checked on every key made
        raise click.ClickException("the new key failed its own checksum; nothing was printed")
    click.echo(f"New client key for {name} (shown only now; the gateway keeps only its hash):\n")
    click.echo(f"  {key}\n")
    click.echo(f"Add this item to clients.{name}.keys in the config:\n")
    click.echo(f"  - {key_item(key)}")


@keys.command("hash")
@with_appcontext
def keys_hash() -> None:
    """Read a client key from standard input and print its sha256 item (the key is not echoed)."""
    if sys.stdin.isatty():
        text = click.prompt("Client key", hide_input=True, err=True)
    else:
        text = sys.stdin.read()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise click.ClickException("give exactly one client key on standard input")
    key = lines[0]
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise click.ClickException("a client key must be printable ASCII with no spaces")
    if is_key_item(key):
        raise click.ClickException("this is already a key hash; put it under keys: as it is")
    if key.startswith(PREFIX) and not checksum_ok(key):
        click.echo(
            "warning: this looks like a gk_ key, but its checksum does not match: "
            "was it cut short or mistyped?",
            err=True,
        )
    live = current_app.extensions.get("gateway.config")  # None: no usable config, no hint
    found = live.keys.get(key_digest(key)) if live is not None else None
    if found is not None and found[1].plaintext:
        click.echo(
            f"This is the plaintext key of clients.{found[0].label}: give that client a name "
            "as its map key, and list this item under its keys: "
            "(docs/guides/upgrading-from-seed.md).",
            err=True,
        )
    click.echo(key_item(key))


def init_app(app: Flask) -> None:
    """Register the CLI commands on ``app``."""
    app.cli.add_command(check_config)
    app.cli.add_command(keys)
