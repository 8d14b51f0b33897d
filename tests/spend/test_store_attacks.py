"""The stores attacked: killed connections and processes, lost replies, timeouts, forks.

Limit counts must stay exact (or, when a reply is lost, conservative: counted
more, never less); usage rows may be lost with a killed process, never written twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store import open_store
from gateway.spend.store.base import UsageRow

from ..live_gateway import ROOT
from .test_live import RedisServer

LIMITED = Ask(
    (("client:c", LimitSet((parse_rate("100/day"),), 10, (parse_rate("10000/day"),))),), 100
)


def _row(i: int) -> UsageRow:
    return UsageRow(1_800_000_000.0 + i, "c", "gpt-x", 10, 5, 200)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


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
