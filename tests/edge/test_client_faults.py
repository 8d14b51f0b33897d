"""Client faults against the real app under gunicorn: leaving mid-stream, a slow body."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from ..support import AUTH, CHAT_KEY

pytestmark = pytest.mark.slow


def test_client_leaving_mid_stream_closes_the_upstream_within_2_s(
    live_gateway, fake_upstream, live_workers
):
    response = requests.get(
        live_gateway.url + "/proxy/files/sse?events=400&interval=0.05",
        headers=AUTH,
        stream=True,
        timeout=10,
    )
    next(response.iter_content(chunk_size=None))
    seen = fake_upstream.last("/v1/files/sse")
    response.close()
    assert seen.closed.wait(2), "the upstream was still streaming 2 s after the client left"


def test_client_sending_its_body_too_slowly_gets_408(live_gateway, fake_upstream, live_workers):
    # bodyTimeoutMs is 2000 in the live config; this client sends 10 of 1000 bytes.
    before = len(fake_upstream.seen)
    with socket.create_connection(("127.0.0.1", live_gateway.port), timeout=10) as sock:
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
