"""Hostile input at the real gateway: generated envelopes and transparent requests, and a
path attack corpus in both modes. Nothing may reach the upstream outside the allowlist."""

from __future__ import annotations

import http.client
import json
from urllib.parse import unquote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import CODES, read_error
from gateway.policy.access import PathPattern

from ..support import AUTH, CANARIES, CHAT_KEY, base_config

pytestmark = pytest.mark.slow

ALLOWED_METHODS = {"GET", "POST"}
ALLOWED = [PathPattern.compile(p) for p in base_config()["clients"][CHAT_KEY]["allowedPaths"]]

PLAIN = ["chat", "completions", "models", "files", "gpt-4o", "a", "x", "v1", "admin", ""]
HOSTILE = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "%252e",
    "%25",
    "%c0%ae",
    "%e2%80%a4",
    "\u2024\u2024",
    "\uff0f",
    "@",
    "evil.example",
    "\\",
    "%00",
    "\x00",
    "?x=1",
    "#f",
    ";",
    "..;",
    "%",
    "%zz",
    "a b",
    "\r\n",
    "http:",
    "~",
    "%7e",
]
SEGMENTS = st.one_of(st.sampled_from(PLAIN + HOSTILE), st.text(max_size=6))
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.lists(SEGMENTS, max_size=6).map(lambda parts: "/".join(parts)),
    st.text(max_size=30),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "X-Custom",
            "Authorization",
            "Host",
            "Cookie",
            "Connection",
            "Transfer-Encoding",
            "Content-Length",
            "X-Api-Key",
            "x-rapidapi-key",
            "Proxy-Authorization",
            "TE",
            "Bad Name",
            "X\r\nInjected",
            "",
            "X-\x00",
        ]
    ),
    st.text(max_size=12),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(["1", "close, X-Custom", "a\r\nHost: evil", "\x00", "Bearer " + CHAT_KEY]),
    st.text(max_size=12),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
METHODS = st.one_of(
    st.sampled_from(["GET", "post", "PUT", "DELETE", "TRACE", "CONNECT", ""]),
    st.text(max_size=5),
    st.integers(),
)
ENVELOPES = st.one_of(
    st.fixed_dictionaries(
        {"path": PATHS},
        optional={
            "method": METHODS,
            "query": st.dictionaries(st.text(max_size=5), JSON, max_size=3),
            "headers": st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4),
            "body": JSON,
            "bogus": JSON,
        },
    ),
    JSON,
)


def within_policy(method: str, path: str) -> bool:
    """Return whether an upstream request is one the fuzzed client was allowed to make."""
    if not path.startswith("/v1/") or method not in ALLOWED_METHODS:
        return False
    path = path[3:]
    decoded = unquote(path)
    if any(segment in (".", "..") for segment in decoded.split("/")) or "//" in decoded:
        return False
    return any(pattern.matches(path) for pattern in ALLOWED)


def check_answer(status: int, headers, body: bytes) -> None:
    assert status != 500 and status < 600, body[:300]
    text = body.decode("latin-1") + str(dict(headers))
    for value in CANARIES.values():
        assert value not in text
    if headers.get("X-Fake-Upstream") is None:  # the gateway's own answer
        assert status in (400, 401, 403, 404, 405, 408, 413, 414, 431, 501), (status, body[:300])
        payload = json.loads(body)
        # One of the three shapes (flat, or OpenAI's or Anthropic's for a transparent
        # call to their APIs): a known code, a message, the request id.
        code, message = read_error(payload)
        assert code in CODES and message, payload
        assert payload["request_id"] == headers["X-Gateway-Request-Id"]
        if not isinstance(payload["error"], dict):
            assert set(payload) - {"fields"} == {"error", "message", "request_id"}


@pytest.fixture
def upstream_audit(fake_upstream):
    """After the test, every request the upstream saw must be inside the policy."""
    before = len(fake_upstream.seen)
    yield
    outside = [
        (s.method, s.path)
        for s in fake_upstream.seen[before:]
        if not within_policy(s.method, s.path)
    ]
    assert outside == []


def test_generated_envelopes_stay_in_the_allowlist(live_gateway, upstream_audit):
    session = requests.Session()

    @given(envelope=ENVELOPES)
    @settings(
        max_examples=6000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def send(envelope):
        response = session.post(
            live_gateway.url + "/proxy",
            data=json.dumps(envelope),
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=20,
        )
        check_answer(response.status_code, response.headers, response.content)

    send()


def raw_request(gateway, method: str, target: str, headers: dict, body: bytes | None = None):
    """Send ``target`` exactly as written (no client-side normalization); None if unsendable."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    try:
        connection.request(method, target, body=body, headers=headers)
    except (http.client.InvalidURL, ValueError, UnicodeEncodeError):
        return None
    response = connection.getresponse()
    result = response.status, response.headers, response.read()
    connection.close()
    return result


def test_generated_transparent_requests_stay_in_the_allowlist(live_gateway, upstream_audit):
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]),
        path=PATHS,
        headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3),
        body=st.binary(max_size=64),
    )
    @settings(
        max_examples=6000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def send(method, path, headers, body):
        try:
            answer = raw_request(
                live_gateway, method, "/proxy/" + path.lstrip("/"), {**headers, **AUTH}, body
            )
        except http.client.HTTPException:
            return  # the gateway's server refused the request line or headers outright
        if answer is not None and method != "HEAD":
            check_answer(*answer)

    send()


# --- the path attack corpus: both modes ---------------------------------------------------

CORE = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%25%32%65",
    "%c0%ae%c0%ae",
    "%e0%80%ae%e0%80%ae",
    "%e2%80%a4%e2%80%a4",
    "\u2024\u2024",
    "..%2f",
    "..%2F",
    "..%5c",
    "..\\",
    "..;",
    "%2e%2e;",
    ".",
    "%2e",
    "%00",
    "%0d%0a",
    "\x00",
    "..%00",
    "%ef%bc%8f",
    "\uff0f",
    "%u002e%u002e",
    "....//",
    "..././",
    "%%32%65%%32%65",
    "%c0%af",
]
FORMS = ["/files/{}/admin", "/files/{}", "/models/{}/x", "/{}/files/x"]
SPECIAL = [
    "//evil.example/files/x",
    "/files//x",
    "/@evil.example/files",
    "/files/x@evil.example",
    "http://evil.example/files",
    "/files/" + "a/" * 3000,
    "/files/%2Fevil",
    "/files\\..\\admin",
    "/files/a b",
    "/files/%20/..",
    "/\\evil.example/files",
    "/files/?/../admin",
    "/files/#/../admin",
    "/%2e%2e/%2e%2e/etc/passwd",
]
CORPUS = [form.format(core) for core in CORE for form in FORMS] + SPECIAL


@pytest.mark.parametrize("mode", ["envelope", "transparent"])
def test_path_attack_corpus_reaches_nothing_outside_the_allowlist(
    live_gateway, upstream_audit, mode
):
    session = requests.Session()
    answered = 0
    for path in CORPUS:
        if mode == "envelope":
            response = session.post(
                live_gateway.url + "/proxy", json={"path": path}, headers=AUTH, timeout=20
            )
            answer = response.status_code, response.headers, response.content
        else:
            try:
                answer = raw_request(live_gateway, "GET", "/proxy" + path, AUTH)
            except http.client.HTTPException:
                answer = None
        if answer is not None:
            answered += 1
            check_answer(*answer)
    assert answered >= 100
