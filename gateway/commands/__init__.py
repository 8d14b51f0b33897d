"""The ``flask --app gateway`` commands: check-config, keys, explain, usage, limits.

May import every package but the app factory.
"""

from __future__ import annotations

from flask import Flask

from . import config, explain, limits, usage

__all__ = ["init_app"]


def init_app(app: Flask) -> None:
    """Register the gateway's CLI commands on ``app``."""
    config.init_app(app)
    explain.init_app(app)
    usage.init_app(app)
    limits.init_app(app)
