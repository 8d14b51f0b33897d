"""The config: the YAML file's schema, building clients from it, loading and checking it.

``schema`` (marshmallow schemas and located problems), ``clients`` (each
client's keys and policy) and ``load`` (read, resolve secrets, report every
problem at once; the ``GatewayConfig`` the rest of the app reads).
May import: ``gateway.errors``, ``gateway.policy``, ``gateway.spend``, ``gateway.upstream``.
"""

from __future__ import annotations

from .load import init_app

__all__ = ["init_app"]
