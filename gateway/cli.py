"""``flask check-config``: validate a config and say what it sets up, secrets unprinted.

With ``--probe`` it also shakes hands with each https target, as the gateway would.
"""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import tls
from .config import ConfigError, GatewayConfig, environment, load_config
from .policy import Target

__all__ = ["init_app"]


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


def _summary(path: str, config: GatewayConfig) -> list[str]:
    lines = [f"{path}: OK"]
    lines.append(f"targets ({len(config.targets)}):")
    lines += [f"  {t.name}: {t.base_url}{_trust(t)}" for t in config.targets.values()]
    lines.append(f"secrets ({len(config.secret_names)}), all resolved:")
    lines += [f"  {name}" for name in config.secret_names]
    lines.append(f"clients ({len(config.clients)}):")
    for client in config.clients.values():
        methods = ", ".join(sorted(client.methods))
        paths = ", ".join(p.text for p in client.paths)
        secrets = ", ".join(name for name, _ in client.secret_headers) or "no secret"
        lines.append(
            f"  {client.label} -> {client.target.name}: {methods} on {paths}; sends {secrets}"
        )
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
@with_appcontext
def check_config(path: str | None, probe: bool, probe_timeout: float) -> None:
    """Validate the gateway config and print a summary, or every problem found.

    It reads the file itself: the app's own config is not needed, only where
    secrets come from. (If the app's config is broken, the flask command cannot
    build the app, and says the same problems before this runs.) Warnings go
    to stderr and do not fail it; a failed ``--probe`` exits 1.
    """
    path = path or current_app.config["GATEWAY_CONFIG"]
    try:
        config = load_config(path, environment(current_app))
    except ConfigError as exc:
        click.echo(exc.format_message(), err=True)
        raise SystemExit(1) from None
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("\n".join(_summary(path, config)))
    if probe:
        lines, failed = _probe(config, probe_timeout)
        click.echo("\n".join(lines))
        if failed:
            raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Register the CLI commands on ``app``."""
    app.cli.add_command(check_config)
