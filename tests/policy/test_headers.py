"""Header rules: secrets added, client keys, hop-by-hop, cookies and override headers dropped."""

from __future__ import annotations

import json

import pytest
import responses

from ..support import AUTH, CANARIES, CHAT_KEY, RAPID_KEY, UPSTREAM, envelope

OVERRIDES = {
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
}


@pytest.mark.parametrize("mode", ["envelope", "transparent"])
def test_method_and_url_override_headers_never_reach_the_upstream(client, mocked_upstream, mode):
    mocked_upstream.get(UPSTREAM + "/models", body="{}")
    if mode == "envelope":
        client.post("/proxy", json={"path": "/models", "headers": OVERRIDES}, headers=AUTH)
    else:
        client.get("/proxy/models", headers={**AUTH, **OVERRIDES})
    sent = {name.lower() for name in mocked_upstream.calls[0].request.headers}
    assert not sent & {name.lower() for name in OVERRIDES}


def test_secret_added_client_key_and_blocked_headers_never_forwarded(client, mocked_upstream):
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", json={"id": "x"})
    response = envelope(
        client,
        {
            "method": "post",
            "path": "/chat/completions",
            "query": {"stream": False, "n": 2, "tag": ["a", "b"]},
            "headers": {
                "Authorization": f"Bearer {CHAT_KEY}",
                "X-Api-Key": "client-tries-its-own",
                "X-RapidAPI-Key": "client-tries-its-own",
                "Host": "evil.example",
                "Cookie": "session=1",
                "Connection": "close, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=5",
                "Transfer-Encoding": "chunked",
                "TE": "trailers",
                "Upgrade": "websocket",
                "Proxy-Authorization": "Basic x",
                "Content-Length": "1",
                "X-Title": "client override",
                "X-Custom": "kept",
            },
            "body": {"model": "m", "messages": [{"role": "user", "content": "héllo"}]},
        },
    )
    assert response.status_code == 200
    assert response.get_json() == {"id": "x"}
    sent = mocked_upstream.calls[0].request
    url, _, query = sent.url.partition("?")
    assert url == f"{UPSTREAM}/chat/completions"
    assert sorted(query.split("&")) == ["n=2", "stream=false", "tag=a", "tag=b"]
    assert sent.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert sent.headers["x-api-key"] == CANARIES["CANARY_ANTHROPIC"]
    assert sent.headers["X-Title"] == "client override"  # client headers override defaults
    assert sent.headers["X-Custom"] == "kept"
    assert sent.headers["Content-Type"] == "application/json"
    for name in (
        "X-RapidAPI-Key",
        "Cookie",
        "Connection",
        "X-Drop-Me",
        "Keep-Alive",
        "Transfer-Encoding",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
    ):
        assert name not in sent.headers
    assert sent.headers.get("Host") is None
    assert CHAT_KEY not in json.dumps(dict(sent.headers))
    assert json.loads(sent.body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "héllo"}],
    }


def test_target_default_headers_are_sent(client, mocked_upstream):
    mocked_upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    envelope(client, {"path": "/models"})
    assert mocked_upstream.calls[0].request.headers["X-Title"] == "gateway-tests"
    assert mocked_upstream.calls[0].request.body is None


def test_rapidapi_secret_is_sent_as_x_rapidapi_key(client, mocked_upstream):
    mocked_upstream.add(responses.DELETE, f"{UPSTREAM}/anything/here", status=204)
    response = envelope(
        client,
        {"method": "DELETE", "path": "/anything/here"},
        headers={"Authorization": f"Bearer {RAPID_KEY}"},
    )
    assert response.status_code == 204
    assert mocked_upstream.calls[0].request.headers["X-RapidAPI-Key"] == CANARIES["CANARY_RAPID"]
    assert "Authorization" not in mocked_upstream.calls[0].request.headers


def test_upstream_response_headers_pass_except_cookies_and_hop_by_hop(client, mocked_upstream):
    mocked_upstream.add(
        responses.GET,
        f"{UPSTREAM}/models",
        status=429,
        body=b'{"error": "slow down"}',
        content_type="application/json",
        headers={
            "Retry-After": "7",
            "X-RateLimit-Remaining": "0",
            "X-Request-Id": "req-1",
            "Set-Cookie": "track=1",
            "Connection": "X-Hop",
            "X-Hop": "1",
            "Access-Control-Allow-Origin": "*",
            "Strict-Transport-Security": "max-age=1",
        },
    )
    response = envelope(client, {"path": "/models"})
    assert response.status_code == 429
    assert response.get_json() == {"error": "slow down"}
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-Request-Id"] == "req-1"
    for name in ("Set-Cookie", "X-Hop", "Access-Control-Allow-Origin", "Strict-Transport-Security"):
        assert name not in response.headers
