"""``flask explain``: what the gateway would do with a request, without calling anyone.

The request runs through the app exactly as a live one (same routes, stages and
error handlers). The ``Explanation`` it finds in the WSGI environ observes the
stages: it runs each one, then writes down what the stage found; it gives spend
control a store handle that checks without counting, and answers in the place of
the stage that would call upstream. So the answer can never disagree with the
gateway, and a live request, which has no observer, builds none of these notes.
"""

from __future__ import annotations

import click
from flask import Flask, Response, current_app
from flask.cli import with_appcontext
from werkzeug.test import Client

from ..config.source import require
from ..edge import answer, stages
from ..edge.exchange import OBSERVER, Exchange, Stage
from ..policy.sessions import rfc3339
from ..spend.store.base import DryStore
from ..upstream.client import prepare

__all__ = ["Explanation", "init_app"]


class Explanation:
    """An observer of one request's stages: the decisions taken, and the call it would make."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.call = None  # the upstream.Call, once every check has passed
        self.prepared = None  # the requests.PreparedRequest that would be sent

    def around(self, stage: Stage, ex: Exchange) -> None:
        """Run ``stage`` and note what it found; answer in the place of the upstream call."""
        if stage is answer.forward:
            self.call, self.prepared = ex.call, prepare(ex.call)
            ex.response = Response(status=204)  # everything up to here ran; nothing is sent
            return
        if stage is stages.spend and ex.store is not None:
            ex.store = DryStore(ex.store)  # check the limits, count nothing
        try:
            stage(ex)
        except BaseException:
            self.steps += _notes(stage, ex, passed=False)
            raise
        self.steps += _notes(stage, ex, passed=True)


def _notes(stage: Stage, ex: Exchange, passed: bool) -> list[tuple[str, str]]:
    """Return what ``stage`` found, as (check, text) lines."""
    notes = []
    if stage is stages.authenticate and ex.client is not None:
        notes.append(("client", ex.client.label))
        if ex.session is not None:
            session = ex.session
            notes.append(
                (
                    "session",
                    f"user {session.user!r} on {session.origin}, "
                    f"issued {rfc3339(session.issued)}, expires {rfc3339(session.expires)}",
                )
            )
        else:
            notes.append(("key", ex.key.describe()))
        if passed and ex.origin is not None:
            mine = "the token's origin and " if ex.session is not None else ""
            notes.append(("origin", f"{ex.origin} is {mine}in allowedOrigins"))
    elif stage is stages.judge_path and passed:
        notes.append(("method", f"{ex.method} is in allowedMethods"))
        notes.append(("path", f"{ex.path} matches allowedPaths pattern {ex.pattern.text}"))
    elif stage is stages.spend and passed:
        llm, headers = ex.admission.llm, ex.admission.headers
        if llm.model is not None:
            notes.append(("model", f"{llm.model} (max tokens {llm.ceiling or 'not set'})"))
        if headers:
            limits = ", ".join(f"{k}: {v}" for k, v in headers.items())
            notes.append(("limits", f"admitted now ({limits})"))
    return notes


def _masked_headers(explanation: Explanation) -> list[str]:
    client = explanation.call.client
    secret_names = {name.lower() for name, _ in client.secret_headers}
    secret_values = {value for _, value in client.secret_headers}
    lines = []
    for name, value in explanation.prepared.headers.items():
        if name.lower() in secret_names or value in secret_values:
            value = f"(secret: set, {len(value)} characters)"
        lines.append(f"  {name}: {value}")
    return lines


def _report(explanation: Explanation, response, origin: str | None) -> tuple[list[str], bool]:
    """Return the lines to print, and whether the request would be forwarded or answered."""
    lines = [f"{step}: {text}" for step, text in explanation.steps]
    if not any(step == "client" for step, _ in explanation.steps):
        lines.insert(0, "client: (none: refused before a client key was accepted)")
    if explanation.prepared is not None:
        prepared = explanation.prepared
        lines.append("decision: forwarded")
        lines.append(f"upstream: {prepared.method} {prepared.url}")
        lines.append("headers:")
        lines += _masked_headers(explanation)
        lines.append(f"body: {len(prepared.body or b'')} bytes")
        ok = True
    elif response.status_code >= 400:
        body = response.get_json(silent=True) or {}
        code, message = body.get("error", "?"), body.get("message", "")
        lines.append(f"decision: refused: {response.status_code} {code}: {message}")
        ok = False
    else:
        lines.append(f"decision: answered by the gateway itself: {response.status_code}")
        ok = True
    if origin is not None:
        readable = "Access-Control-Allow-Origin" in response.headers
        lines.append(
            f"cors: a page on {origin} "
            + ("can read the answer" if readable else "cannot read the answer")
        )
    return lines, ok


@click.command("explain")
@click.option(
    "--key",
    envvar="GATEWAY_EXPLAIN_KEY",
    help="The client key or gs_ session token, sent as Authorization: Bearer (or set "
    "GATEWAY_EXPLAIN_KEY, which keeps it out of your shell history).",
)
@click.option("--origin", help="The browser origin the request comes from.")
@click.option("--body", type=click.File("rb"), help="A file holding the request body.")
@click.option(
    "-H", "--header", "headers", multiple=True, help='An extra request header, "Name: value".'
)
@click.argument("method")
@click.argument("path")
@with_appcontext
def explain(
    key: str | None,
    origin: str | None,
    body: click.utils.LazyFile | None,
    headers: tuple[str, ...],
    method: str,
    path: str,
) -> None:
    """Say what the gateway would do with METHOD PATH (e.g. POST /proxy/chat/completions).

    Prints the client, each check and what it found, and the decision: the
    upstream call with every secret masked, or the error it would return. Nothing
    is sent upstream. Exits 0 if the request would be forwarded (or answered by
    the gateway itself), 1 if it would be refused.
    """
    require(current_app, "flask explain")
    sent: list[tuple[str, str]] = []
    if key is not None:
        sent.append(("Authorization", f"Bearer {key}"))
    if origin is not None:
        sent.append(("Origin", origin))
    for header in headers:
        name, colon, value = header.partition(":")
        if not colon:
            raise click.BadParameter(f"{header!r} is not Name: value", param_hint="--header")
        sent.append((name.strip(), value.strip()))
    data = body.read() if body is not None else None
    if data is not None and not any(name.lower() == "content-type" for name, _ in sent):
        sent.append(("Content-Type", "application/json"))

    explanation = Explanation()
    # werkzeug's own client: Flask's adds a User-Agent the real request may not have.
    response = Client(current_app).open(
        path,
        method=method.upper(),
        headers=sent,
        data=data,
        # The raw request target, as gunicorn passes it: paths are judged on it.
        environ_overrides={OBSERVER: explanation, "RAW_URI": path, "REQUEST_URI": path},
    )
    lines, ok = _report(explanation, response, origin)
    click.echo(f"request: {method.upper()} {path}")
    click.echo("\n".join(lines))
    raise SystemExit(0 if ok else 1)


def init_app(app: Flask) -> None:
    """Register ``flask explain`` on ``app``."""
    app.cli.add_command(explain)
