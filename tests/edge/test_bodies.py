"""Bodies: limits, deadlines and chunk framing, envelope bounds, unsendable values, slow readers."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from ..support import AUTH, CANARIES, CHAT_KEY, RAPID_KEY, UPSTREAM, assert_error, envelope

RAPID = {"X-Api-Key": RAPID_KEY}


def _raw(gateway, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as bytes and return everything the gateway answered."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"Connection: close" not in answer:
                    head, _, body = answer.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer


def _head(target: str, key_header: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\n".encode()
        + key_header
        + b"\r\nContent-Type: application/json\r\n"
        + extra
    )


ENVELOPE_TARGET = "/proxy"
TRANSPARENT_TARGET = "/proxy/files/sink"


def _gen(total: int, piece: int = 1024 * 1024):
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        yield b" " * size
        sent += size


# --- request bodies, live ---------------------------------------------------------


@pytest.mark.parametrize("target", [ENVELOPE_TARGET, TRANSPARENT_TARGET])
def test_a_chunked_body_over_the_limit_gets_413_and_nothing_is_forwarded(
    live_gateway, fake_upstream, target
):
    before = len(fake_upstream.seen)
    # 10 MiB of spaces then a little more: valid JSON if it were cut at the limit.
    body = _gen(10 * 1024 * 1024 + 4096)
    try:
        response = requests.post(
            live_gateway.url + target,
            data=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=30,
        )
    except requests.exceptions.ConnectionError:
        response = None  # the gateway may answer and close before the upload ends
    if response is not None:
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "request_too_large"
    assert len(fake_upstream.seen) == before


def test_a_client_trickling_its_body_meets_a_deadline_for_the_whole_body(
    live_gateway, fake_upstream
):
    # bodyTimeoutMs is 2000 in the live config. One byte every 0.5 s would never trip
    # a timeout that restarts on every byte.
    before = len(fake_upstream.seen)
    with socket.create_connection(("127.0.0.1", live_gateway.port), timeout=15) as sock:
        sock.sendall(
            _head(TRANSPARENT_TARGET, b"Authorization: Bearer " + CHAT_KEY.encode())
            + b"Content-Length: 100\r\n\r\n"
        )
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while time.monotonic() - started < 12 and not answer:
            try:
                sock.send(b"x")
            except OSError:
                break
            time.sleep(0.5)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                pass
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert waited < 6
    assert len(fake_upstream.seen) == before


@pytest.mark.parametrize("target", [ENVELOPE_TARGET, TRANSPARENT_TARGET])
@pytest.mark.parametrize(
    "framing",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"2\r\n{}\r\n0\r\nAuthorization: Bearer x\r\n\r\n",
    ],
    ids=["0x-size", "plus-size", "missing-crlf", "authorization-trailer"],
)
def test_broken_chunk_framing_is_a_client_error(live_gateway, fake_upstream, target, framing):
    before = len(fake_upstream.seen)
    answer = _raw(
        live_gateway,
        _head(target, b"Authorization: Bearer " + CHAT_KEY.encode())
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + framing,
    )
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:300]
    assert b"internal_error" not in answer
    assert len(fake_upstream.seen) == before


def test_a_client_that_stops_reading_is_dropped_and_frees_the_upstream(live_gateway, fake_upstream):
    # writeTimeoutMs is 3000 in the live config.
    response = requests.get(
        live_gateway.url + "/proxy/files/big?bytes=500000000", headers=AUTH, stream=True, timeout=10
    )
    assert response.status_code == 200
    seen = fake_upstream.last("/v1/files/big")
    try:
        assert seen.closed.wait(20), "the upstream was still sending 20 s after the client stalled"
    finally:
        response.close()


# --- envelope bounds and values the wire cannot carry ----------------------------------


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"path": "/models", "query": {"a": [1] * 2_000_000}}, "query"),
        ({"path": "/models", "query": {f"q{i}": 1 for i in range(1001)}}, "query"),
        ({"path": "/models", "query": {"a" * 257: 1}}, "query"),
        ({"path": "/models", "query": {"a": "x" * 8193}}, "query"),
        ({"path": "/models", "query": {"a": ["x" * 8000] * 3}}, "query"),
        ({"path": "/models", "headers": {f"h{i}": "x" for i in range(400_000)}}, "headers"),
        ({"path": "/models", "headers": {"X-A": "x" * 8193}}, "headers"),
        ({"path": "/models", "query": {"a": "\ud800"}}, "query"),
        ({"path": "/models", "query": {"\udfff": "1"}}, "query"),
        ({"path": "/chat/completions", "method": "POST", "body": {"a": "\ud800"}}, "body"),
    ],
    ids=[
        "2M-list-items",
        "1001-params",
        "long-name",
        "long-value",
        "long-query",
        "400k-headers",
        "long-header",
        "surrogate-value",
        "surrogate-name",
        "surrogate-body",
    ],
)
def test_oversized_or_unsendable_envelopes_get_400_naming_the_field(
    client, mocked_upstream, envelope, field
):
    started = time.monotonic()
    response = client.post("/proxy", json=envelope, headers=AUTH)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"] == "invalid_envelope"
    assert field in response.get_json()["fields"]
    assert time.monotonic() - started < 5  # seconds of work before; now refused up front


@pytest.mark.parametrize(
    "value", ["\u0100", "a\u2028b", " leading", "trailing ", "\ud800", "a\x7fb", "a\x01b"]
)
def test_header_values_the_wire_cannot_carry_get_400_naming_the_header(
    client, mocked_upstream, value
):
    response = client.post(
        "/proxy", json={"path": "/models", "headers": {"X-Thing": value}}, headers=AUTH
    )
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "invalid_header" and "X-Thing" in body["message"]


@pytest.mark.parametrize("number", ["1e99999", "-1e99999", "1.5e400"])
def test_numbers_json_cannot_hold_are_refused(client, mocked_upstream, number):
    data = '{"path": "/chat/completions", "method": "POST", "body": {"n": ' + number + "}}"
    response = client.post("/proxy", data=data, content_type="application/json", headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_json"


def test_large_whole_numbers_pass_exactly(client, mocked_upstream):
    mocked_upstream.post(UPSTREAM + "/chat/completions", body="{}")
    data = '{"path": "/chat/completions", "method": "POST", "body": {"n": 1' + "0" * 400 + "}}"
    response = client.post("/proxy", data=data, content_type="application/json", headers=AUTH)
    assert response.status_code == 200
    assert mocked_upstream.calls[0].request.body == b'{"n":1' + b"0" * 400 + b"}"


# --- headers that change what the upstream does -------------------------------------


# --- bodies on GET, HEAD and OPTIONS ----------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_a_body_on_a_bodiless_method_is_refused_in_both_modes(client, mocked_upstream, method):
    envelope = client.post(
        "/proxy", json={"method": method, "path": "/models", "body": {"x": 1}}, headers=RAPID
    )
    assert envelope.status_code == 400 and envelope.get_json()["error"] == "body_not_allowed"
    transparent = client.open("/proxy/anything", method=method, data=b"x", headers=RAPID)
    assert transparent.status_code == 400


# --- path patterns and paths ------------------------------------------------------------


def test_envelope_over_the_limit_gets_413_and_nothing_forwarded(
    tmp_path, config_dict, mocked_upstream
):
    from gateway import create_app

    from ..support import write_config

    config_dict["maxRequestBytes"] = 2048
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
            "GATEWAY_ENVIRON": CANARIES,
        }
    )
    response = envelope(app.test_client(), {"path": "/chat/completions", "body": "x" * 4096})
    assert_error(response, 413, "request_too_large")
    assert len(mocked_upstream.calls) == 0
