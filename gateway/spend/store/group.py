"""Group commit: a gevent worker's SQLite transactions that wait for the lock, run as one.

Under load every worker's greenlets want the file's write lock at once, and a
lock taken per call is taken again and again against the other workers. Here
the calls of one worker queue up; one of them, the leader, takes the lock (in
place, pausing cooperatively while another process holds it) and runs every
call queued by then, each in a savepoint of its own, in one transaction, in
order: each call sees the ones before it, exactly as if they had run one by one,
and one that fails is undone alone. Then the lead passes to the next caller
waiting. A second of tries without the lock, and the batch goes to the worker's
thread, which waits its turn in SQLite.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GroupCommit", "in_transaction"]

Work = Callable[[sqlite3.Connection], Any]

# The pauses between tries in place (s): a transaction holds the lock for about
# 0.1 ms, and SQLite's own wait would sleep 1 ms or more at its first retry.
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_IN_PLACE = (0, 0.0001, 0.0002, 0.0005, *[0.001] * 1000)


class _Call:
    __slots__ = ("lead", "outcome", "wake", "work")

    def __init__(self, work: Work) -> None:
        self.work = work
        self.wake = threading.Event()  # gevent's, in a patched worker
        self.outcome: tuple[bool, Any] | None = None  # (True, result) or (False, exception)


class GroupCommit:
    """One per worker process: runs queued work under one lock and one commit."""

    def __init__(self, db: sqlite3.Connection, in_thread: Callable[[Work], Any]) -> None:
        self._db = db  # never waits for the lock (busy_timeout 0)
        self._in_thread = in_thread  # runs a function of a connection in the worker's thread
        self._queue: list[_Call] = []
        self._leading = False

    def run(self, work: Work) -> Any:
        """Run ``work`` in a transaction holding the file's write lock; return its result."""
        call = _Call(work)
        self._queue.append(call)
        if self._leading:
            try:
                call.wake.wait()  # until done, or handed the lead
            except BaseException:  # the caller is gone (a Timeout, a kill)
                if call in self._queue:
                    self._queue.remove(call)  # never run for nobody
                if call.outcome is None and call.wake.is_set():
                    self._pass_lead()  # it had been handed the lead
                raise
        if call.outcome is None:
            self._lead(call)
        ok, value = call.outcome
        if ok:
            return value
        raise value

    def _lead(self, mine: _Call) -> None:
        self._leading = True
        try:
            while mine.outcome is None:
                self._commit_queued()
        finally:
            if mine in self._queue:  # the leader left (a Timeout, a kill) before its call ran
                self._queue.remove(mine)
            self._pass_lead()

    def _pass_lead(self) -> None:
        if self._queue:
            self._queue[0].wake.set()  # it leads next
        else:
            self._leading = False

    def _commit_queued(self) -> None:
        db = self._db
        for pause in _IN_PLACE:
            try:
                if db.in_transaction:  # never build on a transaction something left open
                    db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _BUSY:
                    self._deliver(self._take(), None, exc)
                    return
                time.sleep(pause)  # under gevent, the worker's other greenlets run
                continue
            # Nothing yields from here to the commit: the batch is whole, or rolled back.
            batch = self._take()
            try:
                outcomes = _each(db, batch)
                db.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - the store's failure, or a lone call's own
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._deliver(batch, None, exc)
            else:
                self._deliver(batch, outcomes, None)
            return
        batch = self._take()
        outcomes, error = None, None
        try:
            outcomes = self._in_thread(lambda conn: in_transaction(conn, lambda c: _each(c, batch)))
        except BaseException as exc:  # noqa: BLE001 - every caller gets what stopped the batch
            error = exc
        finally:
            self._deliver(batch, outcomes, error)
        if error is not None and not isinstance(error, Exception):
            raise error  # the leader itself was stopped

    def _take(self) -> list[_Call]:
        batch, self._queue = self._queue, []
        return batch

    @staticmethod
    def _deliver(batch: list[_Call], outcomes: list | None, error: BaseException | None) -> None:
        for i, call in enumerate(batch):
            call.outcome = outcomes[i] if outcomes is not None else (False, error)
            call.wake.set()


def _each(db: sqlite3.Connection, batch: list[_Call]) -> list[tuple[bool, Any]]:
    """Run each call's work in turn, each in a savepoint: one that raises is undone alone."""
    if len(batch) == 1:
        return [(True, batch[0].work(db))]  # the transaction is its savepoint
    outcomes: list[tuple[bool, Any]] = []
    for call in batch:
        db.execute("SAVEPOINT call")
        try:
            outcomes.append((True, call.work(db)))
        except Exception as exc:  # noqa: BLE001 - this call fails, the others go on
            db.execute("ROLLBACK TO call")
            outcomes.append((False, exc))
        db.execute("RELEASE call")
    return outcomes


def in_transaction(db: sqlite3.Connection, work: Work) -> Any:
    """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction: committed whole, or rolled back."""
    if db.in_transaction:  # never build on a transaction something left open
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result
