"""The upstream client: redirects returned, no cookie jar, transport failures mapped to 502/504."""

from __future__ import annotations

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse

from gateway.upstream.client import _wire_url
from gateway.upstream.pool import PoolAdapter

from ..support import CANARIES, DEAD_KEY, READONLY_KEY, SLOW_KEY, UPSTREAM, assert_error, envelope


def test_redirects_are_returned_not_followed(client, mocked_upstream):
    mocked_upstream.add(
        responses.GET,
        f"{UPSTREAM}/models",
        status=302,
        headers={"Location": "https://elsewhere.example/steal"},
    )
    response = envelope(client, {"path": "/models"})
    assert response.status_code == 302
    assert response.headers["Location"] == "https://elsewhere.example/steal"
    assert len(mocked_upstream.calls) == 1


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (requests.exceptions.ConnectTimeout(), 504, "upstream_timeout"),
        (requests.exceptions.ReadTimeout(), 504, "upstream_timeout"),
        (
            requests.exceptions.ConnectionError("Bearer " + CANARIES["CANARY_OPENAI"]),
            502,
            "upstream_error",
        ),
        (requests.exceptions.InvalidHeader("x"), 502, "upstream_error"),
    ],
)
def test_transport_failures_get_a_stable_502_or_504(client, mocked_upstream, error, status, code):
    mocked_upstream.add(responses.GET, f"{UPSTREAM}/models", body=error)
    response = envelope(client, {"path": "/models"})
    assert_error(response, status, code)
    assert type(error).__name__ not in response.get_data(as_text=True)


def test_upstream_cookies_are_never_sent_on_a_later_call(client, mocked_upstream):
    mocked_upstream.add(
        responses.GET,
        f"{UPSTREAM}/models",
        json={},
        headers={"Set-Cookie": "session=one-clients-cookie; Path=/"},
    )
    mocked_upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    envelope(client, {"path": "/models"})
    envelope(client, {"path": "/models"}, headers={"Authorization": f"Bearer {READONLY_KEY}"})
    assert "Cookie" not in mocked_upstream.calls[1].request.headers


@pytest.mark.parametrize(
    ("key", "path", "status", "code"),
    [
        (SLOW_KEY, "/proxy/slow?delay=3", 504, "upstream_timeout"),
        (DEAD_KEY, "/proxy/anything", 502, "upstream_unreachable"),
    ],
)
def test_upstream_timeouts_and_closed_ports(live_gateway, key, path, status, code):
    response = requests.get(
        live_gateway.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == status
    assert response.json()["error"] == code


def test_the_adapter_does_what_requests_does_less_its_proxies_and_cookie_jar():
    prepared = requests.Request("POST", "http://up.example/v1/x?a=1", data=b"{}").prepare()
    head = {"Content-Type": "text/plain; charset=latin-1", "Set-Cookie": "s=1; Path=/"}
    adapter = PoolAdapter(1, 1.0)

    def built(build) -> dict:
        raw = HTTPResponse(b"hi", headers=head, status=201, reason="Made", preload_content=False)
        response = build(adapter, prepared, raw)
        assert response.raw is raw and response.connection is adapter
        return {k: v for k, v in vars(response).items() if k not in ("raw", "cookies")}

    ours = built(PoolAdapter.build_response)
    assert ours == built(HTTPAdapter.build_response)
    assert ours["headers"]["set-cookie"] == "s=1; Path=/"  # passed on, only never kept
    assert adapter.request_url(prepared, {}) == HTTPAdapter.request_url(adapter, prepared, {})
    for verify in (True, False):
        pool = adapter.get_connection_with_tls_context(prepared, verify, {})
        assert pool is HTTPAdapter.get_connection_with_tls_context(adapter, prepared, verify, {})


@pytest.mark.parametrize(
    "url",
    [
        "http://up.example/v1/models",
        "https://UP.example:8443/v1/a%2fb?x=1&y=%7E~ &z",
        "http://b\u00fccher.example/p\u00e4th?q=\u00e9",
        "http://[::1]:8080/x?",
    ],
)
def test_the_wire_url_is_the_one_requests_prepares(url):
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    assert _wire_url(url) == _wire_url(url) == prepared.url


def test_a_url_requests_refuses_is_refused_every_time():
    for _ in range(2):
        with pytest.raises(requests.exceptions.InvalidURL):
            _wire_url("http://exa mple\u3002.:x/")
