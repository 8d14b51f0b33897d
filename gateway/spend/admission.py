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

from ..errors import GatewayError, PolicyError
from ..policy.access import Client
from ..policy.limits import Ask, Ticket
from ..policy.prices import Price, PriceTable
from ..policy.sessions import Session
from .calls import NOT_PARSED, LLMCall, read_call, rewritten_body
from .meter import UsageMeter
from .store.base import Store, StoreUnavailable, UsageRow

__all__ = ["Admission", "admit", "price_of"]

log = logging.getLogger(__name__)

_REFUSALS = {
    "rate_limited": "{who} has made too many calls; wait for Retry-After seconds.",
    "too_many_concurrent": "{who} has too many calls in flight; wait for one to end.",
    "quota_exhausted": (
        "{who}'s {kind} budget cannot pay for this call; RateLimit-* describe it, "
        "wait for Retry-After seconds."
    ),
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
    price: Price | None = None  # the call's price, when every model it names has one

    def finish(self, status: int | None, sent: bool = True) -> None:
        """End the call's hold: free its slot, settle its tokens, record its usage.

        ``sent`` False means the upstream certainly never got the call (it could
        not be reached): the reservation is returned whole.
        """
        tokens = self.meter.tokens if self.meter is not None else None
        if not sent:
            tokens = 0
        cost = None
        if self.price is not None and tokens is not None:
            cost = self.price.cost(self.meter.input_tokens or 0, self.meter.output_tokens or 0)
            cost = cost if sent else 0
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
                cost,
            )
        try:
            if self.ticket is not None:
                self.store.finish(self.ticket, tokens, row, cost)  # one step, usage included
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
    priced = any(limits.cost for _, limits in scopes)
    budgeted = priced or any(limits.tokens for _, limits in scopes)
    upstream_path = urlsplit(target.base_url).path + path  # where path-named models are read
    llm = read_call(
        body,
        query,
        client.models,
        client.max_tokens,
        budgeted,
        parsed,
        upstream_path,
        client.default_max_tokens,
    )
    admission = Admission(client, store if scopes or llm.model else None, llm)
    admission.user = session.user if session is not None else None
    if llm.model is not None:
        admission.price = price_of(llm, target.prices, priced)
        admission.body = rewritten_body(llm, upstream_path, budgeted and target.inject_usage)
    if not scopes:
        return admission
    if llm.model is None:  # token and cost budgets count LLM calls only
        scopes = tuple((s, replace(limits, tokens=(), cost=())) for s, limits in scopes)
        scopes = tuple((s, limits) for s, limits in scopes if limits)
    reservation = cost = 0
    if llm.model is not None:
        size = len(admission.body or body or b"")
        reservation = llm.reservation(size)
        if admission.price is not None:
            cost = admission.price.cost(size, (llm.ceiling or 0) * llm.count)
    try:
        verdict = store.admit(Ask(scopes, reservation, cost))
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
        kind = verdict.quotas[0].kind if verdict.quotas else "token"
        message = _REFUSALS[verdict.code].format(who=_WHO[session is not None], kind=kind)
        raise GatewayError(verdict.code, message, headers=admission.headers)
    admission.ticket = verdict.ticket
    return admission


def price_of(llm: LLMCall, prices: PriceTable, required: bool) -> Price | None:
    """Return the price a call is counted at: the highest of every model it names.

    A fallback list (OpenRouter's ``models``) may be served by any of its
    models, so each must have a price. ``required`` (a cost budget applies)
    refuses a call with a model that has none: ``model_not_priced``.
    """
    found = [prices.price(model) for model in llm.models]
    if any(price is None for price in found) or not found:
        if required:
            raise PolicyError(
                "model_not_priced",
                "has a cost budget, and the gateway has no price for a model this call names; "
                "the operator can add it to prices",
            )
        return None
    return Price(max(p.input for p in found), max(p.output for p in found))
