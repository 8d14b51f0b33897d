"""The embedded limit store: one SQLite file shared by every worker and process that opens it."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

from ...policy.limits import Budget, Ticket, Verdict
from .base import LEASE_SECONDS, Plan, Store, StoreUnavailable, UsageRow, plan_verdict
from .group import GroupCommit, in_transaction

__all__ = ["SQLiteStore"]


# Counters and slots are WITHOUT ROWID: a row lives in its key's b-tree only, so a
# commit writes half the pages (a quarter less CPU per admit + settle). A file made
# before keeps its tables as they are, and works the same.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, ends REAL NOT NULL, used INTEGER NOT NULL, reserved INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (
    key TEXT NOT NULL, ticket TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, ticket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    time REAL NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER, output_tokens INTEGER, status INTEGER NOT NULL, user TEXT, cost INTEGER
);
CREATE INDEX IF NOT EXISTS usage_time ON usage (time);
"""


class SQLiteStore(Store):
    """Counters in one SQLite file, shared by every worker and process that opens it.

    Under gevent a worker's transactions are committed in groups, in place
    (``group``): a worker waiting for the lock goes on serving its other
    requests. Usage rows, checkpoints and old windows are written by the
    background thread, off the request path.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._local: tuple[int, sqlite3.Connection, Any, GroupCommit | None] | None = None
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self._ticks = 0
        self._written = self._checkpointed = 0  # transactions, as of the last checkpoint

    def _connection(self) -> tuple[sqlite3.Connection, Any, GroupCommit | None]:
        """Return this process's connection, its thread and its group commit (gevent)."""
        if self._local is None or self._local[0] != os.getpid():
            with self._opening:  # the first calls of a worker come at once
                if self._local is None or self._local[0] != os.getpid():
                    self._local = (os.getpid(), *self._open())
        return self._local[1:]

    def _open(self) -> tuple[sqlite3.Connection, Any, GroupCommit | None]:
        pool = _worker_thread()
        if pool is None:
            return _prepared(self.path), None, None
        # The thread ends with the store (a process may make many: the test suite).
        weakref.finalize(self, pool.hub.loop.run_callback_threadsafe, pool.kill).atexit = False
        # Opened in the thread: opening may wait for another process's lock.
        db = pool.apply(_prepared, (self.path,))
        return db, pool, GroupCommit(pool.apply(_in_place, (self.path,)), self._run)

    def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` on the connection: in its thread under gevent, else holding the lock."""
        try:
            db, pool, _ = self._connection()
            if pool is not None:
                return pool.apply(work, (db,))
            with self._lock:
                return work(db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {type(exc).__name__}") from None

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` holding the file's write lock: every process waits its turn."""
        self.background.start()
        self._written += 1
        try:
            _, _, group = self._connection()
            if group is not None:
                return group.run(work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {type(exc).__name__}") from None
        return self._run(lambda db: in_transaction(db, work))

    def _tick(self) -> None:
        """Checkpoint the WAL in the thread; once a minute, forget windows that ended a day ago."""
        if self._written == self._checkpointed:
            return  # nothing new since the last one
        self._checkpointed = self._written
        self._ticks += 1
        forget = self._ticks % 60 == 1

        def work(db: sqlite3.Connection) -> None:
            if forget:
                db.execute("DELETE FROM counters WHERE ends < ?", (time.time() - 86400,))
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

        self._run(work)

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        return self._transaction(lambda db: self._admit_locked(db, plan, ticket, now))

    def _check(self, plan: Plan, now: float) -> Verdict:
        return self._transaction(lambda db: _checked(db, plan, now))

    @staticmethod
    def _admit_locked(db: sqlite3.Connection, plan: Plan, ticket: str, now: float) -> Verdict:
        verdict = _checked(db, plan, now)
        if not verdict.admitted:
            return verdict
        for limit in plan.requests:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 1, 0) "
                "ON CONFLICT (key) DO UPDATE SET used = used + 1",
                (limit.key, limit.end),
            )
        for key, _ in plan.slots:
            db.execute("INSERT INTO slots VALUES (?, ?, ?)", (key, ticket, now + LEASE_SECONDS))
        for limit, amount in plan.budgets:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 0, ?) "
                "ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved",
                (limit.key, limit.end, amount),
            )
        return verdict

    def _finish(self, ticket: Ticket, settled: list[tuple[str, int, int]]) -> None:
        def work(db: sqlite3.Connection) -> None:
            for key in ticket.slots:
                db.execute("DELETE FROM slots WHERE key = ? AND ticket = ?", (key, ticket.id))
            for key, reserved, spent in settled:
                db.execute(
                    "UPDATE counters SET reserved = MAX(0, reserved - ?), used = used + ? "
                    "WHERE key = ?",
                    (reserved, spent, key),
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

    def _write_usage(self, rows: list[UsageRow], exiting: bool, batch: str) -> None:
        # A commit that returns was written, one that raises was not: ``batch`` is not needed.
        values = [astuple(row) for row in rows]

        def work(db: sqlite3.Connection) -> None:
            db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

        if not exiting:
            self._run(lambda db: in_transaction(db, work))
            return
        try:  # the process is ending: wait in place, on a connection of its own
            db = _prepared(self.path)
            try:
                in_transaction(db, work)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {type(exc).__name__}") from None

    def _read_usage(self, since: float) -> list[UsageRow]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT time, client, model, input_tokens, output_tokens, status, user, cost "
                "FROM usage WHERE time >= ? ORDER BY time",
                (since,),
            ).fetchall()
        )
        return [UsageRow(*row) for row in rows]

    def counts(self, limits: list[Budget]) -> list[int]:
        def read(db: sqlite3.Connection) -> list[int]:
            return [sum(_counter(db, limit.key)) for limit in limits]

        return self._run(read)

    def reset(self, limits: list[Budget]) -> None:
        self._transaction(
            lambda db: db.executemany(
                "UPDATE counters SET used = 0 WHERE key = ?", [(limit.key,) for limit in limits]
            )
        )


