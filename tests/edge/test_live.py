"""The real app under gunicorn against a real upstream: what a mock cannot show."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import requests

from ..deploy_support import read_lockstep
from ..fake_upstream import GZIP_TEXT, PATTERN
from ..support import (
    AUTH,
    CANARIES,
    CHAT_KEY,
    DOCS_KEY,
    assert_no_canary,
)


def test_envelope_adds_the_secret_and_never_forwards_the_client_key(live_gateway, fake_upstream):
    response = requests.post(
        live_gateway.url + "/proxy",
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


def test_transparent_mode_forwards_body_and_query_and_strips_keys(live_gateway, fake_upstream):
    from ..support import RAPID_KEY

    body = bytes(range(256)) * 10
    response = requests.put(
        live_gateway.url + "/proxy/a/b/echo?x=1&y=%20z",
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
def test_sse_events_arrive_one_by_one_before_the_upstream_finishes(
    live_gateway, fake_upstream, mode
):
    # The upstream sends event i+1 only after the test has received event i, so a
    # gateway that buffered the stream would deadlock here instead of passing.
    if mode == "envelope":
        response = requests.post(
            live_gateway.url + "/proxy",
            json={"path": "/files/sse-lockstep", "query": {"events": 4}},
            headers=AUTH,
            stream=True,
            timeout=15,
        )
    else:
        response = requests.get(
            live_gateway.url + "/proxy/files/sse-lockstep?events=4",
            headers=AUTH,
            stream=True,
            timeout=15,
        )
    assert response.headers["Content-Type"] == "text/event-stream"
    received = read_lockstep(response, fake_upstream)
    assert received == [b"data: 0", b"data: 1", b"data: 2", b"data: 3"]


def test_gzip_bodies_pass_intact_with_matching_headers(live_gateway):
    response = requests.get(
        live_gateway.url + "/proxy/files/gzip", headers=AUTH, stream=True, timeout=10
    )
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(raw)
    import gzip

    assert gzip.decompress(raw) == GZIP_TEXT


def test_client_that_does_not_accept_gzip_gets_identity(live_gateway):
    response = requests.get(
        live_gateway.url + "/proxy/files/gzip",
        headers={**AUTH, "Accept-Encoding": "identity"},
        timeout=10,
    )
    assert "Content-Encoding" not in response.headers
    assert response.content == GZIP_TEXT


def test_50_mb_body_streams_with_bounded_memory(live_gateway):
    size = 50 * 1024 * 1024
    baseline = live_gateway.rss()
    peak = baseline
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, live_gateway.rss())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = requests.get(
            live_gateway.url + f"/proxy/files/big?bytes={size}",
            headers=AUTH,
            stream=True,
            timeout=30,
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


def test_upstream_error_statuses_pass_through(live_gateway):
    response = requests.get(live_gateway.url + "/proxy/files/status/503", headers=AUTH, timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json() == {"status": 503}


def test_the_docs_example_envelope_is_forwarded_from_the_gateways_own_origin(
    live_gateway, fake_upstream
):
    from gateway.edge.openapi import ENVELOPE_EXAMPLE

    response = requests.post(
        live_gateway.url + "/proxy",
        json=ENVELOPE_EXAMPLE,
        headers={"Authorization": f"Bearer {DOCS_KEY}", "Origin": live_gateway.url},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == live_gateway.url
    seen = fake_upstream.last("/v1/chat/completions")
    assert json.loads(seen.body) == ENVELOPE_EXAMPLE["body"]
