"""The HTTP edge with a mocked upstream: auth, envelope, header rules, error mapping."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from ..support import AUTH, CANARIES, CHAT_KEY, RAPID_KEY, READONLY_KEY, UPSTREAM, assert_no_canary


def envelope(client, body, headers=AUTH, **kwargs):
    return client.post("/proxy", json=body, headers=headers, **kwargs)


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert_no_canary(response.get_data())
    assert "Traceback" not in response.get_data(as_text=True)


def test_health_needs_no_key(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"ok": True}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_client_key"),
        ({"Authorization": "Basic abc"}, "missing_client_key"),
        ({"Authorization": "Bearer "}, "missing_client_key"),
        ({"Authorization": "Bearer ck-nope"}, "invalid_client_key"),
        ({"Authorization": f"Bearer {CHAT_KEY}x"}, "invalid_client_key"),
        ({"Authorization": f"Bearer {CHAT_KEY[:-1]}"}, "invalid_client_key"),
        ({"Authorization": "Bearer " + CANARIES["CANARY_OPENAI"]}, "invalid_client_key"),
        ({"X-Api-Key": "ck-nope"}, "invalid_client_key"),
    ],
)
def test_bad_keys_get_401(client, headers, code):
    response = envelope(client, {"path": "/models"}, headers=headers)
    assert_error(response, 401, code)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"data": "{", "content_type": "application/json"}, "invalid_json"),
        ({"data": "[1, 2]", "content_type": "application/json"}, "invalid_json"),
        ({"data": '"x"', "content_type": "application/json"}, "invalid_json"),
        ({"data": '{"path": NaN}', "content_type": "application/json"}, "invalid_json"),
        ({"data": b'{"path": "\xff"}', "content_type": "application/json"}, "invalid_json"),
        ({"data": "[" * 100000, "content_type": "application/json"}, "invalid_json"),
        ({"data": '{"path": "/models"}', "content_type": "text/plain"}, "invalid_json"),
        ({"data": '{"path": "/models"}'}, "invalid_json"),
    ],
)
def test_unreadable_envelopes_get_400(client, kwargs, code):
    response = client.post("/proxy", headers=AUTH, **kwargs)
    assert_error(response, 400, code)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "path"),
        ({"path": 5}, "path"),
        ({"path": "/models", "extra": 1}, "extra"),
        ({"path": "/models", "method": "TRACE"}, "method"),
        ({"path": "/models", "method": 1}, "method"),
        ({"path": "/models", "query": {"a": {"b": 1}}}, "query"),
        ({"path": "/models", "query": {"a": [None]}}, "query"),
        ({"path": "/models", "query": []}, "query"),
        ({"path": "/models", "headers": {"X-A": 1}}, "headers"),
        ({"path": "/models", "headers": "x"}, "headers"),
    ],
)
def test_invalid_envelope_fields_get_400_with_field_errors(client, body, field):
    response = envelope(client, body)
    assert_error(response, 400, "invalid_envelope")
    assert field in response.get_json()["fields"]


@pytest.mark.parametrize(
    ("key", "body", "status", "code"),
    [
        (READONLY_KEY, {"path": "/models", "method": "POST"}, 403, "method_not_allowed"),
        (READONLY_KEY, {"path": "/chat/completions"}, 403, "path_not_allowed"),
        (CHAT_KEY, {"path": "/models/a/b"}, 403, "path_not_allowed"),
        (CHAT_KEY, {"path": "models"}, 400, "invalid_path"),
        (CHAT_KEY, {"path": "/models/../admin"}, 400, "invalid_path"),
        (CHAT_KEY, {"path": "/files/%2e%2e/admin"}, 400, "invalid_path"),
        (CHAT_KEY, {"path": "//evil.example/models"}, 400, "invalid_path"),
        (CHAT_KEY, {"path": "/models?x=1"}, 400, "invalid_path"),
        (CHAT_KEY, {"path": "@evil.example/models"}, 400, "invalid_path"),
        (
            CHAT_KEY,
            {"path": "/models", "headers": {"X-A": "a\r\nHost: evil"}},
            400,
            "invalid_header",
        ),
        (CHAT_KEY, {"path": "/models", "headers": {"X-A\r\nHost": "a"}}, 400, "invalid_header"),
        (CHAT_KEY, {"path": "/models", "headers": {"X-A": "a\x00"}}, 400, "invalid_header"),
    ],
)
def test_policy_refusals_forward_nothing(client, upstream, key, body, status, code):
    response = envelope(client, body, headers={"Authorization": f"Bearer {key}"})
    assert_error(response, status, code)
    assert len(upstream.calls) == 0


def test_secret_added_client_key_and_blocked_headers_never_forwarded(client, upstream):
    upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", json={"id": "x"})
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
    sent = upstream.calls[0].request
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


def test_target_default_headers_are_sent(client, upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    envelope(client, {"path": "/models"})
    assert upstream.calls[0].request.headers["X-Title"] == "gateway-tests"
    assert upstream.calls[0].request.body is None


def test_rapidapi_secret_is_sent_as_x_rapidapi_key(client, upstream):
    upstream.add(responses.DELETE, f"{UPSTREAM}/anything/here", status=204)
    response = envelope(
        client,
        {"method": "DELETE", "path": "/anything/here"},
        headers={"Authorization": f"Bearer {RAPID_KEY}"},
    )
    assert response.status_code == 204
    assert upstream.calls[0].request.headers["X-RapidAPI-Key"] == CANARIES["CANARY_RAPID"]
    assert "Authorization" not in upstream.calls[0].request.headers


def test_upstream_response_headers_pass_except_cookies_and_hop_by_hop(client, upstream):
    upstream.add(
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


def test_redirects_are_returned_not_followed(client, upstream):
    upstream.add(
        responses.GET,
        f"{UPSTREAM}/models",
        status=302,
        headers={"Location": "https://elsewhere.example/steal"},
    )
    response = envelope(client, {"path": "/models"})
    assert response.status_code == 302
    assert response.headers["Location"] == "https://elsewhere.example/steal"
    assert len(upstream.calls) == 1


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
def test_transport_failures_get_a_stable_502_or_504(client, upstream, error, status, code):
    upstream.add(responses.GET, f"{UPSTREAM}/models", body=error)
    response = envelope(client, {"path": "/models"})
    assert_error(response, status, code)
    assert type(error).__name__ not in response.get_data(as_text=True)


def test_envelope_over_the_limit_gets_413_and_nothing_forwarded(tmp_path, config_dict, upstream):
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
    assert len(upstream.calls) == 0


def test_unknown_route_gets_json_404(client):
    assert_error(client.get("/nope"), 404, "not_found")


def test_wrong_method_on_envelope_gets_json_405(client):
    response = client.get("/proxy")
    assert_error(response, 405, "route_method_not_allowed")
    assert "POST" in response.headers["Allow"]


# --- transparent mode ---------------------------------------------------------------


def test_transparent_forwards_raw_body_query_and_content_type(client, upstream):
    upstream.add(responses.POST, f"{UPSTREAM}/files/upload", json={"ok": 1})
    body = b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\n\x00\xff\x10\r\n--b--\r\n"
    response = client.post(
        "/proxy/files/upload?purpose=x&a=%20b",
        data=body,
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b", "X-Custom": "1"},
    )
    assert response.status_code == 200
    sent = upstream.calls[0].request
    assert sent.body == body
    assert sent.headers["Content-Type"] == "multipart/form-data; boundary=b"
    assert sent.url == f"{UPSTREAM}/files/upload?purpose=x&a=%20b"
    assert sent.headers["X-Custom"] == "1"
    assert sent.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]


def test_transparent_takes_x_api_key_and_strips_it(client, upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    response = client.get("/proxy/models", headers={"X-Api-Key": CHAT_KEY})
    assert response.status_code == 200
    sent = upstream.calls[0].request.headers
    assert sent["x-api-key"] == CANARIES["CANARY_ANTHROPIC"]
    assert CHAT_KEY not in json.dumps(dict(sent))


@pytest.mark.parametrize(
    "target",
    [
        "/proxy/files/%2e%2e/admin",
        "/proxy/files/%2E%2E%2Fadmin",
        "/proxy/files/a%2Fb",
        "/proxy/files/a%5cb",
        "/proxy/files/%252e%252e/admin",
        "/proxy//evil.example/x",
        "/proxy/files//x",
        "/proxy/files/..%2f..%2fadmin",
    ],
)
def test_transparent_judges_the_raw_path(client, upstream, target):
    response = client.get(target, headers=AUTH)
    assert_error(response, 400, "invalid_path")
    assert len(upstream.calls) == 0


def test_transparent_mode_refuses_methods_and_paths_outside_the_policy(client, upstream):
    assert_error(client.delete("/proxy/models", headers=AUTH), 403, "method_not_allowed")
    assert_error(client.get("/proxy/admin", headers=AUTH), 403, "path_not_allowed")
    assert len(upstream.calls) == 0


def test_upstream_cookies_are_never_sent_on_a_later_call(client, upstream):
    upstream.add(
        responses.GET,
        f"{UPSTREAM}/models",
        json={},
        headers={"Set-Cookie": "session=one-clients-cookie; Path=/"},
    )
    upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    envelope(client, {"path": "/models"})
    envelope(client, {"path": "/models"}, headers={"Authorization": f"Bearer {READONLY_KEY}"})
    assert "Cookie" not in upstream.calls[1].request.headers
