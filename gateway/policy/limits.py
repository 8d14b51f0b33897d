"""Spend limits: request rates, concurrency caps and token budgets, and what a check answers.

Plain Python with no Flask imports. The counting itself happens in a store
(``spend.store``), atomically, so that a limit holds across workers and hosts.
Every period is a fixed window aligned to the epoch (a day starts at 00:00 UTC).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["Ask", "LimitSet", "Rate", "Ticket", "Verdict", "parse_rate"]

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"\s*([1-9][0-9]{0,11})\s*/\s*(second|minute|hour|day)\s*")


@dataclass(frozen=True)
class Rate:
    """``count`` per ``period`` seconds, e.g. 60/minute."""

    count: int
    period: int
    text: str

    def window(self, now: float) -> tuple[int, int]:
        """Return the start and end (epoch seconds) of the window holding ``now``."""
        start = int(now // self.period) * self.period
        return start, start + self.period


def parse_rate(text: object) -> Rate:
    """Return the Rate for ``"N/second|minute|hour|day"`` or raise ``ValueError``."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError('must be a whole number per period, e.g. "60/minute" or "2000/day"')
    return Rate(int(match.group(1)), PERIODS[match.group(2)], f"{match.group(1)}/{match.group(2)}")


@dataclass(frozen=True)
class LimitSet:
    """The limits of one scope: a client, or all clients of a target together."""

    requests: tuple[Rate, ...] = ()
    concurrent: int | None = None
    tokens: tuple[Rate, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.requests or self.concurrent or self.tokens)


@dataclass(frozen=True)
class Ask:
    """What one call asks of the store: its scopes' limits and its token reservation."""

    scopes: tuple[tuple[str, LimitSet], ...]  # ("client:chat-app", limits), ("target:x", ...)
    reservation: int = 0  # tokens; 0 for a call that is not metered


@dataclass
class Ticket:
    """An admitted call's hold on the store, released (and settled) when it ends."""

    id: str
    slots: list[str] = field(default_factory=list)  # concurrency keys holding this call
    reservations: list[tuple[str, int]] = field(default_factory=list)  # (token key, tokens)
    done: bool = False


@dataclass(frozen=True)
class Quota:
    """One request limit's state after a check, for the RateLimit-* headers."""

    limit: int
    remaining: int
    reset: float  # seconds


@dataclass
class Verdict:
    """The answer of a check: admitted with a ticket, or the error code and Retry-After."""

    admitted: bool
    code: str | None = None
    retry_after: float = 0.0
    ticket: Ticket | None = None
    quotas: list[Quota] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        """Return RateLimit-* for the tightest request limit, and Retry-After if refused."""
        headers = {}
        if self.quotas:
            tightest = min(self.quotas, key=lambda q: (q.remaining, q.reset))
            headers["RateLimit-Limit"] = str(tightest.limit)
            headers["RateLimit-Remaining"] = str(max(0, tightest.remaining))
            headers["RateLimit-Reset"] = str(max(1, math.ceil(tightest.reset)))
        if not self.admitted:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def counter_key(kind: str, scope: str, rate: Rate, now: float) -> tuple[str, int]:
    """Return the store key of ``scope``'s ``kind`` counter for the window of ``now``."""
    start, end = rate.window(now)
    return f"{kind}:{scope}:{rate.period}:{start}", end
