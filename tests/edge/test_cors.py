"""Browsers: preflights answered without a key, origins held to each client's list."""

from __future__ import annotations

import pytest
import responses

from ..support import AUTH, CHAT_KEY, RAPID_KEY, READONLY_KEY, UPSTREAM

APP_ORIGIN = "https://app.example.com"


@pytest.fixture
def config_dict(config_dict):
    config_dict["clients"][CHAT_KEY]["allowedOrigins"] = [APP_ORIGIN]
    config_dict["clients"][RAPID_KEY]["allowedOrigins"] = [APP_ORIGIN]
    return config_dict


def preflight(client, path, origin, headers="authorization,content-type,x-stainless-os"):
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


@pytest.mark.parametrize("path", ["/proxy", "/proxy/chat/completions"])
def test_preflight_from_an_allowed_origin_needs_no_key(client, mocked_upstream, path):
    response = preflight(client, path, APP_ORIGIN)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = [
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    ]
    assert {"authorization", "content-type", "x-api-key", "x-stainless-os"} <= set(allowed)
    assert "*" not in allowed
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers["Vary"]
    assert len(mocked_upstream.calls) == 0


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "http://app.example.com",
        "null",
    ],
)
def test_preflight_from_another_origin_gets_no_cors_headers(client, mocked_upstream, origin):
    response = preflight(client, "/proxy/chat/completions", origin)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Headers" not in response.headers
    assert len(mocked_upstream.calls) == 0


def test_preflight_does_not_echo_junk_header_names(client):
    response = preflight(client, "/proxy", APP_ORIGIN, headers="x-ok, bad header, x;y")
    allowed = response.headers["Access-Control-Allow-Headers"]
    assert "x-ok" in allowed and "bad header" not in allowed


def test_allowed_origin_gets_the_answer_with_exposed_headers(client, mocked_upstream):
    mocked_upstream.add(
        responses.POST,
        f"{UPSTREAM}/chat/completions",
        json={"ok": 1},
        headers={"X-RateLimit-Remaining": "9", "X-Request-Id": "r1"},
    )
    response = client.post(
        "/proxy/chat/completions", json={}, headers={**AUTH, "Origin": APP_ORIGIN}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Origin" in response.headers["Vary"]
    exposed = response.headers["Access-Control-Expose-Headers"]
    assert "X-RateLimit-Remaining" in exposed and "X-Request-Id" in exposed
    assert "Origin" not in mocked_upstream.calls[0].request.headers  # browser details stay here


@pytest.mark.parametrize(
    ("key", "origin", "readable"),
    [
        # No client allows this origin: the browser hides even the refusal.
        (CHAT_KEY, "https://evil.example", False),
        # Another client allows it: the page can read why it was refused.
        (READONLY_KEY, APP_ORIGIN, True),
    ],
)
def test_origin_not_allowed_for_this_client_is_refused(
    client, mocked_upstream, key, origin, readable
):
    response = client.get(
        "/proxy/models", headers={"Authorization": f"Bearer {key}", "Origin": origin}
    )
    assert response.status_code == 403
    assert response.get_json()["error"] == "origin_not_allowed"
    assert ("Access-Control-Allow-Origin" in response.headers) is readable
    if readable:
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers["Vary"]
    assert len(mocked_upstream.calls) == 0


def test_auth_errors_are_readable_by_an_allowed_page(client):
    response = client.post("/proxy", json={"path": "/models"}, headers={"Origin": APP_ORIGIN})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN


def test_calls_without_origin_are_unaffected(client, mocked_upstream):
    mocked_upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    response = client.get("/proxy/models", headers=AUTH)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


def test_plain_options_call_is_forwarded_not_treated_as_preflight(client, mocked_upstream):
    # An Origin but no Access-Control-Request-Method: an ordinary OPTIONS call, forwarded.
    mocked_upstream.add(
        responses.OPTIONS, f"{UPSTREAM}/anything", status=200, headers={"Allow": "GET"}
    )
    response = client.options(
        "/proxy/anything", headers={"Authorization": f"Bearer {RAPID_KEY}", "Origin": APP_ORIGIN}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Allow"] == "GET"
    assert mocked_upstream.calls[0].request.headers["X-RapidAPI-Key"]
