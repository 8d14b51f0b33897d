"""Upstream and client faults against the real app under gunicorn: no worker dies."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ..support import AUTH, CHAT_KEY, FAULTS, SLOW, call_fault

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers(gateway):
    before = gateway.worker_pids()
    yield before
    assert gateway.worker_pids() == before, "a worker died or was restarted"


def normal_call(gateway) -> int:
    return requests.post(
        gateway.url + "/proxy", json={"path": "/models"}, headers=AUTH, timeout=20
    ).status_code


@pytest.mark.parametrize(
    ("path", "headers", "expected"), FAULTS, ids=[f[0].split("/")[-1].split("?")[0] for f in FAULTS]
)
def test_each_upstream_fault_gets_a_clear_error(gateway, workers, path, headers, expected):
    call_fault(gateway, path, headers, expected)


def test_slow_drip_within_the_read_timeout_passes_whole(gateway, workers):
    # 15 pieces 200 ms apart take 3 s, six times the 500 ms read timeout: never cut.
    response = requests.get(gateway.url + "/proxy/drip?pieces=15&gap=0.2", headers=SLOW, timeout=20)
    assert response.status_code == 200
    assert response.text == "".join(f"data: {i}\n\n" for i in range(15))


def test_a_hundred_normal_calls_succeed_after_the_faults(gateway, workers):
    for path, headers, expected in FAULTS:
        call_fault(gateway, path, headers, expected)
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda _: normal_call(gateway), range(100)))
    assert statuses == [200] * 100


def test_two_hundred_clients_during_a_fault_storm(gateway, workers):
    with ThreadPoolExecutor(max_workers=240) as pool:
        faults = [pool.submit(call_fault, gateway, *fault) for fault in FAULTS * 4]
        normal = [pool.submit(normal_call, gateway) for _ in range(200)]
        assert [f.result() for f in normal] == [200] * 200
        for fault in faults:
            fault.result()


def test_client_leaving_mid_stream_closes_the_upstream_within_2_s(gateway, fake_upstream, workers):
    response = requests.get(
        gateway.url + "/proxy/files/sse?events=400&interval=0.05",
        headers=AUTH,
        stream=True,
        timeout=10,
    )
    next(response.iter_content(chunk_size=None))
    seen = fake_upstream.last("/v1/files/sse")
    response.close()
    assert seen.closed.wait(2), "the upstream was still streaming 2 s after the client left"


def test_client_sending_its_body_too_slowly_gets_408(gateway, fake_upstream, workers):
    # bodyTimeoutMs is 2000 in the live config; this client sends 10 of 1000 bytes.
    before = len(fake_upstream.seen)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /proxy/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + CHAT_KEY.encode() + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'
        )
        started = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - started
        while chunk := sock.recv(65536):  # the gateway closes the connection after it
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert 1.5 < waited < 8
    assert len(fake_upstream.seen) == before
