"""Where limit counters live: one small interface; SQLite (sqlite) and Redis (redis).

Each check is one atomic step (an SQLite ``BEGIN IMMEDIATE`` transaction, or one
Redis Lua script): every limit is read, and either all are counted or none, so
N+k calls at once against a limit of N admit exactly N, whatever the number of
workers, processes or hosts. No rule here knows which store it talks to.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ...policy.limits import Ask, Quota, Ticket, Verdict, counter_key
from ...settings import default

__all__ = [
    "LEASE_SECONDS",
    "DryStore",
    "Plan",
    "Store",
    "StoreUnavailable",
    "UsageRow",
    "make_plan",
    "plan_verdict",
]

log = logging.getLogger(__name__)

# A concurrency slot is a lease: its holder renews it while the call goes on, so a
# slot held by a worker that was killed frees itself within the worker timeout
# (gunicorn.conf.py reads the same variable).
LEASE_SECONDS = float(os.environ.get("GATEWAY_WORKER_TIMEOUT", default("GATEWAY_WORKER_TIMEOUT")))


class StoreUnavailable(Exception):
    """The limit store cannot be reached or used right now."""


@dataclass(frozen=True)
class UsageRow:
    """One LLM call's usage, for ``flask usage``."""

    time: float
    client: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    status: int
    user: str | None = None  # a session token's end user


@dataclass(frozen=True)
class Plan:
    """An Ask turned into store keys for ``now``."""

    requests: list[tuple[str, int, int, bool]]  # key, limit, window end, client scope?
    slots: list[tuple[str, int]]  # key, limit
    tokens: list[tuple[str, int, int]]  # key, budget, window end
    reservation: int


def make_plan(ask: Ask, now: float) -> Plan:
    requests, slots, tokens = [], [], []
    for scope, limits in ask.scopes:
        for rate in limits.requests:
            key, end = counter_key("req", scope, rate, now)
            # RateLimit-* tell of the client's and its user's rates, not the target's.
            requests.append((key, rate.count, end, scope.startswith(("client:", "user:"))))
        if limits.concurrent:
            slots.append((f"conc:{scope}", limits.concurrent))
        for rate in limits.tokens:
            key, end = counter_key("tok", scope, rate, now)
            tokens.append((key, rate.count, end))
    return Plan(requests, slots, tokens, ask.reservation)


def plan_verdict(
    plan: Plan, now: float, used: list[int], failed: str | None, index: int
) -> Verdict:
    """Build the answer from the request counters' values before this call."""
    quotas = []
    for (_, limit, end, client), count in zip(plan.requests, used, strict=False):
        if client:
            after = count if failed else count + 1
            quotas.append(Quota(limit, limit - after, end - now))
    if failed is None:
        return Verdict(True, quotas=quotas)
    if failed == "rate_limited":
        retry = plan.requests[index][2] - now
    elif failed == "quota_exhausted":
        retry = plan.tokens[index][2] - now
    else:
        retry = 1.0
    return Verdict(False, code=failed, retry_after=retry, quotas=quotas)


class _Leases:
    """Renews the concurrency slots this process holds, in a background thread."""

    def __init__(self, renew: Callable[[list[tuple[str, str]]], None]) -> None:
        self._renew = renew
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def hold(self, ticket: Ticket) -> None:
        with self._lock:
            self._held[ticket.id] = ticket.slots
            if self._pid != os.getpid():  # a thread of its own in each worker, after fork
                self._pid = os.getpid()
                threading.Thread(target=self._run, daemon=True, name="gateway-leases").start()

    def drop(self, ticket: Ticket) -> None:
        with self._lock:
            self._held.pop(ticket.id, None)

    def _run(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 3)
            with self._lock:
                held = [(key, tid) for tid, keys in self._held.items() for key in keys]
            if held:
                try:
                    self._renew(held)
                except StoreUnavailable:
                    log.warning("could not renew %d concurrency slots", len(held))


class Store:
    """The interface both stores implement."""

    def __init__(self) -> None:
        self.leases = _Leases(self._renew)

    def admit(self, ask: Ask, now: float | None = None) -> Verdict:
        """Check and count ``ask`` atomically; the Verdict carries a ticket if admitted."""
        now = time.time() if now is None else now
        plan = make_plan(ask, now)
        ticket = Ticket(uuid.uuid4().hex)
        verdict = self._admit(plan, ticket.id, now)
        if verdict.admitted:
            ticket.slots = [key for key, _ in plan.slots]
            ticket.reservations = [(key, plan.reservation) for key, _, _ in plan.tokens]
            verdict.ticket = ticket
            if ticket.slots:
                self.leases.hold(ticket)
        return verdict

    def check(self, ask: Ask, now: float | None = None) -> Verdict:
        """Answer whether ``ask`` would be admitted now, counting nothing (no ticket)."""
        now = time.time() if now is None else now
        return self._check(make_plan(ask, now), now)

    def finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None = None) -> None:
        """Free the ticket's slots; replace its reservations by ``tokens`` (None: spent).

        ``usage``, if given, is recorded in the same step.
        """
        if ticket.done:
            return
        ticket.done = True
        self.leases.drop(ticket)
        if ticket.slots or ticket.reservations:
            self._finish(ticket, tokens, usage)
        elif usage is not None:
            self.record(usage)

    def record(self, row: UsageRow) -> None:
        raise NotImplementedError

    def usage(self, since: float) -> list[UsageRow]:
        raise NotImplementedError

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        raise NotImplementedError

    def _check(self, plan: Plan, now: float) -> Verdict:
        raise NotImplementedError

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        raise NotImplementedError

    def _renew(self, held: list[tuple[str, str]]) -> None:
        raise NotImplementedError


class DryStore:
    """A handle on ``store`` that checks and never counts: what ``flask explain`` gets.

    The same ``admit``/``finish``/``record`` surface as a Store, so spend control
    runs unchanged on it; its Verdicts carry no ticket, so there is nothing to settle.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def admit(self, ask: Ask, now: float | None = None) -> Verdict:
        return self._store.check(ask, now)

    def finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None = None) -> None:
        """Settle nothing: a dry admission holds nothing."""

    def record(self, row: UsageRow) -> None:
        """Record nothing: a dry run is not usage."""
