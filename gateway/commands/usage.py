"""``flask usage``: LLM token usage from the limit storage, totalled per client, model or day."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from ..config.source import require
from ..spend.store.base import StoreUnavailable, UsageRow

__all__ = ["init_app"]

_KEYS = {
    "client": lambda row: row.client,
    "model": lambda row: row.model,
    "user": lambda row: row.user or "(client key)",
    "day": lambda row: datetime.fromtimestamp(row.time, UTC).strftime("%Y-%m-%d"),
}


def _since(text: str | None) -> float:
    if text is None:
        return (datetime.now(UTC) - timedelta(days=30)).timestamp()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter("write a date or date-time, e.g. 2026-11-01") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def totals(rows: list[UsageRow], by: str) -> list[tuple[str, int, int, int]]:
    """Return (group, calls, input tokens, output tokens) per group, largest use first."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        group = groups.setdefault(_KEYS[by](row), [0, 0, 0])
        group[0] += 1
        group[1] += row.input_tokens or 0
        group[2] += row.output_tokens or 0
    return sorted(
        ((name, *values) for name, values in groups.items()),
        key=lambda item: (-(item[2] + item[3]), item[0]),
    )


def _printable(text: str) -> str:
    """Return ``text`` with control characters escaped, so a name cannot forge table rows."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@click.command("usage")
@click.option("--since", help="From this UTC date or date-time (default: the last 30 days).")
@click.option(
    "--by",
    type=click.Choice(list(_KEYS)),
    default="client",
    show_default=True,
    help="What one row totals.",
)
@click.option("--client", "only", metavar="NAME", help="Only this client's calls.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@with_appcontext
def usage(since: str | None, by: str, only: str | None, as_csv: bool) -> None:
    """Print the LLM tokens recorded in the limit storage, one row per group."""
    require(current_app, "flask usage")  # the config says where the limit storage is
    try:
        rows = current_app.extensions["gateway.limits"].usage(_since(since))
    except StoreUnavailable as exc:
        raise click.ClickException(f"the limit storage cannot be read ({exc})") from None
    if only is not None:
        rows = [row for row in rows if row.client == only]
    table = totals(rows, by)
    header = (by, "calls", "input_tokens", "output_tokens", "total_tokens")
    lines = [(name, calls, inp, out, inp + out) for name, calls, inp, out in table]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(lines)
        return
    lines = [(_printable(name), *rest) for name, *rest in lines]
    width = max([len(by), *(len(str(line[0])) for line in lines)])
    click.echo(f"{by:<{width}}  {'calls':>8}  {'input':>12}  {'output':>12}  {'total':>12}")
    for name, calls, inp, out, total in lines:
        click.echo(f"{name:<{width}}  {calls:>8}  {inp:>12}  {out:>12}  {total:>12}")


def init_app(app: Flask) -> None:
    """Register ``flask usage``."""
    app.cli.add_command(usage)
