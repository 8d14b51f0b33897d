"""The stores off the request path: usage rows in batches, SQLite's lock taken in place.

Usage rows wait in each process and are written by its background thread (every
second, or every 100 rows) and when the process exits; limit counts are never
deferred. Under gevent, an SQLite transaction runs in place when the file's lock
is free and goes to the worker's thread only when another connection holds it.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store import open_store
from gateway.spend.store.base import FLUSH_ROWS, UsageRow
from gateway.spend.store.sqlite import SQLiteStore

from ..live_gateway import ROOT
from ..support import need_redis_server
from .test_live import RedisServer

ROW = UsageRow(round(time.time(), 3), "chat", "gpt-x", 10, 5, 200)


def _ask(requests=(), concurrent=None, tokens=(), reservation=0, scope="client:c"):
    limits = LimitSet(
        tuple(parse_rate(r) for r in requests), concurrent, tuple(parse_rate(t) for t in tokens)
    )
    return Ask(((scope, limits),), reservation)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    need_redis_server()
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield f"redis://127.0.0.1:{redis.port}/0"
    redis.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        import redis

        redis.Redis.from_url(url).flushall()
        return url
    return f"sqlite:///{tmp_path}/limits.sqlite3"


def _in_gevent(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` in a gevent-patched process, as a gunicorn worker is."""
    code = "from gevent import monkey; monkey.patch_all()\n" + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


# --- usage rows ------------------------------------------------------------------------


def test_recording_a_row_writes_nothing_in_the_caller_and_rows_go_in_batches(tmp_path):
    store = SQLiteStore(str(tmp_path / "limits.sqlite3"))
    writes: list[tuple[int, int]] = []
    write = store.background._write

    def counted(rows, exiting, batch):
        writes.append((threading.get_ident(), len(rows)))
        write(rows, exiting, batch)

    store.background._write = counted
    for _ in range(2 * FLUSH_ROWS + 50):
        store.record(ROW)
    assert not any(ident == threading.get_ident() for ident, _ in writes)
    deadline = time.monotonic() + 5
    while sum(n for _, n in writes) < 2 * FLUSH_ROWS + 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(n for _, n in writes) == 2 * FLUSH_ROWS + 50
    assert len(writes) <= 3  # two full batches and the rest within the second
    assert all(ident != threading.get_ident() for ident, _ in writes)
    assert len(store.usage(0)) == 2 * FLUSH_ROWS + 50


def test_a_process_reading_usage_sees_its_own_waiting_rows(store_url, tmp_path):
    store = open_store(store_url, str(tmp_path))
    store.record(ROW)
    assert store.usage(ROW.time - 1) == [ROW]


def test_rows_waiting_are_written_when_the_process_exits(store_url, tmp_path):
    _in_gevent(
        """
        import sys, time
        from gateway.spend.store import open_store
        from gateway.spend.store.base import UsageRow
        store = open_store(sys.argv[1], sys.argv[2])
        for i in range(7):
            store.record(UsageRow(time.time(), "chat", "gpt-x", 10, 5, 200))
        """,  # and exits at once, well within the second
        store_url,
        str(tmp_path),
    )
    assert len(open_store(store_url, str(tmp_path)).usage(0)) == 7


