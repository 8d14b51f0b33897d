"""Refusals in the dialect of the call: the choice, the three shapes, and the SDKs' headers."""

from __future__ import annotations

import pytest

from gateway import create_app
from gateway.edge.dialect import call_dialect
from gateway.errors import CODES, error_body, should_retry

from ..support import AUTH, CANARIES, CHAT_KEY, UPSTREAM, envelope, write_config

ANTHROPIC = {"anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("target", "path", "version", "expected"),
    [
        (None, "/proxy/chat/completions", None, "openai"),
        (None, "/proxy/v1/chat/completions", None, "openai"),
        (None, "/proxy/api/v1/completions", None, "openai"),
        (None, "/proxy/openai/deployments/gpt/embeddings", None, "openai"),
        (None, "/proxy/v1/responses", None, "openai"),
        (None, "/proxy/v1/models", None, "openai"),
        (None, "/proxy/v1/moderations", None, "openai"),
        (None, "/proxy/v1/images/generations", None, "openai"),
        (None, "/proxy/v1/audio/transcriptions", None, "openai"),
        (None, "/proxy/v1/messages", "2023-06-01", "anthropic"),
        (None, "/proxy/v1/models", "2023-06-01", "anthropic"),  # the header comes first
        (None, "/proxy/v1/messages", None, "none"),
        (None, "/proxy/v1beta/models/gemini:generateContent", None, "none"),
        (None, "/proxy/v1/models/gpt-4", None, "none"),
        (None, "/proxy/chat/completions/x", None, "none"),
        (None, "/proxy/weather", None, "none"),
        ("anthropic", "/proxy/chat/completions", None, "anthropic"),  # the target's word wins
        ("openai", "/proxy/v1/messages", "2023-06-01", "openai"),
        ("none", "/proxy/chat/completions", "2023-06-01", "none"),
    ],
)
def test_the_dialect_of_a_call(target, path, version, expected):
    assert call_dialect(target, path, version) == expected


def test_each_shape_carries_the_same_code_and_message():
    message = "This client key may not call this path."
    assert error_body("path_not_allowed", message, "r1") == {
        "error": "path_not_allowed",
        "message": message,
        "request_id": "r1",
    }
    assert error_body("path_not_allowed", message, "r1", dialect="openai") == {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "path_not_allowed",
        },
        "request_id": "r1",
    }
    assert error_body("path_not_allowed", message, "r1", dialect="anthropic") == {
        "type": "error",
        "error": {"type": "permission_error", "message": message, "code": "path_not_allowed"},
        "request_id": "r1",
    }


@pytest.mark.parametrize(
    ("code", "openai", "anthropic"),
    [
        ("invalid_json", "invalid_request_error", "invalid_request_error"),
        ("invalid_client_key", "invalid_request_error", "authentication_error"),
        ("model_not_allowed", "invalid_request_error", "permission_error"),
        ("not_found", "invalid_request_error", "not_found_error"),
        ("request_too_large", "invalid_request_error", "invalid_request_error"),
        ("rate_limited", "requests", "rate_limit_error"),
        ("quota_exhausted", "insufficient_quota", "rate_limit_error"),
        ("internal_error", "server_error", "api_error"),
        ("upstream_timeout", "server_error", "api_error"),
        ("limits_unavailable", "server_error", "overloaded_error"),
    ],
)
def test_the_kind_each_api_names(code, openai, anthropic):
    assert error_body(code, "m", "r", dialect="openai")["error"]["type"] == openai
    assert error_body(code, "m", "r", dialect="anthropic")["error"]["type"] == anthropic


@pytest.mark.parametrize(
    ("code", "retry_after", "expected"),
    [
        ("rate_limited", "1", True),
        ("rate_limited", "60", True),
        ("rate_limited", "61", False),  # over a minute: the caller should hear at once
        ("too_many_concurrent", None, True),  # a slot frees when a call ends
        ("too_many_concurrent", "3600", False),
        ("quota_exhausted", "1", False),  # the budget does not refill by retrying
        ("quota_exhausted", "72000", False),
        ("invalid_client_key", None, False),
        ("path_not_allowed", None, False),
        ("max_tokens_required", None, False),
        ("not_found", None, False),
        ("request_too_large", None, False),
        ("request_timeout", None, None),  # a slow body may arrive in time on a retry
        ("upstream_timeout", None, None),
        ("upstream_unreachable", None, None),
    ],
)
def test_should_retry(code, retry_after, expected):
    assert should_retry(code, retry_after) is expected


