"""Spend control: admitting a call against its limits, reading an LLM call, metering its usage.

``admission`` (model and ceiling rules, then the limits, then settling),
``calls`` (the model and ceiling a call asks for), ``meter`` (usage read from
answers as they pass) and ``store/`` (where counts live). No Flask imports.
May import: ``gateway.errors``, ``gateway.policy``.
"""

from __future__ import annotations

from .store import init_app

__all__ = ["init_app"]
