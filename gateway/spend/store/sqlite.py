"""The embedded limit store: one SQLite file shared by every worker and process that opens it."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

from ...policy.limits import Ticket, Verdict
from .base import LEASE_SECONDS, Plan, Store, StoreUnavailable, UsageRow, plan_verdict

__all__ = ["SQLiteStore"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, ends REAL NOT NULL, used INTEGER NOT NULL, reserved INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    key TEXT NOT NULL, ticket TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, ticket)
);
CREATE TABLE IF NOT EXISTS usage (
    time REAL NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER, output_tokens INTEGER, status INTEGER NOT NULL, user TEXT
);
CREATE INDEX IF NOT EXISTS usage_time ON usage (time);
"""


class SQLiteStore(Store):
    """Counters in one SQLite file, shared by every worker and process that opens it.

    Under gevent, each call runs in a thread of its own (one per worker), so a
    worker waiting for the file lock goes on serving its other requests.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._local: tuple[int, sqlite3.Connection, Any] | None = None
        self._lock = threading.Lock()
        self._calls = 0

    def _connection(self) -> tuple[sqlite3.Connection, Any]:
        if self._local is None or self._local[0] != os.getpid():
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
            if "user" not in columns:  # a file from before sessions
                db.execute("ALTER TABLE usage ADD COLUMN user TEXT")
            self._local = (os.getpid(), db, _worker_thread())
        return self._local[1], self._local[2]

    def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            db, pool = self._connection()
            if pool is not None:
                return pool.apply(work, (db,))
            with self._lock:
                return work(db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {type(exc).__name__}") from None

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` holding the file's write lock: every process waits its turn."""

        def locked(db: sqlite3.Connection) -> Any:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return self._run(locked)

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        self._calls += 1
        if self._calls % 1000 == 0:  # forget windows that ended a day ago
            self._run(lambda db: db.execute("DELETE FROM counters WHERE ends < ?", (now - 86400,)))
        return self._transaction(lambda db: self._admit_locked(db, plan, ticket, now))

    def _check(self, plan: Plan, now: float) -> Verdict:
        return self._transaction(lambda db: _checked(db, plan, now))

    @staticmethod
    def _admit_locked(db: sqlite3.Connection, plan: Plan, ticket: str, now: float) -> Verdict:
        verdict = _checked(db, plan, now)
        if not verdict.admitted:
            return verdict
        for key, _, end, _ in plan.requests:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 1, 0) "
                "ON CONFLICT (key) DO UPDATE SET used = used + 1",
                (key, end),
            )
        for key, _ in plan.slots:
            db.execute("INSERT INTO slots VALUES (?, ?, ?)", (key, ticket, now + LEASE_SECONDS))
        for key, _, end in plan.tokens:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 0, ?) "
                "ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved",
                (key, end, plan.reservation),
            )
        return verdict

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        def work(db: sqlite3.Connection) -> None:
            if usage is not None:
                _insert_usage(db, usage)
            for key in ticket.slots:
                db.execute("DELETE FROM slots WHERE key = ? AND ticket = ?", (key, ticket.id))
            for key, reserved in ticket.reservations:
                db.execute(
                    "UPDATE counters SET reserved = MAX(0, reserved - ?), used = used + ? "
                    "WHERE key = ?",
                    (reserved, reserved if tokens is None else tokens, key),
                )

        self._transaction(work)

    def _renew(self, held: list[tuple[str, str]]) -> None:
        expires = time.time() + LEASE_SECONDS
        self._run(
            lambda db: db.executemany(
                "UPDATE slots SET expires = ? WHERE key = ? AND ticket = ?",
                [(expires, key, tid) for key, tid in held],
            )
        )

    def record(self, row: UsageRow) -> None:
        self._run(lambda db: _insert_usage(db, row))

    def usage(self, since: float) -> list[UsageRow]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT time, client, model, input_tokens, output_tokens, status, user "
                "FROM usage WHERE time >= ? ORDER BY time",
                (since,),
            ).fetchall()
        )
        return [UsageRow(*row) for row in rows]


def _checked(db: sqlite3.Connection, plan: Plan, now: float) -> Verdict:
    """Read every limit of ``plan``: the refusal of the first one reached, or admitted."""

    def counter(key: str) -> tuple[int, int]:
        row = db.execute("SELECT used, reserved FROM counters WHERE key = ?", (key,)).fetchone()
        return row or (0, 0)

    used = [counter(key)[0] for key, _, _, _ in plan.requests]
    for i, ((_, limit, _, _), count) in enumerate(zip(plan.requests, used, strict=True)):
        if count + 1 > limit:
            return plan_verdict(plan, now, used, "rate_limited", i)
    for i, (key, limit) in enumerate(plan.slots):
        db.execute("DELETE FROM slots WHERE key = ? AND expires <= ?", (key, now))
        (held,) = db.execute("SELECT COUNT(*) FROM slots WHERE key = ?", (key,)).fetchone()
        if held >= limit:
            return plan_verdict(plan, now, used, "too_many_concurrent", i)
    for i, (key, budget, _) in enumerate(plan.tokens):
        spent, reserved = counter(key)
        if spent + reserved + plan.reservation > budget:
            return plan_verdict(plan, now, used, "quota_exhausted", i)
    return plan_verdict(plan, now, used, None, 0)


def _insert_usage(db: sqlite3.Connection, row: UsageRow) -> None:
    db.execute("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?)", astuple(row))


def _worker_thread():
    """Return a one-thread pool under gevent (SQLite waits block a whole thread), else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return None
    from gevent.threadpool import ThreadPool

    return ThreadPool(1)
