"""The real app under gunicorn against a real upstream: what a mock cannot show."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import pytest
import requests

from gateway.policy.keys import key_item

from ..deploy_support import read_lockstep
from ..fake_upstream import GZIP_TEXT, PATTERN
from ..live_gateway import LiveGateway
from ..support import (
    AUTH,
    CANARIES,
    CHAT_KEY,
    DEAD_KEY,
    DOCS_KEY,
    EARLY_KEY,
    EXPIRED_KEY,
    NAMED_KEY,
    NEXT_KEY,
    SLOW_KEY,
    assert_no_canary,
    base_config,
    write_config,
)


def test_envelope_adds_the_secret_and_never_forwards_the_client_key(gateway, fake_upstream):
    response = requests.post(
        gateway.url + "/proxy",
        json={
            "method": "POST",
            "path": "/chat/completions",
            "body": {"q": 1},
            "headers": {"X-Custom": "yes", "Authorization": "Bearer stolen"},
        },
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-openai"
    seen = fake_upstream.last("/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert seen.headers["x-api-key"] == CANARIES["CANARY_ANTHROPIC"]
    assert seen.headers["X-Custom"] == "yes"
    assert CHAT_KEY not in str(seen.headers) + seen.body.decode()
    assert seen.body == b'{"q":1}'
    assert_no_canary(response.content + str(response.headers).encode())


def test_transparent_mode_forwards_body_and_query_and_strips_keys(gateway, fake_upstream):
    from ..support import RAPID_KEY

    body = bytes(range(256)) * 10
    response = requests.put(
        gateway.url + "/proxy/a/b/echo?x=1&y=%20z",
        data=body,
        headers={"X-Api-Key": RAPID_KEY, "Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["path"] == "/v1/a/b/echo"
    assert echoed["query"] == "x=1&y=%20z"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    seen = fake_upstream.last("/v1/a/b/echo")
    assert seen.headers["X-RapidAPI-Key"] == CANARIES["CANARY_RAPID"]
    assert seen.headers["Content-Type"] == "application/octet-stream"
    lower = {k.lower() for k in seen.headers}
    assert "x-api-key" not in lower and "authorization" not in lower
    assert response.headers["X-RateLimit-Remaining"] == "41"
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("mode", ["envelope", "transparent"])
def test_sse_events_arrive_one_by_one_before_the_upstream_finishes(gateway, fake_upstream, mode):
    # The upstream sends event i+1 only after the test has received event i, so a
    # gateway that buffered the stream would deadlock here instead of passing.
    if mode == "envelope":
        response = requests.post(
            gateway.url + "/proxy",
            json={"path": "/files/sse-lockstep", "query": {"events": 4}},
            headers=AUTH,
            stream=True,
            timeout=15,
        )
    else:
        response = requests.get(
            gateway.url + "/proxy/files/sse-lockstep?events=4",
            headers=AUTH,
            stream=True,
            timeout=15,
        )
    assert response.headers["Content-Type"] == "text/event-stream"
    received = read_lockstep(response, fake_upstream)
    assert received == [b"data: 0", b"data: 1", b"data: 2", b"data: 3"]


@pytest.mark.parametrize(
    ("key", "path", "status", "code"),
    [
        (SLOW_KEY, "/proxy/slow?delay=3", 504, "upstream_timeout"),
        (DEAD_KEY, "/proxy/anything", 502, "upstream_unreachable"),
    ],
)
def test_upstream_timeouts_and_closed_ports(gateway, key, path, status, code):
    response = requests.get(
        gateway.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == status
    assert response.json()["error"] == code


def test_gzip_bodies_pass_intact_with_matching_headers(gateway):
    response = requests.get(
        gateway.url + "/proxy/files/gzip", headers=AUTH, stream=True, timeout=10
    )
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(raw)
    import gzip

    assert gzip.decompress(raw) == GZIP_TEXT


def test_client_that_does_not_accept_gzip_gets_identity(gateway):
    response = requests.get(
        gateway.url + "/proxy/files/gzip",
        headers={**AUTH, "Accept-Encoding": "identity"},
        timeout=10,
    )
    assert "Content-Encoding" not in response.headers
    assert response.content == GZIP_TEXT


def test_50_mb_body_streams_with_bounded_memory(gateway):
    size = 50 * 1024 * 1024
    baseline = gateway.rss()
    peak = baseline
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gateway.rss())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = requests.get(
            gateway.url + f"/proxy/files/big?bytes={size}", headers=AUTH, stream=True, timeout=30
        )
        digest, count = hashlib.sha256(), 0
        for chunk in response.iter_content(chunk_size=256 * 1024):
            digest.update(chunk)
            count += len(chunk)
    finally:
        done.set()
        watcher.join()
    assert count == size
    expected = hashlib.sha256(PATTERN * (size // len(PATTERN))).hexdigest()
    assert digest.hexdigest() == expected
    growth = (peak - baseline) / 1024 / 1024
    assert growth < 20, f"gateway RSS grew by {growth:.1f} MB for a 50 MB body"


def test_upstream_error_statuses_pass_through(gateway):
    response = requests.get(gateway.url + "/proxy/files/status/503", headers=AUTH, timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json() == {"status": 503}


def test_invalid_config_refuses_to_start(tmp_path):
    raw = base_config()
    raw["clients"][CHAT_KEY]["allowedPaths"] = []
    raw["secrets"]["extra"] = "${NOT_SET_FOR_THIS_TEST}"
    live = LiveGateway(write_config(tmp_path / "bad.yaml", raw), CANARIES, tmp_path / "log")
    with pytest.raises(RuntimeError, match="gunicorn exited early"):
        live.start()
    live.stop()
    assert live.process.returncode == 1
    log = live.log_text()
    assert 'allowedPaths: must not be empty; write ["/**"]' in log
    assert "environment variable NOT_SET_FOR_THIS_TEST is not set" in log
    assert "Traceback" not in log
    assert_no_canary(log)


@pytest.mark.parametrize("key", [NAMED_KEY, NEXT_KEY])
def test_a_hashed_key_opens_its_named_client_and_the_secret_arrives(gateway, fake_upstream, key):
    response = requests.post(
        gateway.url + "/proxy/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    seen = fake_upstream.last("/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert key not in str(seen.headers) + seen.body.decode()


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (EXPIRED_KEY, "expired_client_key"),
        (EARLY_KEY, "invalid_client_key"),
        (key_item(NAMED_KEY), "invalid_client_key"),
        (key_item(NAMED_KEY)[7:], "invalid_client_key"),
    ],
)
def test_expired_early_and_hash_keys_get_401_under_gunicorn(gateway, fake_upstream, key, code):
    before = len(fake_upstream.seen)
    response = requests.post(
        gateway.url + "/proxy/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error"] == code
    assert len(fake_upstream.seen) == before
    if code == "expired_client_key":
        deadline = time.monotonic() + 5
        while "chat-app: a client key that expired at" not in gateway.log_text():
            assert time.monotonic() < deadline, "the expired key's use was not logged"
            time.sleep(0.05)


def test_the_docs_example_envelope_is_forwarded_from_the_gateways_own_origin(
    gateway, fake_upstream
):
    from gateway.edge.openapi import ENVELOPE_EXAMPLE

    response = requests.post(
        gateway.url + "/proxy",
        json=ENVELOPE_EXAMPLE,
        headers={"Authorization": f"Bearer {DOCS_KEY}", "Origin": gateway.url},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == gateway.url
    seen = fake_upstream.last("/v1/chat/completions")
    assert json.loads(seen.body) == ENVELOPE_EXAMPLE["body"]


@pytest.mark.parametrize(
    "line",
    [
        f"Bearer {CHAT_KEY}",  # no colon: gunicorn names the whole line in its warning
        f": Bearer {CHAT_KEY}",
        f"Authori zation: Bearer {CHAT_KEY}",
    ],
)
def test_a_malformed_header_line_never_puts_a_key_in_the_log(gateway, line):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"GET /proxy/models HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")
    marker = f"marker-{time.monotonic_ns()}"
    requests.get(f"{gateway.url}/health", headers={"X-Request-ID": marker}, timeout=10)
    deadline = time.monotonic() + 5
    while marker not in gateway.log_text():  # the log is written up to our marker
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Invalid request from ip=127.0.0.1" in gateway.log_text()
    assert CHAT_KEY not in gateway.log_text()
