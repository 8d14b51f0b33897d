"""The stores attacked: killed connections and processes, lost replies, timeouts, forks.

Limit counts must stay exact (or, when a reply is lost, conservative: counted
more, never less); usage rows may be lost with a killed process, never written twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store import open_store
from gateway.spend.store.base import UsageRow
from gateway.spend.store.sqlite import SQLiteStore

from ..live_gateway import ROOT
from .test_store_paths import _in_gevent

LIMITED = Ask(
    (("client:c", LimitSet((parse_rate("100/day"),), 10, (parse_rate("10000/day"),))),), 100
)


def _row(i: int) -> UsageRow:
    return UsageRow(1_800_000_000.0 + i, "c", "gpt-x", 10, 5, 200)


def _remaining(store, ask=LIMITED) -> dict[str, int]:
    return {quota.kind: quota.remaining for quota in store.check(ask).quotas}


class ReplyCutter:
    """A TCP relay to Redis that, when told, closes a connection instead of passing a reply on.

    The server has run the command; the client sees its connection closed unanswered.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.cuts:
                    self.cuts -= 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()


# --- Redis: connections killed, replies lost ----------------------------------------------


def test_every_connection_killed_at_once_refuses_no_call(own_redis):
    # After a burst a worker holds several idle connections; a Redis restart or a
    # CLIENT KILL closes them all. The next call must not be refused for it.
    import redis

    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    store.finish(store.admit(LIMITED).ticket, 10)
    wire = store._redis()["wire"]
    held = [wire._take()[0] for _ in range(4)]  # as a burst of 4 leaves them
    for conn in held:
        conn.connect()
        wire._give(conn)
    redis.Redis(port=own_redis.port).client_kill_filter(_type="normal", skipme=True)
    for _ in range(4):
        verdict = store.admit(LIMITED)
        assert verdict.admitted
        store.finish(verdict.ticket, 10)
    assert _remaining(store) == {"requests": 100 - 5 - 1, "tokens": 10000 - 5 * 10 - 100}


def test_usage_rows_whose_reply_was_lost_are_written_once(own_redis):
    cutter = ReplyCutter(own_redis.port)
    try:
        store = open_store(f"redis://127.0.0.1:{cutter.port}/0", "")
        store.usage(0)  # connected
        for i in range(5):
            store.record(_row(i))
        cutter.cuts = 1  # the rows are written; the reply is lost
        store.flush()
        store.flush()  # whatever was kept for another try
        assert store.usage(0) == [_row(i) for i in range(5)]
    finally:
        cutter.close()


def test_rows_waiting_for_a_store_that_is_down_stay_bounded_the_newest_kept(tmp_path, monkeypatch):
    from gateway.spend.store import base

    monkeypatch.setattr(base, "MAX_WAITING_ROWS", 300)
    store = open_store(f"sqlite:///{tmp_path}/limits.sqlite3", str(tmp_path))
    write, tries = store.background._write, []

    def down(rows, exiting, batch):
        tries.append(batch)
        raise base.StoreUnavailable("down")

    store.background._write = down
    for i in range(1000):
        store.record(_row(i))
        if i % 100 == 99:
            store.flush()
    assert len(tries) < 1000 // 100 * 3 + 10  # each flush stops at the first batch refused
    store.background._write = write
    assert store.usage(0) == [_row(i) for i in range(700, 1000)]


# --- fork after use -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_slot_of_a_killed_parent_is_freed_though_its_forked_child_lives(kind, tmp_path, request):
    # The child inherits the parent's memory, the slots it renews included: those are
    # the parent's to renew, and must expire with it.
    url = f"sqlite:///{tmp_path}/limits.sqlite3"
    if kind == "redis":
        url = f"redis://127.0.0.1:{request.getfixturevalue('own_redis').port}/0"
    code = """
import os, signal, sys, time
from gateway.policy.limits import Ask, LimitSet
from gateway.spend.store import open_store
store = open_store(sys.argv[1], sys.argv[2])
ask = Ask((("client:f", LimitSet(concurrent=2)),), 0)
assert store.admit(ask).admitted  # held, and renewed, until the parent dies
child = os.fork()
if child == 0:
    assert store.admit(ask).admitted  # the child's own slot
    time.sleep(20)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "GATEWAY_WORKER_TIMEOUT": "1"}  # a lease of 1 s, renewed every 1/3 s
    parent = subprocess.Popen(
        [sys.executable, "-c", code, url, str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.wait(10)
    try:
        store = open_store(url, str(tmp_path))
        ask = Ask((("client:f", LimitSet(concurrent=2)),), 0)
        deadline = time.monotonic() + 5
        while not store.admit(ask).admitted:
            assert time.monotonic() < deadline, "the dead parent's slot is renewed by its child"
            time.sleep(0.2)
        assert not store.admit(ask).admitted  # the child's slot is held still
    finally:
        os.kill(child, signal.SIGKILL)


# --- many stores in one process -----------------------------------------------------------


@pytest.mark.parametrize("patched", [True, False])  # a gevent worker; threads (the test suite)
def test_a_dropped_store_leaves_no_thread_nor_open_file_behind(patched, tmp_path):
    # Every app made (one per test, in the test suite) has a store of its own.
    code = """