def _checked(db: sqlite3.Connection, plan: Plan, now: float) -> Verdict:
    """Read every limit of ``plan``: the refusal of the first one reached, or admitted."""

    used = [_counter(db, limit.key)[0] for limit in plan.requests]
    for i, (limit, count) in enumerate(zip(plan.requests, used, strict=True)):
        if count + 1 > limit.rate.count:
            return plan_verdict(plan, now, used, [], "rate_limited", i)
    for i, (key, limit) in enumerate(plan.slots):
        db.execute("DELETE FROM slots WHERE key = ? AND expires <= ?", (key, now))
        (taken,) = db.execute("SELECT COUNT(*) FROM slots WHERE key = ?", (key,)).fetchone()
        if taken >= limit:
            return plan_verdict(plan, now, used, [], "too_many_concurrent", i)
    held = []
    for i, (limit, amount) in enumerate(plan.budgets):
        held.append(sum(_counter(db, limit.key)))
        if held[i] + amount > limit.rate.count:
            return plan_verdict(plan, now, used, held, "quota_exhausted", i)
    return plan_verdict(plan, now, used, held, None, 0)


def _counter(db: sqlite3.Connection, key: str) -> tuple[int, int]:
    """Return a counter's (used, reserved), or zeros for a window not counted yet."""
    row = db.execute("SELECT used, reserved FROM counters WHERE key = ?", (key,)).fetchone()
    return row or (0, 0)


def _open(path: str, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # Safe against a crashed process (the WAL survives it); a power cut may lose
    # the last commits.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _prepared(path: str) -> sqlite3.Connection:
    """Open ``path`` (made if missing) with every table in place."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = _open(path, timeout=10)
    db.executescript(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    if "user" not in columns:  # a file from before sessions
        db.execute("ALTER TABLE usage ADD COLUMN user TEXT")
    if "cost" not in columns:  # a file from before prices
        db.execute("ALTER TABLE usage ADD COLUMN cost INTEGER")
    return db


def _in_place(path: str) -> sqlite3.Connection:
    """Open the connection for the hub: it never waits for the lock (that would stop every
    greenlet of the worker), and never checkpoints (the background thread does)."""
    db = _open(path, timeout=10)
    db.execute("PRAGMA busy_timeout=0")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def _worker_thread():
    """Return a one-thread pool under gevent (SQLite waits block a whole thread), else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return None
    from gevent.threadpool import ThreadPool

    return ThreadPool(1)
