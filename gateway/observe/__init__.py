"""Observability: the per-request Record, the access log and the Prometheus metrics.

``record`` (what is known of one request), ``recording`` (the WSGI layer that
opens and closes it), ``access_log`` and ``metrics`` (observers of finished
records: they read, never decide).
May import: ``gateway.errors``, ``gateway.policy``.
"""

from __future__ import annotations

from flask import Flask

from . import access_log, metrics, recording

__all__ = ["init_app"]


def init_app(app: Flask) -> None:
    """Open a Record for every request of ``app``; log and count each when it ends."""
    recording.init_app(app)
    access_log.init_app(app)
    metrics.init_app(app)
