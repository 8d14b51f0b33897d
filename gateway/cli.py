"""``flask check-config``: validate a config and say what it sets up, secrets unprinted."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from .config import ConfigError, GatewayConfig, environment, load_config

__all__ = ["init_app"]


def _summary(path: str, config: GatewayConfig) -> list[str]:
    lines = [f"{path}: OK"]
    lines.append(f"targets ({len(config.targets)}):")
    lines += [f"  {t.name}: {t.base_url}" for t in config.targets.values()]
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
@with_appcontext
def check_config(path: str | None) -> None:
    """Validate the gateway config and print a summary, or every problem found.

    It reads the file itself: the app's own config is not needed, only where
    secrets come from. (If the app's config is broken, the flask command cannot
    build the app, and says the same problems before this runs.)
    """
    path = path or current_app.config["GATEWAY_CONFIG"]
    try:
        config = load_config(path, environment(current_app))
    except ConfigError as exc:
        click.echo(exc.format_message(), err=True)
        raise SystemExit(1) from None
    click.echo("\n".join(_summary(path, config)))


def init_app(app: Flask) -> None:
    """Register the CLI commands on ``app``."""
    app.cli.add_command(check_config)