import gc, os, sys, threading, time
from gateway.policy.limits import Ask, LimitSet
from gateway.spend.store import open_store
from gateway.spend.store.base import UsageRow
from gateway.spend.store.sqlite import SQLiteStore

def held():
    native = len(os.listdir("/proc/self/task"))
    return native, len(threading.enumerate()), len(os.listdir("/proc/self/fd"))

before = held()
for _ in range(10):
    store = open_store("sqlite:///" + sys.argv[1] + "/limits.sqlite3", sys.argv[1])
    verdict = store.admit(Ask((("client:c", LimitSet(concurrent=5)),), 0))
    store.finish(verdict.ticket, None, UsageRow(time.time(), "c", "gpt-x", 1, 1, 200))
    del store, verdict
deadline = time.monotonic() + 5
while held() != before and time.monotonic() < deadline:
    gc.collect()
    time.sleep(0.1)
print(before, held())
"""
    if patched:
        code = "from gevent import monkey; monkey.patch_all()\n" + code
    env = {**os.environ, "GATEWAY_WORKER_TIMEOUT": "1"}  # slots renewed every 1/3 s
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.strip().split(") (")
    assert before + ")" == "(" + after, result.stdout  # threads (native, Python) and files


# --- SQLite under gevent: contended, killed, timed out ---------------------------------------

_BURST = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store.sqlite import SQLiteStore
store = SQLiteStore(sys.argv[1])
limits = LimitSet((parse_rate("100/day"),), 8, (parse_rate("6000/day"),))
ask = Ask((("client:burst", limits),), 100)
def one(i):
    verdict = store.admit(ask)
    if verdict.admitted:
        print("admitted", flush=True)  # said once counted: a SIGKILL may come before it
        gevent.sleep(0.002 * (i % 5))
        store.finish(verdict.ticket, 60 if i % 3 else None)
    return verdict.admitted
time.sleep(max(0, float(sys.argv[2]) - time.time()))
for _ in range(3):
    gevent.joinall([gevent.spawn(one, i) for i in range(150)])
"""

# Takes the file's lock for 3 ms out of every 5: transactions find it held, wait in
# place, and go to the worker's thread.
_HOG = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
while True:
    db.execute("BEGIN IMMEDIATE")
    time.sleep(0.003)
    db.execute("COMMIT")
    time.sleep(0.002)