def test_a_killed_process_loses_its_waiting_rows_but_never_a_count(store_url, tmp_path):
    result = _in_gevent(
        """
        import os, signal, sys
        from gateway.policy.limits import Ask, LimitSet, parse_rate
        from gateway.spend.store import open_store
        from gateway.spend.store.base import UsageRow
        store = open_store(sys.argv[1], sys.argv[2])
        limits = LimitSet((parse_rate("100/day"),), 5, (parse_rate("100000/day"),))
        for i in range(3):
            verdict = store.admit(Ask((("client:c", limits),), 500))
            row = UsageRow(1_800_000_000.0 + i, "c", "gpt-x", 10, 5, 200)
            store.finish(verdict.ticket, 15, row)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        store_url,
        str(tmp_path),
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    store = open_store(store_url, str(tmp_path))
    ask = _ask(requests=["100/day"], concurrent=5, tokens=["100000/day"], reservation=500)
    verdict = store.check(ask)
    remaining = {quota.kind: quota.remaining for quota in verdict.quotas}
    assert remaining["requests"] == 100 - 3 - 1  # every admission counted
    assert remaining["tokens"] == 100000 - 3 * 15 - 500  # every call settled, nothing held
    assert store.usage(0) == []  # the rows of its last second are what a SIGKILL loses


def test_rows_that_cannot_be_written_wait_for_the_next_try(tmp_path):
    store = SQLiteStore(str(tmp_path / "limits.sqlite3"))
    store.usage(0)  # make the file
    blocker = sqlite3.connect(str(tmp_path / "limits.sqlite3"), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    original = store._connection()[0]
    original.execute("PRAGMA busy_timeout=50")
    store.record(ROW)
    store.flush()  # fails: the file is locked; the row stays
    blocker.execute("ROLLBACK")
    assert store.usage(0) == [ROW]


# --- SQLite under gevent -------------------------------------------------------------------

_GEVENT_STORE = """
import sys, time, gevent
from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store.sqlite import SQLiteStore
store = SQLiteStore(sys.argv[1])
limits = LimitSet((parse_rate("1000000/day"),), 1000, (parse_rate("100000000/day"),))
ask = Ask((("client:c", limits),), 100)
handed = []
db, pool, group = store._connection()
quick = group._db  # the connection used in place


class Counted:  # the worker's thread, counting what is handed to it
    def apply(self, *args):
        handed.append(1)
        return pool.apply(*args)


store._local = (store._local[0], db, Counted(), group)
"""


def test_an_sqlite_transaction_with_the_lock_free_runs_in_place(tmp_path):
    result = _in_gevent(
        _GEVENT_STORE
        + """
for _ in range(50):
    verdict = store.admit(ask)
    store.finish(verdict.ticket, 50)
assert not quick.in_transaction
print(len(handed))
""",
        str(tmp_path / "limits.sqlite3"),
    )
    assert result.stdout.strip() == "0"  # no admission nor settling went to the thread


def test_an_sqlite_lock_held_elsewhere_is_waited_for_in_the_thread_not_in_the_hub(tmp_path):
    result = _in_gevent(
        _GEVENT_STORE
        + """
from tests.spend.lock_holder import hold
holder = hold(sys.argv[1], 1.5)
ticks = []
def beat():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.02)
beater = gevent.spawn(beat)
started = time.monotonic()
verdict = store.admit(ask)  # the lock is held: a second of tries in place, then the thread
waited = time.monotonic() - started
store.finish(verdict.ticket, 50)
beater.kill()
holder.wait()
during = [t for t in ticks if started <= t <= started + waited]
assert verdict.admitted and not quick.in_transaction
handed_while_locked = len(handed)
verdict = store.admit(ask)  # the lock is free again: in place
print(round(waited, 2), len(during), handed_while_locked, len(handed))
""",
        str(tmp_path / "limits.sqlite3"),
    )
    waited, beats, handed_while_locked, handed = result.stdout.split()
    assert float(waited) >= 1.2  # it did wait for the other process
    assert int(beats) >= 30  # and the worker's other greenlets ran meanwhile
    assert int(handed_while_locked) >= 1 and int(handed) == int(handed_while_locked)


def _burst_in_gevent(path: str, start: float) -> subprocess.Popen:
    code = "from gevent import monkey; monkey.patch_all()\n" + textwrap.dedent(
        """
        import sys, time, gevent
        from gateway.policy.limits import Ask, LimitSet, parse_rate
        from gateway.spend.store.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1])
        limits = LimitSet((parse_rate("300/day"),), None, (parse_rate("25000/day"),))
        ask = Ask((("client:burst", limits),), 100)
        def one():
            verdict = store.admit(ask)
            if verdict.admitted:
                gevent.sleep(0)
                store.finish(verdict.ticket, 60 if verdict.ticket.id[-1] in "0123" else None)
            return verdict.admitted
        time.sleep(max(0, float(sys.argv[2]) - time.time()))
        jobs = [gevent.spawn(one) for _ in range(200)]
        gevent.joinall(jobs)
        print(sum(job.value for job in jobs))
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, path, str(start)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def test_bursts_from_gevent_workers_on_one_file_stay_exact(tmp_path):
    # 4 processes x 200 greenlets, in place and in the thread at once: the request
    # limit admits exactly 300 and no token is spent beyond the budget.
    path = str(tmp_path / "limits.sqlite3")
    SQLiteStore(path).usage(0)
    start = time.time() + 1.5
    bursts = [_burst_in_gevent(path, start) for _ in range(4)]
    admitted = sum(int(burst.communicate(timeout=60)[0]) for burst in bursts)
    assert 0 < admitted <= 300
    db = sqlite3.connect(path)
    counters = dict(db.execute("SELECT substr(key, 1, 3), used FROM counters").fetchall())
    reserved = db.execute("SELECT SUM(reserved) FROM counters").fetchone()[0]
    assert counters["req"] == admitted  # every admission counted once
    assert counters["tok"] <= 25000 and reserved == 0  # every call settled
    assert db.execute("SELECT COUNT(*) FROM slots").fetchone()[0] == 0


