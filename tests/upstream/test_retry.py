"""Stale pooled connections: a call that is safe to send again goes again, once, on a new one."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import requests

from gateway.config.load import parse_config
from gateway.errors import GatewayError
from gateway.policy.access import Client
from gateway.upstream.client import Call, Upstream, body_chunks
from gateway.upstream.pool import ResendTimeout
from gateway.upstream.retry import may_resend

from ..fake_upstream import FakeUpstream
from ..live_gateway import LiveGateway
from ..support import CANARIES, RAPID_KEY, base_config, write_config

RETRIED = "retried on a new connection"


@pytest.mark.parametrize(
    ("method", "headers", "reused", "written", "expected"),
    [
        ("GET", {}, True, True, True),
        ("head", {}, True, True, True),
        ("OPTIONS", {}, True, True, True),
        ("PUT", {}, True, True, True),
        ("DELETE", {}, True, True, True),
        ("POST", {}, True, True, False),
        ("PATCH", {}, True, True, False),
        ("POST", {"Idempotency-Key": "order-1"}, True, True, True),
        ("PATCH", {"idempotency-key": "order-1"}, True, True, True),
        ("POST", {"Idempotency-Key": " "}, True, True, False),
        ("POST", {"X-Idempotency-Key": "order-1"}, True, True, False),
        ("POST", {}, True, False, True),  # the request never went out whole
        ("GET", {}, False, True, False),  # a new connection closing is the upstream failing
        ("POST", {}, False, False, False),
    ],
)
def test_resend_rule(method, headers, reused, written, expected):
    assert may_resend(method, headers, reused=reused, written=written) is expected


# --- the Upstream alone, against a real local upstream ---------------------------


def _client(url: str, **spec) -> Client:
    config = base_config(url + "/v1")
    config["clients"][RAPID_KEY].update(spec)
    client, _ = parse_config(config, CANARIES).client_for(RAPID_KEY, datetime.now(UTC))
    assert client is not None
    return client


def _send(upstream: Upstream, client: Client, method: str, path: str, query: str = "") -> str:
    """Send one call with a fresh id, read its whole body; return the id."""
    request_id = uuid.uuid4().hex
    call = Call(client, method, path, query, {"X-Test-Id": request_id}, None)
    response = upstream.send(call)
    b"".join(body_chunks(response, client))
    return request_id


def _arrivals(fake: FakeUpstream, request_id: str) -> list[int]:
    """Return, per arrival of the call at the upstream, its place on its connection."""
    return [s.on_connection for s in fake.seen if s.headers.get("X-Test-Id") == request_id]


def _failing(upstream: Upstream, client: Client, method: str, path: str, query: str):
    request_id = uuid.uuid4().hex
    call = Call(client, method, path, query, {"X-Test-Id": request_id}, None)
    with pytest.raises(GatewayError) as info:
        upstream.send(call)
    return info.value.code, request_id


def test_a_connection_idle_past_the_bound_is_not_reused(fake_upstream):
    upstream = Upstream(pool_size=4, idle_bound=0.3)
    client = _client(fake_upstream.url)
    first = _send(upstream, client, "GET", "/echo")
    at_once = _send(upstream, client, "GET", "/echo")
    time.sleep(0.6)
    after_idle = _send(upstream, client, "GET", "/echo")
    arrivals = [_arrivals(fake_upstream, i) for i in (first, at_once, after_idle)]
    assert arrivals == [[1], [2], [1]]


def test_a_get_closed_unanswered_goes_once_more_within_the_read_timeout(fake_upstream, caplog):
    # The upstream reads the GET, holds it 1.2 s and closes; the call's read timeout is 2 s.
    caplog.set_level(logging.INFO, logger="gateway")
    upstream = Upstream(pool_size=4, idle_bound=4.0)
    client = _client(fake_upstream.url)
    _send(upstream, client, "GET", "/echo")
    started = time.monotonic()
    code, request_id = _failing(upstream, client, "GET", "/silence", "delay=1.2")
    waited = time.monotonic() - started
    assert code == "upstream_timeout"
    # Sent on the reused connection, then once on a new one, which timed out when the
    # 2 s were up: a second full read timeout would end at 3.2 s.
    assert _arrivals(fake_upstream, request_id) == [2, 1]
    assert 1.8 < waited < 3.0
    assert sum(RETRIED in r.getMessage() for r in caplog.records) == 1
    assert any("timed out (retried)" in r.getMessage() for r in caplog.records)


def test_a_resend_never_takes_a_pooled_connection(fake_upstream):
    # Under gevent the pool's top is the slot the failed call just freed; with threads,
    # another call may have put a live, maybe stale, connection there in between.
    upstream = Upstream(pool_size=4, idle_bound=4.0)
    client = _client(fake_upstream.url)
    _send(upstream, client, "GET", "/echo")  # a live connection waits in the pool
    request_id = uuid.uuid4().hex
    prepared = requests.Request(
        "GET", fake_upstream.url + "/v1/echo", headers={"X-Test-Id": request_id}
    ).prepare()
    adapter = upstream.session.get_adapter(prepared.url)
    response = adapter.send(prepared, timeout=ResendTimeout(5, 5, 5))
    assert response.status_code == 200
    assert _arrivals(fake_upstream, request_id) == [1]
    assert _send(upstream, client, "GET", "/echo")  # the pool still works after it


def test_a_resent_answer_may_wait_the_full_read_timeout_between_bytes(fake_upstream):
    # Read timeout 3 s; the reused connection is dropped after 1.8 s, so the resend
    # waits at most 1.2 s for its head. Its body then comes 1.6 s after the head:
    # within the read timeout, which a long stream relies on.
    upstream = Upstream(pool_size=4, idle_bound=4.0)
    client = _client(fake_upstream.url, timeoutMs=3000)
    _send(upstream, client, "GET", "/echo")
    call = Call(client, "GET", "/stale-drip", "delay=1.8&pieces=2&gap=1.6", {}, None)
    response = upstream.send(call)
    assert b"".join(body_chunks(response, client)) == b"data: 0\n\ndata: 1\n\n"


def test_no_resend_once_the_answer_began(fake_upstream):
    upstream = Upstream(pool_size=4, idle_bound=4.0)
    client = _client(fake_upstream.url)
    _send(upstream, client, "GET", "/echo")
    code, request_id = _failing(upstream, client, "GET", "/reset-mid-status", "")
    assert code == "upstream_error"
    assert _arrivals(fake_upstream, request_id) == [2]


def test_a_resend_to_an_upstream_gone_down_is_a_fast_unreachable(caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    server = FakeUpstream().start()
    upstream = Upstream(pool_size=4, idle_bound=4.0)
    client = _client(server.url, connectTimeoutMs=1000)
    _send(upstream, client, "GET", "/echo")
    # The kept-alive connection still answers; new connections are refused.
    server.stop()
    started = time.monotonic()
    code, request_id = _failing(upstream, client, "GET", "/silence", "delay=0")
    assert code == "upstream_unreachable"
    assert time.monotonic() - started < 1
    assert _arrivals(server, request_id) == [2]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(RETRIED in m for m in messages) == 1
    assert any("unreachable (retried)" in m for m in messages)


# --- live, under gunicorn with two workers ----------------------------------------

RETRY_KEY = "ck-test-retry-0123456789"
EVERYTHING = {"Authorization": f"Bearer {RETRY_KEY}"}  # every method and path, 30 s timeout


@pytest.fixture(scope="module")
def retry_gateway(fake_upstream, tmp_path_factory):
    """The real app under gunicorn, with the default read timeout: a loaded machine is no fault."""
    folder = tmp_path_factory.mktemp("retry-gateway")
    config = {
        "targets": {"api": {"baseUrl": fake_upstream.url + "/v1"}},
        "clients": {RETRY_KEY: {"target": "api", "allowedMethods": ["*"], "allowedPaths": ["/**"]}},
    }
    live = LiveGateway(
        write_config(folder / "config.yaml", config), {}, folder / "gunicorn.log", workers=2
    ).start()
    yield live
    live.stop()


@pytest.mark.parametrize(
    ("method", "headers", "times_seen"),
    [
        ("POST", {}, 1),
        ("POST", {"Idempotency-Key": "charge-1"}, 2),
        ("GET", {}, 2),
        ("PUT", {}, 2),
    ],
)
def test_an_upstream_that_reads_the_call_and_dies(
    retry_gateway, fake_upstream, method, headers, times_seen
):
    # One client connection, so one worker, whose pool keeps the warm-up's connection.
    with requests.Session() as session:
        warm = session.get(retry_gateway.url + "/proxy/echo", headers=EVERYTHING, timeout=10)
        assert warm.status_code == 200
        request_id = uuid.uuid4().hex
        response = session.request(
            method,
            retry_gateway.url + "/proxy/silence?delay=0",
            headers={**EVERYTHING, **headers, "X-Test-Id": request_id},
            data=None if method == "GET" else b'{"charge": 1}',
            timeout=10,
        )
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_error"
    arrivals = _arrivals(fake_upstream, request_id)
    # The call went out on the reused connection; only a call safe to repeat went
    # again, once, on a new connection (which the upstream also dropped).
    assert arrivals == [arrivals[0], 1][:times_seen]
    assert arrivals[0] > 1


def _calls(gateway: LiveGateway, count: int, method_headers: list[tuple[str, dict]], linger: float):
    """One client with its own keep-alive connection; return (id, method, status) per call."""
    results = []
    with requests.Session() as session:
        for i in range(count):
            method, headers = method_headers[i % len(method_headers)]
            request_id = uuid.uuid4().hex
            response = session.request(
                method,
                f"{gateway.url}/proxy/rude?linger={linger}",
                headers={**EVERYTHING, **headers, "X-Test-Id": request_id},
                data=None if method == "GET" else b'{"n": %d}' % i,
                timeout=20,
            )
            results.append((request_id, method, response.status_code))
    return results


@pytest.mark.slow
def test_32_clients_mixed_calls_to_an_upstream_closing_every_connection(
    retry_gateway, fake_upstream
):
    # The upstream closes each connection up to 5 ms after answering: a reuse in
    # that window writes a call the upstream never reads, and it answers with a reset.
    retried_before = retry_gateway.log_text().count(RETRIED)
    mixed = [("GET", {}), ("PUT", {}), ("POST", {"Idempotency-Key": "k"})]
    with ThreadPoolExecutor(max_workers=32) as pool:
        runs = pool.map(lambda _: _calls(retry_gateway, 40, mixed, 0.005), range(32))
        results = [result for run in runs for result in run]
    assert len(results) == 32 * 40
    assert [r for r in results if r[2] != 200] == []
    seen = Counter(s.headers.get("X-Test-Id") for s in fake_upstream.seen)
    # This upstream never reads a call it does not answer: nothing may arrive twice.
    assert {seen[request_id] for request_id, _, _ in results} == {1}
    retried = retry_gateway.log_text().count(RETRIED) - retried_before
    assert retried > 0, "no connection went stale: the test proved nothing"


@pytest.mark.slow
def test_posts_without_a_key_to_an_upstream_closing_every_connection(retry_gateway, fake_upstream):
    # Closed at once after each answer: the dead-connection check catches almost every
    # closed connection before reuse; the rest fail (502) and are never sent twice.
    with ThreadPoolExecutor(max_workers=32) as pool:
        runs = pool.map(lambda _: _calls(retry_gateway, 20, [("POST", {})], 0), range(32))
        results = [result for run in runs for result in run]
    statuses = Counter(status for _, _, status in results)
    assert set(statuses) <= {200, 502}
    assert statuses[200] >= 0.8 * len(results), statuses
    seen = Counter(s.headers.get("X-Test-Id") for s in fake_upstream.seen)
    assert max(seen[request_id] for request_id, _, _ in results) == 1