"""

# Reads the slots held, as often as it can: never more than the cap.
_WATCH = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
most = 0
for _ in range(4000):
    (held,) = db.execute("SELECT COUNT(*) FROM slots").fetchone()
    most = max(most, held)
    time.sleep(0.001)
print(most, flush=True)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True, **kwargs
    )


def test_bursts_on_a_contended_file_with_a_worker_killed_midway_stay_exact(tmp_path):
    path = str(tmp_path / "limits.sqlite3")
    SQLiteStore(path).usage(0)
    env = {**os.environ, "GATEWAY_WORKER_TIMEOUT": "2"}  # a killed worker's slots: 2 s
    start = str(time.time() + 1.5)
    hog, watch = _python(_HOG, path), _python(_WATCH, path)
    bursts = [_python(_BURST, path, start, env=env) for _ in range(4)]
    try:
        said = 0
        while said < 10 and bursts[0].stdout.readline():  # killed once it has admitted 10
            said += 1
        bursts[0].kill()
        said += len(bursts[0].stdout.read().split())
        said += sum(len(burst.communicate(timeout=60)[0].split()) for burst in bursts[1:])
        most = int(watch.communicate(timeout=60)[0])
    finally:
        for process in (hog, watch, *bursts):
            process.kill()
            process.wait()
    db = sqlite3.connect(path)
    counters = dict(db.execute("SELECT substr(key, 1, 3), used + reserved FROM counters"))
    assert said <= counters["req"] <= 100  # every admission counted, none past the limit
    assert counters["tok"] <= 6000
    assert most <= 8  # never more calls at once than the cap, across processes
    time.sleep(2.5)  # the killed worker's slots expire with their leases
    store = SQLiteStore(path)
    ask = Ask((("client:burst", LimitSet(concurrent=8)),), 0)
    assert all(store.admit(ask).admitted for _ in range(8))


def test_admissions_timed_out_or_killed_while_the_lock_is_held_leave_nothing_open(tmp_path):
    # gevent.Timeout and Greenlet.kill come while a transaction waits for another
    # process's lock: in a pause in place, or for the worker's thread. What the
    # thread admits after its caller gave up is counted (and its slot expires);
    # the worker goes on in place, with no transaction left open.
    path = str(tmp_path / "limits.sqlite3")
    result = _in_gevent(
        """
        import sys, time, gevent
        from gateway.policy.limits import Ask, LimitSet, parse_rate
        from gateway.spend.store.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1])
        ask = Ask((("client:t", LimitSet((parse_rate("100/day"),), 50)),), 0)
        db, pool, group = store._connection()
        quick = group._db  # the connection used in place
        from tests.spend.lock_holder import hold
        holder = hold(sys.argv[1], 0.5)
        def timed(seconds):
            try:
                with gevent.Timeout(seconds):
                    return store.admit(ask).admitted
            except gevent.Timeout:
                return "timeout"
        timed_out = [gevent.spawn(timed, 0.015 * i) for i in range(1, 30)]
        killed = [gevent.spawn(store.admit, ask) for _ in range(10)]
        gevent.sleep(0.3)
        gevent.killall(killed)
        gevent.joinall(timed_out)
        assert all(job.value == "timeout" for job in timed_out)
        holder.wait()
        pool.apply(lambda: None)  # what the thread had to do is done
        assert not quick.in_transaction and not db.in_transaction
        row = db.execute("SELECT used FROM counters").fetchone()
        used = row[0] if row else 0  # a call whose caller left while queued never ran
        (slots,) = db.execute("SELECT COUNT(*) FROM slots").fetchone()
        assert store.admit(ask).admitted  # in place again
        print(used, slots)
        """,
        path,
    )
    used, slots = map(int, result.stdout.split())
    assert used == slots <= 39  # what was admitted holds a slot till its lease ends


def test_a_transaction_left_open_in_place_is_rolled_back_not_built_on(tmp_path):
    result = _in_gevent(
        """
        import sys
        from gateway.policy.limits import Ask, LimitSet, parse_rate
        from gateway.spend.store.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1])
        ask = Ask((("client:o", LimitSet((parse_rate("100/day"),),)),), 0)
        db, pool, group = store._connection()
        quick = group._db  # the connection used in place
        quick.execute("BEGIN IMMEDIATE")  # as if something had left it open
        quick.execute("INSERT INTO counters VALUES ('stray', 0, 1, 0)")
        assert store.admit(ask).admitted
        assert not quick.in_transaction
        print(db.execute("SELECT COUNT(*) FROM counters WHERE key = 'stray'").fetchone()[0])
        """,
        str(tmp_path / "limits.sqlite3"),
    )
    assert result.stdout.strip() == "0"


# --- Redis under gevent: scripts flushed, connections killed mid-burst ------------------------


_RBURST = """
import sys, gevent, redis
from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store import open_store
from gateway.spend.store.base import StoreUnavailable
url, havoc = sys.argv[1], sys.argv[2]
store = open_store(url, "")
limits = LimitSet((parse_rate("300/day"),), 20, (parse_rate("20000/day"),))
ask = Ask((("client:r", limits),), 100)
admin = redis.Redis.from_url(url)
refused = []
def one(i):
    try:
        verdict = store.admit(ask)
    except StoreUnavailable as exc:
        refused.append(str(exc))
        return 0
    if verdict.admitted:
        gevent.sleep(0.001 * (i % 4))
        try:
            store.finish(verdict.ticket, 60)
        except StoreUnavailable:  # its reservation stays spent whole
            pass
    return int(verdict.admitted)
def havoc_():
    gevent.sleep(0.01)
    for n in range(1 if havoc == "flush" else 6):
        gevent.sleep(0.01)
        admin.client_kill_filter(_type="normal", skipme=True) if n % 2 else admin.script_flush()
jobs = [gevent.spawn(one, i) for i in range(600)]
gevent.joinall([*jobs, gevent.spawn(havoc_)])
print(sum(job.value for job in jobs), len(refused), sorted(set(refused)))
"""


@pytest.mark.parametrize("havoc", ["flush", "kill"])
def test_a_redis_burst_through_script_flush_and_client_kill_stays_exact(own_redis, havoc):
    # Scripts flushed mid-burst: none of 600 calls at once is refused for it (each
    # loads the script on its own connection). Connections killed mid-command: the
    # calls on them may be refused, and a count may be counted twice, never less.
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    result = _in_gevent(_RBURST, url, havoc)
    admitted, refused, why = result.stdout.split(maxsplit=2)
    import redis

    admin = redis.Redis.from_url(url)
    (requests,) = (int(admin.get(key)) for key in admin.keys("req:client:r:*"))
    (tokens,) = (admin.hgetall(key) for key in admin.keys("tok:client:r:*"))
    if havoc == "flush":
        assert int(refused) == 0, why
    assert int(admitted) <= requests <= 300  # counted (twice if a reply was lost)
    assert int(tokens[b"used"]) + int(tokens[b"reserved"]) <= 20000  # never past a budget
