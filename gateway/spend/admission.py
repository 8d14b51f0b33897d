"""Spend control for one call: model and ceiling rules, then the limits, then settling.

Plain Python with no Flask imports: the edge hands it the client, the call and
the store, and gets back an admission whose ``finish()`` ends the call's hold
on the limits however the call ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from ..errors import GatewayError
from ..policy.access import Client
from ..policy.limits import Ask, Ticket
from ..policy.sessions import Session
from .calls import NOT_PARSED, LLMCall, read_call, with_usage_requested
from .meter import UsageMeter
from .store.base import Store, StoreUnavailable, UsageRow

__all__ = ["Admission", "admit"]

log = logging.getLogger(__name__)

_REFUSALS = {
    "rate_limited": "{who} has made too many calls; wait for Retry-After seconds.",
    "too_many_concurrent": "{who} has too many calls in flight; wait for one to end.",
    "quota_exhausted": "{who}'s token budget is spent; wait for Retry-After seconds.",
}
_WHO = {False: "This client key", True: "This session's user (or its client)"}


@dataclass
class Admission:
    """An admitted call's limits, its rewritten body (if any), and its usage meter."""

    client: Client
    store: Store | None
    llm: LLMCall
    ticket: Ticket | None = None
    body: bytes | None = None  # the body to send, when the gateway rewrote it
    headers: dict[str, str] = field(default_factory=dict)  # RateLimit-* for the answer
    meter: UsageMeter | None = None
    user: str | None = None  # a session token's end user

    def finish(self, status: int | None, sent: bool = True) -> None:
        """End the call's hold: free its slot, settle its tokens, record its usage.

        ``sent`` False means the upstream certainly never got the call (it could
        not be reached): the reservation is returned whole.
        """
        tokens = self.meter.tokens if self.meter is not None else None
        if not sent:
            tokens = 0
        if self.meter is not None and self.meter.distrusted:
            kinds = " and ".join(sorted(self.meter.distrusted))
            log.warning(
                "%s: the upstream reported %s usage that is not a whole number from 0 to 2**53; "
                "its call keeps the whole reservation (if any)",
                self.client.label,
                kinds,
            )
        if self.store is None:
            return
        row = None
        if self.llm.model is not None and sent:
            row = UsageRow(
                time.time(),
                self.client.label,
                self.llm.model,
                self.meter.input_tokens if self.meter else None,
                self.meter.output_tokens if self.meter else None,
                status or 0,
                self.user,
            )
        try:
            if self.ticket is not None:
                self.store.finish(self.ticket, tokens, row)  # one step, usage included
            elif row is not None:
                self.store.record(row)
        except StoreUnavailable as exc:
            log.warning("%s: could not settle its limits (%s)", self.client.label, exc)


def admit(
    client: Client,
    store: Store | None,
    fail_open: bool,
    path: str,
    body: bytes | None,
    query: Iterable[tuple[str, str]],
    *,
    parsed: Any = NOT_PARSED,
    session: Session | None = None,
) -> Admission:
    """Check ``client``'s model, ceiling and limits for one call; raise GatewayError if refused.

    A call made with a ``session`` token also counts against its user's limits.
    """
    target = client.target
    candidates = [
        (f"client:{client.label}", client.limits),
        (f"target:{target.name}", target.limits),
    ]
    if session is not None and client.sessions is not None:
        candidates.insert(0, (session.scope, client.sessions.limits))
    scopes = tuple((scope, limits) for scope, limits in candidates if limits)
    budgeted = any(limits.tokens for _, limits in scopes)
    upstream_path = urlsplit(target.base_url).path + path  # where path-named models are read
    llm = read_call(body, query, client.models, client.max_tokens, budgeted, parsed, upstream_path)
    admission = Admission(client, store if scopes or llm.model else None, llm)
    admission.user = session.user if session is not None else None
    if llm.model is not None and budgeted and target.inject_usage:
        admission.body = with_usage_requested(llm, path)
    if not scopes:
        return admission
    if llm.model is None:  # token budgets count LLM calls only
        scopes = tuple((s, replace(limits, tokens=())) for s, limits in scopes)
        scopes = tuple((s, limits) for s, limits in scopes if limits)
    reservation = llm.reservation(len(admission.body or body or b"")) if llm.model else 0
    try:
        verdict = store.admit(Ask(scopes, reservation))
    except StoreUnavailable as exc:
        if fail_open:
            log.warning("%s: limits unavailable (%s); let through (failOpen)", client.label, exc)
            return admission
        log.warning("%s: limits unavailable (%s); refused", client.label, exc)
        raise GatewayError(
            "limits_unavailable", "The gateway cannot check this client key's limits right now."
        ) from None
    admission.headers = verdict.headers()
    if not verdict.admitted:
        message = _REFUSALS[verdict.code].format(who=_WHO[session is not None])
        raise GatewayError(verdict.code, message, headers=admission.headers)
    admission.ticket = verdict.ticket
    return admission
