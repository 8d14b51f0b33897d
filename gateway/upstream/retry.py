"""When a call whose upstream connection closed unanswered may be sent again (RFC 9110 9.2.2).

Plain Python with no Flask imports, so the rule is testable without a request.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["IDEMPOTENT_METHODS", "may_resend"]

# RFC 9110 9.2.2: methods whose intended effect is the same however often they are sent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def may_resend(method: str, headers: Mapping[str, str], *, reused: bool, written: bool) -> bool:
    """Return whether a call may go again after its connection closed before any answer byte.

    Only a reused pooled connection qualifies: the upstream may have closed it
    (its keep-alive timeout) just as the call was written, which says nothing
    about the upstream's health. A new connection that closes unanswered is the
    upstream failing, and sending again would only double the load on it. Then
    the call must be safe to repeat: the request never went out whole, or its
    method is idempotent, or it carries an ``Idempotency-Key`` the upstream
    deduplicates by (OpenAI, Anthropic, Stripe). A POST the upstream may have
    read is never sent twice: it may charge twice.
    """
    if not reused:
        return False
    if not written or method.upper() in IDEMPOTENT_METHODS:
        return True
    return any(
        name.lower() == "idempotency-key" and value.strip() for name, value in headers.items()
    )
