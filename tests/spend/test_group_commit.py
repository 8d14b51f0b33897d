"""Group commit under gevent: queued transactions run as one, each exactly as if alone.

Each case runs in a gevent-patched process (as a gunicorn worker is), on a real
SQLite file, while another process holds the write lock so that calls queue up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ..live_gateway import ROOT

_SETUP = """
from gevent import monkey; monkey.patch_all()
import sqlite3, subprocess, sys, time, gevent
from gateway.spend.store.sqlite import SQLiteStore
from tests.spend import lock_holder
path = sys.argv[1]
store = SQLiteStore(path)
db, pool, group = store._connection()
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
commits = []
real = group._db
class Watched:  # the in-place connection, counting the commits
    def __getattr__(self, name):
        return getattr(real, name)
    def execute(self, sql, *args):
        if sql == "COMMIT":
            commits.append(1)
        return real.execute(sql, *args)
group._db = Watched()

def hold(seconds):
    return lock_holder.hold(path, seconds)

def take_one(limit):
    def work(db):
        (n,) = db.execute("SELECT COUNT(*) FROM t").fetchone()
        if n >= limit:
            return False
        db.execute("INSERT INTO t VALUES (?)", (n,))
        return True
    return work
"""


def _run(tmp_path, script: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _SETUP + textwrap.dedent(script), str(tmp_path / "g.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_calls_queued_behind_another_process_commit_together_and_stay_exact(tmp_path):
    out = _run(
        tmp_path,
        """
        holder = hold(0.3)
        jobs = [gevent.spawn(group.run, take_one(50)) for _ in range(80)]
        gevent.joinall(jobs)
        holder.wait()
        rows = [n for (n,) in real.execute("SELECT n FROM t ORDER BY n")]
        assert rows == list(range(50)), rows  # each saw the ones before it
        print(sum(job.value for job in jobs), len(commits))
        """,
    )
    admitted, commits = map(int, out)
    assert admitted == 50
    assert commits <= 5  # 80 calls waited for one lock: a few commits, not 80


def test_a_call_that_fails_in_a_batch_is_undone_alone(tmp_path):
    out = _run(
        tmp_path,
        """
        def broken(db):
            db.execute("INSERT INTO t VALUES (-1)")
            raise ValueError("a bug in one call")
        holder = hold(0.2)
        jobs = [gevent.spawn(group.run, take_one(100)) for _ in range(5)]
        jobs.append(gevent.spawn(group.run, broken))
        jobs += [gevent.spawn(group.run, take_one(100)) for _ in range(5)]
        gevent.joinall(jobs)
        holder.wait()
        rows = [n for (n,) in real.execute("SELECT n FROM t ORDER BY n")]
        print(rows == list(range(10)), type(jobs[5].exception).__name__, len(commits))
        assert not real.in_transaction
        """,
    )
    assert out[:2] == ["True", "ValueError"]


def test_a_caller_gone_while_queued_is_never_run_and_the_others_go_on(tmp_path):
    out = _run(
        tmp_path,
        """
        holder = hold(0.3)
        def impatient():
            with gevent.Timeout(0.05):
                return group.run(take_one(100))
        jobs = [gevent.spawn(group.run, take_one(100)) for _ in range(3)]
        gone = [gevent.spawn(impatient) for _ in range(3)]
        jobs += [gevent.spawn(group.run, take_one(100)) for _ in range(3)]
        gevent.joinall(jobs + gone, timeout=10)
        holder.wait()
        (n,) = real.execute("SELECT COUNT(*) FROM t").fetchone()
        left = sum(g.dead and g.exception is not None for g in gone)
        print(n, sum(job.value for job in jobs), left)
        """,
    )
    # The first queued call leads and is not timed out; the 3 that left never ran.
    assert out == ["6", "6", "3"]


def test_a_leader_gone_hands_the_lead_on(tmp_path):
    out = _run(
        tmp_path,
        """
        holder = hold(0.3)
        def leader():
            with gevent.Timeout(0.05):  # leaves while pausing for the lock
                return group.run(take_one(100))
        first = gevent.spawn(leader)
        gevent.sleep(0)
        jobs = [gevent.spawn(group.run, take_one(100)) for _ in range(4)]
        gevent.joinall([first] + jobs, timeout=10)
        holder.wait()
        print(all(job.successful() for job in jobs), first.exception is not None)
        (n,) = real.execute("SELECT COUNT(*) FROM t").fetchone()
        print(n)
        """,
    )
    assert out[:2] == ["True", "True"]
    assert out[2] in ("4", "5")  # the leader's own call may have run before it left
