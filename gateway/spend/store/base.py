"""Where limit counters live: one small interface; SQLite (sqlite) and Redis (redis).

Each check is one atomic step (an SQLite ``BEGIN IMMEDIATE`` transaction, or one
Redis Lua script): every limit is read, and either all are counted or none, so
N+k calls at once against a limit of N admit exactly N, whatever the number of
workers, processes or hosts. No rule here knows which store it talks to.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ...policy.limits import Ask, Budget, Quota, Ticket, Verdict, budget
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

# Usage rows are written in batches off the request path: every FLUSH_SECONDS, as
# soon as FLUSH_ROWS wait, and when the process exits. A process killed outright
# (SIGKILL, a crash) loses at most its last second of usage rows; never a limit's
# count, which admission and settling write at once.
FLUSH_SECONDS = 1.0
FLUSH_ROWS = 100
# Rows kept while the store cannot be reached, before the oldest are dropped.
MAX_WAITING_ROWS = 100_000


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
    cost: int | None = None  # micro-units, for a priced call whose usage is known


@dataclass(frozen=True)
class Plan:
    """An Ask turned into store keys for ``now``."""

    requests: list[Budget]
    slots: list[tuple[str, int]]  # key, limit
    budgets: list[tuple[Budget, int]]  # token and cost budgets, each with this call's amount


def make_plan(ask: Ask, now: float) -> Plan:
    requests, slots, budgets = [], [], []
    for scope, limits in ask.scopes:
        requests += [budget("requests", scope, rate, now) for rate in limits.requests]
        if limits.concurrent:
            slots.append((f"conc:{scope}", limits.concurrent))
        budgets += [(budget("tokens", scope, rate, now), ask.reservation) for rate in limits.tokens]
        budgets += [(budget("cost", scope, rate, now), ask.cost) for rate in limits.cost]
    return Plan(requests, slots, budgets)


def _quota(limit: Budget, remaining: int, now: float) -> Quota:
    start, end = limit.rate.window(now)
    return Quota(limit.rate.count, remaining, end - now, limit.kind, end - start)


def _shown(limit: Budget) -> bool:
    # RateLimit-* tell of the client's and its user's limits, not the target's
    # (unless a target's limit is the one refusing).
    return limit.scope.startswith(("client:", "user:"))


def plan_verdict(
    plan: Plan, now: float, used: list[int], held: list[int], failed: str | None, index: int
) -> Verdict:
    """Build the answer from the counters' values before this call.

    ``used`` is each request counter's count, ``held`` each budget's spent plus
    reserved amount, as far as the check read them.
    """
    if failed == "rate_limited":
        limit = plan.requests[index]
        quota = _quota(limit, limit.rate.count - used[index], now)
        return Verdict(False, failed, limit.end - now, quotas=[quota])
    if failed == "quota_exhausted":
        limit, _ = plan.budgets[index]
        quota = _quota(limit, limit.rate.count - held[index], now)
        return Verdict(False, failed, limit.end - now, quotas=[quota])
    after = 0 if failed else 1
    quotas = [
        _quota(limit, limit.rate.count - count - after, now)
        for limit, count in zip(plan.requests, used, strict=False)
        if _shown(limit)
    ]
    if failed is not None:  # too_many_concurrent
        return Verdict(False, failed, 1.0, quotas=quotas)
    quotas += [
        _quota(limit, limit.rate.count - spent - amount, now)
        for (limit, amount), spent in zip(plan.budgets, held, strict=False)
        if _shown(limit)
    ]
    return Verdict(True, quotas=quotas)


class _Leases:
    """The concurrency slots this process holds; the background thread renews them."""

    def __init__(self, renew: Callable[[list[tuple[str, str]]], None]) -> None:
        self._renew = renew
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._due = 0.0  # when the next renewal is due (monotonic)

    def hold(self, ticket: Ticket) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a parent's slots are the parent's: they expire with it
                self._pid, self._held = os.getpid(), {}
                self._due = time.monotonic() + LEASE_SECONDS / 3
            self._held[ticket.id] = ticket.slots

    def drop(self, ticket: Ticket) -> None:
        with self._lock:
            self._held.pop(ticket.id, None)

    def renew_if_due(self) -> None:
        """Renew every slot held, every third of a lease."""
        if time.monotonic() < self._due or self._pid != os.getpid():
            return
        self._due = time.monotonic() + LEASE_SECONDS / 3
        with self._lock:
            held = [(key, tid) for tid, keys in self._held.items() for key in keys]
        if held:
            try:
                self._renew(held)
            except StoreUnavailable:
                log.warning("could not renew %d concurrency slots", len(held))


_STARTING = threading.Lock()


class _Background:
    """This process's usage rows, written in batches by a thread of its own.

    The thread also runs the store's housekeeping (``tick``: slot renewals,
    checkpoints) once a second. One thread per store and process, started on
    first use (after fork); it ends when the store is dropped.
    """

    def __init__(
        self, write: Callable[[list[UsageRow], bool, str], None], tick: Callable[[], None]
    ) -> None:
        self._write = write
        self._tick = tick
        self._pid: int | None = None
        self._rows: list[UsageRow] = []
        self._failed: list[tuple[str, list[UsageRow]]] = []  # batches to try again, oldest first

    def start(self) -> None:
        if self._pid == os.getpid():
            return
        with _STARTING:  # threads (gthread workers) may come at once
            if self._pid == os.getpid():
                return
            self._rows, self._failed = [], []  # a parent's rows are the parent's to write
            self._lock = threading.Lock()
            self._wake = threading.Event()
            _LIVE.add(self)
            thread = threading.Thread(
                target=_background, args=(weakref.ref(self), self._wake), daemon=True
            )
            thread.name = "gateway-usage"
            thread.start()
            self._pid = os.getpid()  # last: whoever sees it finds everything above

    def add(self, row: UsageRow) -> None:
        self.start()
        with self._lock:
            self._rows.append(row)
            full = len(self._rows) >= FLUSH_ROWS
        if full:
            self._wake.set()

    def flush(self, exiting: bool = False) -> None:
        """Write every row waiting; keep the batches the store cannot take for the next try."""
        if self._pid != os.getpid():
            return
        with self._lock:
            rows, self._rows = self._rows, []
            # A batch is tried again whole, under its id: a try that failed may have
            # been written (its reply lost), and the store writes one id once.
            new = range(0, len(rows), FLUSH_ROWS)
            batches = self._failed + [(uuid.uuid4().hex, rows[i : i + FLUSH_ROWS]) for i in new]
            self._failed = []
        for done, (batch, part) in enumerate(batches):
            try:
                self._write(part, exiting, batch)
            except StoreUnavailable as exc:
                with self._lock:
                    self._failed[:0] = batches[done:]
                    lost = max(0, len(self._failed) - MAX_WAITING_ROWS // FLUSH_ROWS)
                    dropped = sum(len(rows) for _, rows in self._failed[:lost])
                    del self._failed[:lost]
                waiting = sum(len(rows) for _, rows in batches[done:])
                log.warning("could not write %d usage rows (%s); %d dropped", waiting, exc, dropped)
                return

    def tick(self) -> None:
        try:
            self.flush()
            self._tick()
        except StoreUnavailable as exc:
            log.warning("limit store housekeeping failed (%s)", exc)


# Every store's rows are written when the process exits normally (a gunicorn
# worker's graceful exit included).
_LIVE: weakref.WeakSet[_Background] = weakref.WeakSet()
atexit.register(lambda: [background.flush(exiting=True) for background in list(_LIVE)])


def _background(ref: weakref.ref[_Background], wake: threading.Event) -> None:
    # Holds the store only while it works, so a dropped store's thread ends.
    while True:
        wake.wait(min(FLUSH_SECONDS, LEASE_SECONDS / 3))  # renewals come on time
        wake.clear()
        background = ref()
        if background is None or background._pid != os.getpid():
            return
        background.tick()
        del background


class Store:
    """The interface both stores implement."""

    def __init__(self) -> None:
        self.leases = _Leases(self._renew)
        self.background = _Background(self._write_usage, self._housekeep)

    def admit(self, ask: Ask, now: float | None = None) -> Verdict:
        """Check and count ``ask`` atomically; the Verdict carries a ticket if admitted."""
        now = time.time() if now is None else now
        plan = make_plan(ask, now)
        ticket = Ticket(uuid.uuid4().hex)
        verdict = self._admit(plan, ticket.id, now)
        if verdict.admitted:
            ticket.slots = [key for key, _ in plan.slots]
            ticket.reservations = [(b.key, b.kind, amount) for b, amount in plan.budgets]
            verdict.ticket = ticket
            if ticket.slots:
                self.leases.hold(ticket)
                self.background.start()  # which renews them
        return verdict

    def check(self, ask: Ask, now: float | None = None) -> Verdict:
        """Answer whether ``ask`` would be admitted now, counting nothing (no ticket)."""
        now = time.time() if now is None else now
        return self._check(make_plan(ask, now), now)

    def finish(
        self,
        ticket: Ticket,
        tokens: int | None,
        usage: UsageRow | None = None,
        cost: int | None = None,
    ) -> None:
        """Free the ticket's slots; replace its reservations by ``tokens`` and ``cost``.

        None for either means unknown: that reservation stays spent whole.
        ``usage``, if given, is recorded (in the next batch).
        """
        if ticket.done:
            return
        ticket.done = True
        self.leases.drop(ticket)
        if usage is not None:
            self.record(usage)
        if ticket.slots or ticket.reservations:
            actual = {"tokens": tokens, "cost": cost}
            settled = [
                (key, reserved, reserved if actual[kind] is None else actual[kind])
                for key, kind, reserved in ticket.reservations
            ]
            self._finish(ticket, settled)

    def record(self, row: UsageRow) -> None:
        """Record one call's usage: written with this process's next batch."""
        self.background.add(row)

    def flush(self) -> None:
        """Write this process's waiting usage rows now."""
        self.background.flush()

    def usage(self, since: float) -> list[UsageRow]:
        """Return the usage rows from ``since`` on (this process's waiting rows included)."""
        self.flush()
        return self._read_usage(since)

    def counts(self, limits: list[Budget]) -> list[int]:
        """Return what each counter holds now: calls, or amount spent plus reserved."""
        raise NotImplementedError

    def reset(self, limits: list[Budget]) -> None:
        """Clear what each counter has spent; calls in flight keep their reservations."""
        raise NotImplementedError

    def _read_usage(self, since: float) -> list[UsageRow]:
        raise NotImplementedError

    def _write_usage(self, rows: list[UsageRow], exiting: bool, batch: str) -> None:
        """Write ``rows`` in one step, once per ``batch`` id; ``exiting``: wait in place."""
        raise NotImplementedError

    def _housekeep(self) -> None:
        self.leases.renew_if_due()
        self._tick()

    def _tick(self) -> None:
        """The store's own housekeeping, once a second in each process that uses it."""

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        raise NotImplementedError

    def _check(self, plan: Plan, now: float) -> Verdict:
        raise NotImplementedError

    def _finish(self, ticket: Ticket, settled: list[tuple[str, int, int]]) -> None:
        """Free the slots; for each (key, reserved, spent), take back reserved, add spent."""
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

    def finish(
        self,
        ticket: Ticket,
        tokens: int | None,
        usage: UsageRow | None = None,
        cost: int | None = None,
    ) -> None:
        """Settle nothing: a dry admission holds nothing."""

    def record(self, row: UsageRow) -> None:
        """Record nothing: a dry run is not usage."""
