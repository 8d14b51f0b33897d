"""The routes with a mocked upstream: health, auth, the envelope, transparent mode, error pages."""

from __future__ import annotations

import json

import pytest
import responses

from ..support import (
    AUTH,
    CANARIES,
    CHAT_KEY,
    READONLY_KEY,
    UPSTREAM,
    assert_error,
    envelope,
)


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
def test_policy_refusals_forward_nothing(client, mocked_upstream, key, body, status, code):
    response = envelope(client, body, headers={"Authorization": f"Bearer {key}"})
    assert_error(response, status, code)
    assert len(mocked_upstream.calls) == 0


def test_unknown_route_gets_json_404(client):
    assert_error(client.get("/nope"), 404, "not_found")


def test_wrong_method_on_envelope_gets_json_405(client):
    response = client.get("/proxy")
    assert_error(response, 405, "route_method_not_allowed")
    assert "POST" in response.headers["Allow"]


# --- transparent mode ---------------------------------------------------------------


def test_transparent_forwards_raw_body_query_and_content_type(client, mocked_upstream):
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/files/upload", json={"ok": 1})
    body = b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\n\x00\xff\x10\r\n--b--\r\n"
    response = client.post(
        "/proxy/files/upload?purpose=x&a=%20b",
        data=body,
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b", "X-Custom": "1"},
    )
    assert response.status_code == 200
    sent = mocked_upstream.calls[0].request
    assert sent.body == body
    assert sent.headers["Content-Type"] == "multipart/form-data; boundary=b"
    assert sent.url == f"{UPSTREAM}/files/upload?purpose=x&a=%20b"
    assert sent.headers["X-Custom"] == "1"
    assert sent.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]


def test_transparent_takes_x_api_key_and_strips_it(client, mocked_upstream):
    mocked_upstream.add(responses.GET, f"{UPSTREAM}/models", json={})
    response = client.get("/proxy/models", headers={"X-Api-Key": CHAT_KEY})
    assert response.status_code == 200
    sent = mocked_upstream.calls[0].request.headers
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
def test_transparent_judges_the_raw_path(client, mocked_upstream, target):
    response = client.get(target, headers=AUTH)
    assert_error(response, 400, "invalid_path")
    assert len(mocked_upstream.calls) == 0


def test_transparent_mode_refuses_methods_and_paths_outside_the_policy(client, mocked_upstream):
    assert_error(client.delete("/proxy/models", headers=AUTH), 403, "method_not_allowed")
    assert_error(client.get("/proxy/admin", headers=AUTH), 403, "path_not_allowed")
    assert len(mocked_upstream.calls) == 0
