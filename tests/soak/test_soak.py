"""Soak: minutes of mixed load at about a third of capacity; memory and descriptors stay flat.

SOAK_SECONDS sets the length (default 300, what CI runs).
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ..support import AUTH, FAULTS, call_fault

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("SOAK_SECONDS", 300))
_local = threading.local()


def session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def normal(gateway) -> None:
    response = session().post(
        gateway.url + "/proxy", json={"path": "/models"}, headers=AUTH, timeout=20
    )
    assert response.status_code == 200, response.text


def stream(gateway) -> None:
    response = session().get(
        gateway.url + "/proxy/files/sse?events=10&interval=0.05", headers=AUTH, timeout=20
    )
    assert response.status_code == 200, response.text[:300]
    assert response.text.count("\n\n") == 11, response.text[-300:]


def fault(gateway) -> None:
    call_fault(gateway, *random.choice(FAULTS))


def capacity(gateway, seconds: float = 5.0) -> float:
    """Return the requests per second of normal calls with 16 callers in a closed loop."""
    done, stop = [0], time.monotonic() + seconds

    def loop():
        while time.monotonic() < stop:
            normal(gateway)
            done[0] += 1

    with ThreadPoolExecutor(16) as pool:
        for _ in range(16):
            pool.submit(loop)
    return done[0] / seconds


def run_load(gateway, rate: float, seconds: float) -> list[BaseException]:
    """Send mixed calls at ``rate`` per second for ``seconds``; return what went wrong."""
    errors: list[BaseException] = []
    kinds = [normal] * 17 + [stream] * 2 + [fault]

    def one(kind):
        try:
            kind(gateway)
        except BaseException as exc:  # collected and reported, not swallowed
            errors.append(exc)

    with ThreadPoolExecutor(96) as pool:
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * rate)
            for _ in range(due - sent):
                pool.submit(one, random.choice(kinds))
            sent = max(sent, due)
            time.sleep(0.005)
    return errors


def descriptors(gateway, upstream_port: int) -> tuple[int, int]:
    """Return (descriptors other than pooled upstream connections, pooled upstream ones)."""
    total = pooled = 0
    for process in gateway.processes():
        total += process.num_fds()
        pooled += sum(
            1 for c in process.net_connections("tcp") if c.raddr and c.raddr.port == upstream_port
        )
    return total - pooled, pooled


def settle() -> None:
    # Past gunicorn's keep-alive (5 s): idle client connections are closed by then.
    time.sleep(7)


def test_minutes_of_mixed_load_leak_no_memory_or_descriptors(live_gateway, fake_upstream):
    port = fake_upstream.server_address[1]
    # A third of what 16 callers reach in 5 s: the soak looks for leaks over minutes,
    # and headroom keeps the live config's 2 s read and 3 s write timeouts from firing
    # when the machine's own load shifts after the measurement.
    rate = capacity(live_gateway) / 3
    assert not run_load(live_gateway, rate, min(20.0, SECONDS / 5))  # warm-up: pools, caches
    settle()
    rss_before, (fds_before, pooled_before) = live_gateway.rss(), descriptors(live_gateway, port)
    pids = live_gateway.worker_pids()

    errors = run_load(live_gateway, rate, SECONDS)

    settle()
    rss_after, (fds_after, pooled_after) = live_gateway.rss(), descriptors(live_gateway, port)
    assert errors == [], f"{len(errors)} unexpected errors, first: {errors[0]!r}"
    assert live_gateway.worker_pids() == pids
    drift = (rss_after - rss_before) / rss_before
    print(
        f"soak: {rate:.0f} calls/s for {SECONDS:.0f} s; RSS {rss_before >> 20} -> "
        f"{rss_after >> 20} MiB ({drift:+.1%}); descriptors {fds_before} -> {fds_after}, "
        f"plus pooled upstream connections {pooled_before} -> {pooled_after}"
    )
    assert drift < 0.10
    assert fds_after <= fds_before + 2
    # Idle upstream connections stay pooled for reuse, bounded by the load's concurrency.
    assert pooled_after <= 2 * 96
