"""The config: the YAML file's schema, building clients from it, loading and checking it.

``schema`` (marshmallow schemas and located problems), ``clients`` (each
client's keys and policy), ``load`` (validate, resolve secrets, report every
problem at once; the ``GatewayConfig`` the rest of the app reads) and
``source`` (the YAML file, or the config gunicorn's master checked and handed
over; the app's config at start).
May import: ``gateway.errors``, ``gateway.policy``, ``gateway.spend``, ``gateway.upstream``.
"""

from __future__ import annotations

from .source import init_app

__all__ = ["init_app"]
