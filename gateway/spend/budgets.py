"""Budgets you can see: each client's limits with what its current windows hold, and resetting them.

Plain Python with no Flask imports: ``flask usage``, ``flask limits reset`` and
``/metrics`` read the same counters admission counts against, from the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..policy.access import Client
from ..policy.limits import Budget, budget
from .store.base import Store

__all__ = ["KINDS", "BudgetState", "budget_states", "reset_budgets"]

KINDS = ("tokens", "cost", "requests")


@dataclass(frozen=True)
class BudgetState:
    """One limit of one client: its kind, its window, its limit and what the window holds."""

    client: str
    kind: str  # requests, tokens or cost (cost in micro-units)
    window: str  # second, minute, hour, day or month
    limit: int
    used: int  # calls, or amount spent plus amount reserved by calls in flight
    reset: int  # when the window ends, epoch seconds

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


def _limits(client: Client, kinds: Iterable[str], now: float) -> list[Budget]:
    scope = f"client:{client.label}"
    return [
        budget(kind, scope, rate, now) for kind, rate in client.limits.budgets() if kind in kinds
    ]


def budget_states(
    store: Store, clients: Iterable[Client], now: float | None = None
) -> list[BudgetState]:
    """Return every budget and request limit of ``clients`` as it stands now."""
    now = time.time() if now is None else now
    limits = [limit for client in clients for limit in _limits(client, KINDS, now)]
    counts = store.counts(limits) if limits else []
    return [
        BudgetState(
            limit.scope.removeprefix("client:"),
            limit.kind,
            limit.rate.unit,
            limit.rate.count,
            count,
            limit.end,
        )
        for limit, count in zip(limits, counts, strict=True)
    ]


def reset_budgets(store: Store, client: Client, kinds: Iterable[str]) -> list[Budget]:
    """Clear what ``client``'s current windows of ``kinds`` have spent; return those limits."""
    limits = _limits(client, tuple(kinds), time.time())
    if limits:
        store.reset(limits)
    return limits
