"""A pooled connection's check under gevent: one peek tells what urllib3's poll tells."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ..live_gateway import ROOT

_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import socket, time
from gateway.upstream.pool import _Connection
from urllib3.util.wait import wait_for_read

server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
port = server.getsockname()[1]

def pair():
    conn = _Connection("127.0.0.1", port)
    conn.connect()
    peer, _ = server.accept()
    return conn, peer

def both(conn):  # the peek, and urllib3's own poll, must agree
    polled = not wait_for_read(conn.sock, timeout=0.0)
    assert conn.sock._sock.gettimeout() == 0.0  # the fast path is the one tested
    assert conn.is_connected == polled, (conn.is_connected, polled)
    return polled

conn, peer = pair()
print("idle", both(conn))
peer.sendall(b"HTTP/1.1 200 OK\\r\\n")  # a stray byte: the next answer would be wrong
time.sleep(0.05)
print("stray", both(conn))
conn, peer = pair()
peer.close()  # the upstream's FIN
time.sleep(0.05)
print("fin", both(conn))
conn, peer = pair()
peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\1\\0\\0\\0\\0\\0\\0\\0")
peer.close()  # a reset
time.sleep(0.05)
print("reset", both(conn))
conn, peer = pair()
conn.close()
print("closed", conn.is_connected)
"""


def test_a_pooled_connection_is_reused_only_when_open_and_in_step():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:5] == [
        "idle True",
        "stray False",
        "fin False",
        "reset False",
        "closed False",
    ]
