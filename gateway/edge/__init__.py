"""The HTTP edge: routes, the request pipeline and its stages, the envelope, CORS, error pages,
and ``POST /sessions`` (minting browser session tokens).

Thin: each route runs its pipeline (``pipeline``: an ordered list of stages that
read the call, judge it by the rules below, send it and filter the answer).
May import every package but ``gateway.commands``.
"""

from __future__ import annotations

from flask import Flask

from . import errors, openapi, sessions
from .routes import bp

__all__ = ["errors", "init_app"]


def init_app(app: Flask) -> None:
    """Register the gateway's routes and its OpenAPI document on ``app``."""
    openapi.init_app(app)
    app.register_blueprint(bp)
    app.register_blueprint(sessions.bp)
