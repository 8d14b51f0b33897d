"""The HTTP edge: routes, the envelope, request bodies, CORS, the egress guard, error pages.

Thin: read the call, run it through the rules below, shape the response.
May import every package but ``gateway.commands``.
"""

from __future__ import annotations

from flask import Flask

from . import errors, openapi
from .routes import bp

__all__ = ["errors", "init_app"]


def init_app(app: Flask) -> None:
    """Register the gateway's routes and its OpenAPI document on ``app``."""
    openapi.init_app(app)
    app.register_blueprint(bp)
