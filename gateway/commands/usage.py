"""``flask usage``: LLM usage from the limit storage, totalled per client, model or day.

With ``--by client``, each client's budgets follow its row: limit, used in the
current window (reservations of calls in flight included) and left.
"""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from ..config.source import require
from ..policy.prices import money
from ..spend.budgets import BudgetState, budget_states
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


def totals(rows: list[UsageRow], by: str) -> list[tuple[str, int, int, int, int]]:
    """Return (group, calls, input tokens, output tokens, cost) per group, largest use first."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        group = groups.setdefault(_KEYS[by](row), [0, 0, 0, 0])
        group[0] += 1
        group[1] += row.input_tokens or 0
        group[2] += row.output_tokens or 0
        group[3] += row.cost or 0
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
    config = current_app.extensions["gateway.config"]
    store = current_app.extensions["gateway.limits"]
    clients = [c for c in config.clients if only is None or c.label == only]
    try:
        rows = store.usage(_since(since))
        budgets = budget_states(store, clients) if by == "client" else []
    except StoreUnavailable as exc:
        raise click.ClickException(f"the limit storage cannot be read ({exc})") from None
    if only is not None:
        rows = [row for row in rows if row.client == only]
    priced = any(row.cost is not None for row in rows) or any(c.target.prices for c in clients)
    header = [by, "calls", "input_tokens", "output_tokens", "total_tokens"]
    lines = []
    for name, calls, inp, out, cost in totals(rows, by):
        lines.append([name, calls, inp, out, inp + out, *([money(cost)] if priced else [])])
    header += ["cost"] if priced else []
    if budgets:
        _add_budgets(header, lines, budgets)
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(lines)
        return
    lines = [[_printable(str(line[0])), *line[1:]] for line in lines]
    widths = [max(len(str(v)) for v in column) for column in zip(header, *lines, strict=True)]
    for line in [header, *lines]:
        cells = (_cell(v, w, i) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        click.echo("  ".join(cells).rstrip())


def _cell(value: object, width: int, column: int) -> str:
    return f"{value!s:<{width}}" if column == 0 or isinstance(value, str) else f"{value:>{width}}"


def _add_budgets(header: list[str], lines: list[list], budgets: list[BudgetState]) -> None:
    """Add one line per budget under its client's line: kind, window, limit, used, left.

    A client's totals stay on its first line only, so a column's sum is still its total.
    """
    width = len(header)
    header += ["budget", "limit", "used", "left"]
    by_client: dict[str, list[BudgetState]] = {}
    for state in budgets:
        by_client.setdefault(state.client, []).append(state)
    for name in by_client.keys() - {line[0] for line in lines}:
        lines.append([name, 0, 0, 0, 0, *(["0.000000"] if "cost" in header else [])])
    out = []
    for line in lines:
        states = by_client.get(line[0], [])
        for i, state in enumerate(states or [None]):
            base = line if i == 0 else [line[0], *[""] * (width - 1)]
            if state is None:
                out.append([*base, "", "", "", ""])
                continue
            shown = money if state.kind == "cost" else str
            out.append(
                [
                    *base,
                    f"{state.kind}/{state.window}",
                    shown(state.limit),
                    shown(state.used),
                    shown(state.left),
                ]
            )
    lines[:] = out


def init_app(app: Flask) -> None:
    """Register ``flask usage``."""
    app.cli.add_command(usage)