def test_every_code_has_a_kind_in_each_api():
    for code in CODES:
        for dialect in ("openai", "anthropic"):
            assert error_body(code, "m", "r", dialect=dialect)["error"]["code"] == code


# --- through the app --------------------------------------------------------------------


def _app(tmp_path, config: dict):
    return create_app(
        {
            "TESTING": True,
            "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", config),
            "GATEWAY_ENVIRON": dict(CANARIES),
        }
    )


def _ids(response) -> set[str]:
    headers = response.headers
    return {headers["X-Gateway-Request-Id"], headers["x-request-id"], headers["request-id"]}


def test_a_transparent_openai_call_is_refused_in_openai_shape(client):
    response = client.post("/proxy/embeddings", headers=AUTH, json={"model": "m", "input": "x"})
    assert response.status_code == 403
    body = response.get_json()
    assert body["error"]["code"] == "path_not_allowed"
    assert body["error"]["message"] == "This client key may not call this path."
    assert _ids(response) == {body["request_id"]}
    assert response.headers["x-should-retry"] == "false"


def test_an_anthropic_call_is_refused_in_anthropic_shape_before_its_key_is_known(client):
    response = client.post("/proxy/v1/messages", headers=ANTHROPIC, json={})
    assert response.status_code == 401
    body = response.get_json()
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["code"]) == (
        "authentication_error",
        "missing_client_key",
    )
    assert _ids(response) == {body["request_id"]}


def test_the_envelope_keeps_the_flat_shape_whatever_the_call(client):
    response = envelope(
        client, {"method": "POST", "path": "/embeddings"}, headers={**AUTH, **ANTHROPIC}
    )
    assert response.status_code == 403
    body = response.get_json()
    assert body == {
        "error": "path_not_allowed",
        "message": "This client key may not call this path.",
        "request_id": body["request_id"],
    }
    # The SDKs' headers are on every refusal, the flat ones too.
    assert _ids(response) == {body["request_id"]}
    assert response.headers["x-should-retry"] == "false"


def test_a_call_with_no_sign_of_its_api_keeps_the_flat_shape(client):
    response = client.get("/proxy/weather", headers=AUTH)
    assert response.status_code == 403
    assert response.get_json()["error"] == "path_not_allowed"


@pytest.mark.parametrize(
    ("dialect", "shape"),
    [("none", str), ("anthropic", dict), ("openai", dict)],
)
def test_the_targets_dialect_decides(tmp_path, config_dict, dialect, shape):
    config_dict["targets"]["api"]["dialect"] = dialect
    app = _app(tmp_path, config_dict)
    # An OpenAI path with Anthropic's header: only the target's dialect can decide.
    response = app.test_client().post(
        "/proxy/embeddings", headers={**AUTH, **ANTHROPIC}, json={"model": "m"}
    )
    body = response.get_json()
    assert isinstance(body["error"], shape)
    assert ("type" in body) == (dialect == "anthropic")
    # Before the key is known the target is not: the call's own signs decide.
    refused = app.test_client().post("/proxy/embeddings", json={})
    assert refused.get_json()["error"]["code"] == "missing_client_key"


def test_a_rate_limit_says_whether_to_retry(tmp_path, config_dict, mocked_upstream):
    config_dict["clients"][CHAT_KEY]["limits"] = {"requests": ["1/day"]}
    app = _app(tmp_path, config_dict)
    mocked_upstream.get(UPSTREAM + "/models", json={"data": []})
    client = app.test_client()
    assert client.get("/proxy/models", headers=AUTH).status_code == 200
    refused = client.get("/proxy/models", headers=AUTH)
    assert refused.status_code == 429
    assert refused.get_json()["error"] == {
        "message": "This client key has made too many calls; wait for Retry-After seconds.",
        "type": "requests",
        "param": None,
        "code": "rate_limited",
    }
    # The day's window ends in hours (a minute or less only just before midnight UTC).
    seconds = int(refused.headers["Retry-After"])
    assert refused.headers["x-should-retry"] == ("true" if seconds <= 60 else "false")