# --- Redis: admit and settle on the store's own connections ----------------------------------


def _spent(store, ask) -> dict[str, int]:
    verdict = store.check(ask)
    return {quota.kind: quota.remaining for quota in verdict.quotas}


LIMITED = _ask(requests=["100/day"], concurrent=1, tokens=["10000/day"], reservation=100)


@pytest.mark.parametrize("idle", [0, 1.2])  # reused at once; reused after a second idle
def test_a_restarted_redis_is_found_again_without_a_refused_call(own_redis, idle):
    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    verdict = store.admit(LIMITED)
    store.finish(verdict.ticket, 10)
    own_redis.stop()  # every connection the store holds is now closed, its scripts gone
    own_redis.start()
    time.sleep(idle)
    verdict = store.admit(LIMITED)  # no StoreUnavailable: a new connection, the script loaded
    assert verdict.admitted
    store.finish(verdict.ticket, 10)
    assert _spent(store, LIMITED) == {"requests": 100 - 1 - 1, "tokens": 10000 - 10 - 100}


def test_a_connection_closed_by_the_server_is_replaced(own_redis):
    import redis

    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    store.finish(store.admit(LIMITED).ticket, 10)
    redis.Redis(port=own_redis.port).client_kill_filter(_type="normal", skipme=True)
    store.finish(store.admit(LIMITED).ticket, 10)
    assert _spent(store, LIMITED)["tokens"] == 10000 - 2 * 10 - 100


def test_a_settling_sent_twice_is_counted_once(own_redis):
    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    verdict = store.admit(LIMITED)
    settled = [(key, reserved, 30) for key, _, reserved in verdict.ticket.reservations]
    store._finish(verdict.ticket, settled)
    store._finish(verdict.ticket, settled)  # as if its reply was lost and it was sent again
    assert _spent(store, LIMITED)["tokens"] == 10000 - 30 - 100
    assert store.admit(LIMITED).admitted  # its slot is free, once


def test_a_stopped_redis_is_unavailable_not_an_error(own_redis):
    from gateway.spend.store.base import StoreUnavailable

    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    store.finish(store.admit(LIMITED).ticket, 10)
    own_redis.stop()
    with pytest.raises(StoreUnavailable):
        store.admit(LIMITED)


def test_a_limits_file_made_before_without_rowid_tables_works_the_same(tmp_path):
    path = tmp_path / "limits.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(  # the tables as the gateway made them before
        "CREATE TABLE counters (key TEXT PRIMARY KEY, ends REAL NOT NULL, "
        "used INTEGER NOT NULL, reserved INTEGER NOT NULL);"
        "CREATE TABLE slots (key TEXT NOT NULL, ticket TEXT NOT NULL, expires REAL NOT NULL, "
        "PRIMARY KEY (key, ticket));"
    )
    old.close()
    store = SQLiteStore(str(path))
    ask = _ask(requests=["2/day"], concurrent=1, tokens=["1000/day"], reservation=100)
    first = store.admit(ask)
    assert first.admitted and not store.admit(ask).admitted  # the slot is held
    store.finish(first.ticket, 30)
    assert store.admit(ask).admitted and not store.admit(ask).admitted  # 2 calls a day
    assert (
        "WITHOUT ROWID"
        not in sqlite3.connect(path)
        .execute("SELECT sql FROM sqlite_master WHERE name = 'counters'")
        .fetchone()[0]
    )


def test_a_new_limits_file_keeps_counters_and_slots_in_their_keys_b_trees(tmp_path):
    path = tmp_path / "limits.sqlite3"
    SQLiteStore(str(path)).usage(0)
    tables = dict(sqlite3.connect(path).execute("SELECT name, sql FROM sqlite_master"))
    assert tables["counters"].endswith("WITHOUT ROWID")
    assert tables["slots"].endswith("WITHOUT ROWID")
