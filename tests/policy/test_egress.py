"""The egress guard: an upstream that hands a secret back never gets it to the client."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from urllib.parse import parse_qsl, quote, quote_plus

import pytest
import requests

from gateway.policy.egress import (
    SecretInResponse,
    SecretScanner,
    guard_headers,
    guarded_variants,
    scan_body,
)

from ..support import AUTH, BROWSER_KEY, CANARIES, RAPID_KEY, UPSTREAM, assert_no_canary

# A pass phrase with what URL and JSON encoders rewrite: spaces, "+", "/", "=", non-ASCII.
PHRASE = "open sesame+42/x=y é€😀"
SECRETS = guarded_variants(
    ["Bearer sk-canary-openai-3f9a1c", "sk-canary-openai-3f9a1c", "a/b/c/d/e/f", PHRASE]
)
SECRET = b"sk-canary-openai-3f9a1c"


def _run(chunks, coding=None) -> tuple[bytes, bool]:
    sent, cut = b"", False
    try:
        for piece in scan_body(iter(chunks), SECRETS, coding):
            sent += piece
    except SecretInResponse:
        cut = True
    return sent, cut


# --- the scanner, Flask-free ----------------------------------------------------


@pytest.mark.parametrize("cut", range(1, len(SECRET)))
def test_a_secret_split_across_two_chunks_is_found_at_every_split(cut):
    sent, was_cut = _run([b"data: ok\n\n", b"data: " + SECRET[:cut], SECRET[cut:] + b"\n\n"])
    assert was_cut
    assert sent == b"data: ok\n\ndata: "  # nothing past the last safe byte


def test_a_secret_spread_over_one_byte_chunks_is_found():
    sent, was_cut = _run([bytes([b]) for b in b"xx" + SECRET + b"yy"])
    assert was_cut and sent == b"xx"


def test_text_that_only_starts_like_a_secret_is_released_whole():
    body = [b"data: sk-can", b"dy\n\n", b"data: Bear", b"er\n\n"]
    assert _run(body) == (b"".join(body), False)


def test_event_ends_are_never_held_back():
    stream = scan_body(iter([b"data: 1\n\n", b"data: 2\n\n"]), SECRETS, None)
    assert next(stream) == b"data: 1\n\n"  # passed on before the next chunk is read


@pytest.mark.parametrize(
    "encode",
    [
        gzip.compress,
        zlib.compress,
        lambda data: zlib.compress(data)[2:-4],  # raw deflate, as some servers send it
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
def test_encoded_bodies_are_scanned_and_passed_as_they_are(encode):
    coding = "gzip" if encode is gzip.compress else "deflate"
    clean = encode(b"hello " * 5000)
    pieces = [clean[i : i + 100] for i in range(0, len(clean), 100)]
    assert _run(pieces, coding) == (clean, False)
    dirty = encode(b"hello " * 5000 + SECRET)
    sent, was_cut = _run([dirty[i : i + 100] for i in range(0, len(dirty), 100)], coding)
    assert was_cut and len(sent) < len(dirty)
    if sent:
        assert SECRET not in zlib.decompressobj(47 if coding == "gzip" else 15).decompress(sent)


def test_a_secret_in_a_later_gzip_member_is_found():
    body = gzip.compress(b"clean " * 100) + gzip.compress(b"key=" + SECRET)
    assert gzip.decompress(body).endswith(SECRET)  # what a client would read
    assert _run([body[:40], body[40:]], "gzip")[1]


def test_a_gzip_bomb_is_scanned_in_bounded_memory():
    import tracemalloc

    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024) + SECRET, compresslevel=9)
    tracemalloc.start()
    sent, was_cut = _run([bomb[i : i + 65536] for i in range(0, len(bomb), 65536)], "gzip")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert was_cut
    assert peak < 20 * 1024 * 1024  # 200 MB decoded, never at once


def test_the_json_escaped_form_of_a_secret_is_found():
    assert _run([b'{"k": "a\\/b\\/c\\/d\\/e\\/f"}'])[1]


# --- the secret written back in another form -----------------------------------


def _percent(text: str, hexcase=str.upper) -> str:
    """Every byte of ``text`` as %XX."""
    return "".join(hexcase(f"%{byte:02x}") for byte in text.encode())


def _json_u(text: str, hexcase=str.upper) -> str:
    """Every character of ``text`` as a JSON \\uXXXX escape (a surrogate pair past U+FFFF)."""
    units = text.encode("utf-16-be")
    return "".join("\\u" + hexcase(units[i : i + 2].hex()) for i in range(0, len(units), 2))


def _mixed(text: str) -> str:
    """Character by character: as it is, %xx, \\uXXXX, %XX, \\uxxxx, in turn."""
    forms = [
        lambda c: c,
        lambda c: _percent(c, str.lower),
        _json_u,
        _percent,
        lambda c: _json_u(c, str.lower),
    ]
    return "".join(forms[i % len(forms)](char) for i, char in enumerate(text))


ENCODED = {
    "url quote_plus": quote_plus(PHRASE),  # "+" for a space, %2B %2F %3D
    "url quote_plus lower hex": quote_plus(PHRASE).replace("%2B", "%2b").replace("%2F", "%2f"),
    "url quote": quote(PHRASE, safe=""),  # %20 for a space
    "url every byte upper": _percent(PHRASE),
    "url every byte lower": _percent(PHRASE, str.lower),
    "json ensure_ascii": json.dumps(PHRASE)[1:-1],  # \\u00e9 \\u20ac \\ud83d\\ude00
    "json every char upper": _json_u(PHRASE),
    "json every char lower": _json_u(PHRASE, str.lower),
    "json some chars": "sk-canary-openai-3f9a1c".replace("-", "\\u002D").replace("s", "\\u0073"),
    "json slash escape": PHRASE.replace("/", "\\/"),
    "mixed per char": _mixed(PHRASE),
    "url inside json, %": quote(PHRASE, safe="").replace("%", "\\u0025"),
    "url inside json, +": quote_plus(PHRASE).replace("+", "\\u002B"),
    "url of a key": _percent("sk-canary-openai-3f9a1c", str.lower),
}
ENCODED_IDS = list(ENCODED)


@pytest.mark.parametrize("form", ENCODED_IDS)
def test_a_secret_in_another_form_is_found(form):
    encoded = ENCODED[form].encode()
    assert _run([b'{"next": "https://app.test/cb?token=' + encoded + b'"}']) == (b"", True)


@pytest.mark.parametrize("form", ENCODED_IDS)
def test_a_secret_in_another_form_is_found_split_at_every_offset(form):
    encoded = ENCODED[form].encode()
    for cut in range(1, len(encoded)):
        sent, was_cut = _run([b"data: ok\n\n", b"data: " + encoded[:cut], encoded[cut:] + b"\n\n"])
        assert was_cut, cut
        assert sent == b"data: ok\n\ndata: ", cut  # nothing of the secret was sent


@pytest.mark.parametrize("form", ["url quote_plus", "json every char lower", "mixed per char"])
def test_a_secret_in_another_form_is_found_in_one_byte_chunks_and_gzip(form):
    body = b"xx " + ENCODED[form].encode() + b" yy"
    sent, was_cut = _run([body[i : i + 1] for i in range(len(body))])
    assert was_cut and sent == b"xx "
    packed = gzip.compress(b"hello " * 5000 + body)
    assert _run([packed[i : i + 100] for i in range(0, len(packed), 100)], "gzip")[1]


@pytest.mark.parametrize("form", ["url quote", "url every byte lower", "json every char upper"])
def test_a_redirect_carrying_a_secret_in_another_form_is_dropped(form):
    location = "https://app.test/cb?state=1&token=" + ENCODED[form]
    kept, dropped = guard_headers([("Location", location), ("X-Ok", "1")], SECRETS)
    assert kept == [("X-Ok", "1")] and dropped == ["Location"]


def test_a_long_secret_is_found_split_anywhere_with_a_bounded_tail():
    secret = "k/" * 60  # longer than the start pattern spells out
    secrets = guarded_variants([secret])
    encoded = quote(secret, safe="").encode()
    for cut in range(1, len(encoded)):
        sent = b""
        with pytest.raises(SecretInResponse):
            for piece in scan_body(iter([b"x ", encoded[:cut], encoded[cut:]]), secrets, None):
                sent += piece
        assert sent == b"x ", cut
    scanner = SecretScanner(secrets)
    for _ in range(100):
        assert scanner.feed(encoded[:-1]) < secrets.longest  # the longest a secret can be written


def test_escapes_of_other_text_pass_whole_and_at_once():
    body = [
        b'data: {"q": "a%2Fb+c%3D\\u0041\\u00e9\\n\\/\\"", "open": "%6Fpen"}\n\n',
        b"data: open+sesame%2B42%2Fx%3D\n\n",  # the phrase's start, then not its end
        b"data: \\u006f\\u0070\\u0065\\u006e\n\n",
    ]
    stream = scan_body(iter(body), SECRETS, None)
    assert [next(stream) for _ in body] == body  # each event passed on before the next is read


def test_the_tail_held_back_is_only_what_could_begin_a_secret():
    stream = scan_body(iter([b"data: 1\n\nopen+ses", b"ame"]), SECRETS, None)
    assert next(stream) == b"data: 1\n\n"
    assert next(stream) == b"open+sesame"


def test_short_values_are_not_guarded():
    assert not guarded_variants(["1234567", "true"])


def test_headers_holding_a_secret_are_dropped_and_named():
    kept, dropped = guard_headers([("X-Echo", "Bearer " + SECRET.decode()), ("X-Ok", "1")], SECRETS)
    assert kept == [("X-Ok", "1")] and dropped == ["X-Echo"]


# --- the gateway, with a mocked upstream -----------------------------------------


def test_the_upstream_is_asked_only_for_codings_the_guard_reads(client, mocked_upstream):
    mocked_upstream.get(UPSTREAM + "/models", body="{}")
    client.get("/proxy/models", headers={**AUTH, "Accept-Encoding": "br, gzip;q=0.8, zstd"})
    assert mocked_upstream.calls[0].request.headers["Accept-Encoding"] == "gzip;q=0.8"


def test_with_the_guard_off_the_answer_passes(tmp_path, config_dict, mocked_upstream):
    from gateway import create_app

    from ..support import write_config

    config_dict["egressGuard"] = False
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
            "GATEWAY_ENVIRON": CANARIES,
        }
    )
    mocked_upstream.get(UPSTREAM + "/models", body=CANARIES["CANARY_OPENAI"])
    response = app.test_client().get("/proxy/models", headers=AUTH)
    assert response.status_code == 200  # the switch exists for measuring the guard's cost


# --- the real gateway, both modes ---------------------------------------------------

RAPID = {"X-Api-Key": RAPID_KEY}
RAPID_SECRET = CANARIES["CANARY_RAPID"]  # "canary-rapid/77d0e2": URL-encoded, "/" is %2F


def _call(gateway, mode: str, route: str, headers=AUTH, **kwargs):
    if mode == "envelope":
        path, _, query = route.partition("?")
        envelope = {"path": path, "query": dict(parse_qsl(query))}
        return requests.post(
            gateway.url + "/proxy", json=envelope, headers=headers, timeout=10, **kwargs
        )
    return requests.get(gateway.url + "/proxy" + route, headers=headers, timeout=10, **kwargs)


MODES = ["envelope", "transparent"]


@pytest.mark.parametrize("mode", MODES)
def test_a_reflected_secret_header_is_dropped_and_never_exposed(live_gateway, page_origin, mode):
    origin_headers = {"Authorization": f"Bearer {BROWSER_KEY}", "Origin": page_origin}
    response = _call(live_gateway, mode, "/files/leak-header", headers=origin_headers)
    assert response.status_code == 200
    assert "X-Echo-Authorization" not in response.headers
    assert response.headers["X-Safe"] == "1"
    assert "X-Echo-Authorization" not in response.headers.get("Access-Control-Expose-Headers", "")
    assert_no_canary(str(response.headers).encode() + response.content)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("route", "headers"),
    [
        ("/files/leak-body", AUTH),
        ("/files/leak-gzip", AUTH),
        ("/anything/leak-json-escaped", RAPID),
    ],
    ids=["plain", "gzip", "json-escaped"],
)
def test_a_secret_in_the_first_bytes_gets_502_and_nothing_of_the_body(
    live_gateway, mode, route, headers
):
    response = _call(live_gateway, mode, route, headers=headers)
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "secret_in_response"
    assert "X-Fake-Upstream" not in response.headers
    assert_no_canary(response.content)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["url", "url-lower", "json-u"])
def test_a_secret_written_back_in_another_form_gets_502_and_nothing_of_it(live_gateway, mode, form):
    response = _call(live_gateway, mode, f"/anything/leak-encoded?form={form}", headers=RAPID)
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "secret_in_response"
    for encoded in (quote(RAPID_SECRET, safe=""), "canary", "\\u0063", "\\u0072"):
        assert encoded.lower() not in response.text.lower()
    assert_no_canary(response.content)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("at", [1, 12])
def test_a_secret_split_mid_stream_cuts_the_stream_before_it(live_gateway, mode, at):
    response = _call(live_gateway, mode, f"/files/leak-split?at={at}", stream=True)
    assert response.status_code == 200
    received = b""
    with pytest.raises(requests.exceptions.RequestException):
        for piece in response.iter_content(chunk_size=None):
            received += piece
    assert received == b"data: one\n\ndata: two\n\ndata: leaked "


@pytest.mark.parametrize("mode", MODES)
def test_a_secret_late_in_a_large_body_cuts_it(live_gateway, mode):
    response = _call(live_gateway, mode, "/files/leak-late", stream=True)
    assert response.status_code == 200
    received = b""
    with pytest.raises(requests.exceptions.RequestException):
        for piece in response.iter_content(chunk_size=None):
            received += piece
        if response.raw.tell() < int(response.headers["Content-Length"]):
            raise requests.exceptions.ChunkedEncodingError("short body")
    assert_no_canary(received)


def test_a_coding_the_guard_cannot_read_is_refused(live_gateway):
    response = _call(live_gateway, "transparent", "/files/leak-gzip?coding=br")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_error"


def test_every_block_is_logged_without_the_value(live_gateway):
    _call(live_gateway, "transparent", "/files/leak-header")
    _call(live_gateway, "transparent", "/files/leak-body")
    log = live_gateway.log_text()
    assert "egress guard: a secret in the response header X-Echo-Authorization" in log
    assert "egress guard: a secret in the response body (before it was sent)" in log
    assert_no_canary(log)


def test_the_relay_that_checks_every_live_answer_catches_a_split_secret():
    import socket
    import threading

    from ..live_gateway import CanaryRelay

    secret = CANARIES["CANARY_OPENAI"].encode()
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + secret[:5])
        time.sleep(0.1)
        conn.sendall(secret[5:])
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    relay = CanaryRelay(server.getsockname()[1], [secret])
    with socket.create_connection(("127.0.0.1", relay.port)) as sock:
        while sock.recv(65536):
            pass
    relay.close()
    server.close()
    assert relay.leaks == [secret.decode()]
