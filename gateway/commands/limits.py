"""``flask limits reset``: lift a block by clearing one client's current windows."""

from __future__ import annotations

import getpass
import logging

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from ..config.source import require
from ..spend.budgets import KINDS, reset_budgets
from ..spend.store.base import StoreUnavailable

__all__ = ["init_app"]

log = logging.getLogger(__name__)

limits = AppGroup("limits", help="Look after the limit counters in the limit storage.")


@limits.command("reset")
@click.argument("client")
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    multiple=True,
    help="Only this kind of limit (repeatable; default: every kind).",
)
@with_appcontext
def reset(client: str, kind: tuple[str, ...]) -> None:
    """Clear what CLIENT has spent in its current windows; calls in flight keep their holds."""
    require(current_app, "flask limits reset")
    config = current_app.extensions["gateway.config"]
    found = config.by_label.get(client)
    if found is None:
        known = ", ".join(sorted(config.by_label)) or "none"
        raise click.BadParameter(f"no client {client!r}; clients: {known}", param_hint="CLIENT")
    kinds = kind or KINDS
    try:
        cleared = reset_budgets(current_app.extensions["gateway.limits"], found, kinds)
    except StoreUnavailable as exc:
        raise click.ClickException(f"the limit storage cannot be written ({exc})") from None
    names = ", ".join(f"{b.kind} {b.rate.text}" for b in cleared) or "none"
    # Who lifted a block is worth keeping: the log line names the operator's account.
    log.warning("limits reset for client %s by %s: %s", client, getpass.getuser(), names)
    click.echo(f"{client}: cleared the current window of {names}")


def init_app(app: Flask) -> None:
    """Register ``flask limits``."""
    app.cli.add_command(limits)
