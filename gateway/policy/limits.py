"""Spend limits: request rates, concurrency caps, token and cost budgets, and what a check answers.

Plain Python with no Flask imports. The counting itself happens in a store
(``spend.store``), atomically, so that a limit holds across workers and hosts.
Every period but the month is a fixed window aligned to the epoch (a day starts
at 00:00 UTC); a month is the calendar month in UTC, from 00:00 on its 1st.
Money is counted in whole micro-units (millionths of the billing currency).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

__all__ = [
    "MICRO",
    "Ask",
    "Budget",
    "LimitSet",
    "Quota",
    "Rate",
    "Ticket",
    "Verdict",
    "parse_cost",
    "parse_rate",
]

MICRO = 1_000_000  # micro-units in one unit of the billing currency
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 0}
_PERIOD = r"\s*/\s*(second|minute|hour|day|month)\s*"
_RATE = re.compile(r"\s*([1-9][0-9]{0,11})" + _PERIOD)
# Up to 10**9 units with 6 decimals: every count stays below 2**53, exact in Redis' Lua.
_COST = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,6})?)" + _PERIOD)


@dataclass(frozen=True)
class Rate:
    """``count`` per period, e.g. 60/minute; a cost's count is in micro-units."""

    count: int
    period: int  # seconds; 0 for a calendar month
    text: str

    @property
    def unit(self) -> str:
        """Return the period's name: second, minute, hour, day or month."""
        return self.text.rsplit("/", 1)[1]

    def window(self, now: float) -> tuple[int, int]:
        """Return the start and end (epoch seconds) of the window holding ``now``."""
        if self.period == 0:
            day = datetime.fromtimestamp(now, UTC)
            start = datetime(day.year, day.month, 1, tzinfo=UTC)
            end = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
            return int(start.timestamp()), int(end.timestamp())
        start = int(now // self.period) * self.period
        return start, start + self.period


def parse_rate(text: object) -> Rate:
    """Return the Rate for ``"N/second|minute|hour|day|month"`` or raise ``ValueError``."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError('must be a whole number per period, e.g. "60/minute" or "2000/day"')
    return Rate(int(match.group(1)), PERIODS[match.group(2)], f"{match.group(1)}/{match.group(2)}")


def parse_cost(text: object) -> Rate:
    """Return the budget for ``"5/day"`` or ``"0.50/hour"`` (in micro-units), or raise."""
    match = _COST.fullmatch(text) if isinstance(text, str) else None
    if not match or Decimal(match.group(1)) == 0:
        raise ValueError(
            'must be an amount per period, e.g. "5/day" or "0.50/hour" '
            "(at most 6 decimals, below 1000000000)"
        )
    micro = int(Decimal(match.group(1)) * MICRO)
    return Rate(micro, PERIODS[match.group(2)], f"{match.group(1)}/{match.group(2)}")


@dataclass(frozen=True)
class LimitSet:
    """The limits of one scope: a client, its user, or all clients of a target together."""

    requests: tuple[Rate, ...] = ()
    concurrent: int | None = None
    tokens: tuple[Rate, ...] = ()
    cost: tuple[Rate, ...] = ()  # micro-units

    def __bool__(self) -> bool:
        return bool(self.requests or self.concurrent or self.tokens or self.cost)

    def budgets(self) -> tuple[tuple[str, Rate], ...]:
        """Return every counted limit as (kind, rate): requests, tokens and cost."""
        return (
            *(("requests", r) for r in self.requests),
            *(("tokens", r) for r in self.tokens),
            *(("cost", r) for r in self.cost),
        )


@dataclass(frozen=True)
class Ask:
    """What one call asks of the store: its scopes' limits and its reservations."""

    scopes: tuple[tuple[str, LimitSet], ...]  # ("client:chat-app", limits), ("target:x", ...)
    reservation: int = 0  # tokens; 0 for a call that is not metered
    cost: int = 0  # micro-units; 0 for a call that is not priced


@dataclass(frozen=True)
class Budget:
    """One counted limit's key in the store for the current window."""

    kind: str  # requests, tokens or cost
    scope: str
    rate: Rate
    key: str
    end: int  # the window's end, epoch seconds


@dataclass
class Ticket:
    """An admitted call's hold on the store, released (and settled) when it ends."""

    id: str
    slots: list[str] = field(default_factory=list)  # concurrency keys holding this call
    # (key, kind, amount reserved): kind "tokens" or "cost"
    reservations: list[tuple[str, str, int]] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Quota:
    """One limit's state after a check, for the RateLimit-* headers."""

    limit: int
    remaining: int
    reset: float  # seconds
    kind: str = "requests"
    window: int = 0  # the window's length in seconds

    @property
    def left(self) -> float:
        """Return the share of the limit left, from 0 to 1."""
        return max(0, self.remaining) / self.limit


@dataclass
class Verdict:
    """The answer of a check: admitted with a ticket, or the error code and Retry-After."""

    admitted: bool
    code: str | None = None
    retry_after: float = 0.0
    ticket: Ticket | None = None
    quotas: list[Quota] = field(default_factory=list)  # a refusal's: the refusing limit's first

    def headers(self) -> dict[str, str]:
        """Return RateLimit-* for the limit closest to exhaustion (a refusal: the refusing one)."""
        headers = {}
        if self.quotas:
            if self.admitted:
                tightest = min(self.quotas, key=lambda q: (q.left, q.reset))
            else:
                tightest = self.quotas[0]
            headers["RateLimit-Limit"] = str(tightest.limit)
            headers["RateLimit-Remaining"] = str(max(0, tightest.remaining))
            headers["RateLimit-Reset"] = str(max(1, math.ceil(tightest.reset)))
            headers["RateLimit-Policy"] = (
                f'{tightest.limit};w={tightest.window};kind="{tightest.kind}"'
            )
        if not self.admitted:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


_KEY_KINDS = {"requests": "req", "tokens": "tok", "cost": "cost"}


def budget(kind: str, scope: str, rate: Rate, now: float) -> Budget:
    """Return the store key of ``scope``'s ``kind`` counter for the window of ``now``."""
    start, end = rate.window(now)
    period = rate.period or rate.unit
    return Budget(kind, scope, rate, f"{_KEY_KINDS[kind]}:{scope}:{period}:{start}", end)
