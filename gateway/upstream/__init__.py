"""Upstream calls: the pooled Session per worker, its connections, resends and TLS.

``client`` (send a call, stream its answer, map transport faults), ``pool``
(urllib3 pools that bound idle connections and tell unanswered closes apart),
``retry`` (when a call may be sent again) and ``tls`` (what each target trusts).
May import: ``gateway.errors``, ``gateway.policy``.
"""

from __future__ import annotations

from .client import init_app

__all__ = ["init_app"]
