"""Shared test data and helpers: canary secrets and a config builder."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests
import yaml

from gateway.errors import read_error

# Every secret in the tests is a canary: no response, header or log line may hold one.
CANARIES = {
    "CANARY_OPENAI": "sk-canary-openai-3f9a1c",
    "CANARY_RAPID": "canary-rapid/77d0e2",  # a "/" that JSON may write as "\\/"
    "CANARY_ANTHROPIC": "sk-ant-canary-41b8aa",
    "CANARY_METRICS": "metrics-canary-token-5d2e9b71",
}
UPSTREAM = "http://upstream.test/v1"
CHAT_KEY = "ck-test-chat-0123456789"
READONLY_KEY = "ck-test-readonly-0123456789"
RAPID_KEY = "ck-test-rapid-0123456789"
AUTH = {"Authorization": f"Bearer {CHAT_KEY}"}


def base_config(upstream: str = UPSTREAM) -> dict:
    """Return a config dict with three clients on one upstream."""
    return {
        "targets": {
            "api": {"baseUrl": upstream, "defaultHeaders": {"X-Title": "gateway-tests"}},
        },
        "secrets": {
            "openai": "Bearer ${CANARY_OPENAI}",
            "rapid": "${CANARY_RAPID}",
            "anthropic": "${CANARY_ANTHROPIC}",
        },
        "clients": {
            CHAT_KEY: {
                "target": "api",
                "authHeaderRef": "openai",
                "secretHeaders": {"x-api-key": "anthropic"},
                "allowedMethods": ["GET", "POST"],
                "allowedPaths": ["/chat/completions", "/models", "/models/*", "/files/**"],
            },
            READONLY_KEY: {
                "target": "api",
                "authHeaderRef": "openai",
                "allowedMethods": ["GET"],
                "allowedPaths": ["/models"],
            },
            RAPID_KEY: {
                "target": "api",
                "rapidApiKeyRef": "rapid",
                "allowedMethods": ["*"],
                "allowedPaths": ["/**"],
                "timeoutMs": 2000,
            },
        },
    }


def write_config(path, config: dict) -> str:
    # Limit counters and usage in the test's own folder, never the project's instance/.
    config = {"limits": {"storage": f"sqlite:///{path.parent}/limits.sqlite3"}, **config}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def error_code(body: dict) -> str:
    """Return the gateway's code from an error body in any shape (flat, OpenAI's, Anthropic's)."""
    return read_error(body)[0]


def assert_no_canary(text: str | bytes) -> None:
    """Fail if ``text`` holds any canary secret."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for value in CANARIES.values():
        assert value not in text


SLOW_KEY = "ck-test-slow-0123456789"
DEAD_KEY = "ck-test-dead-0123456789"
ANTHROPIC_KEY = "ck-test-anthropic-0123456789"
BROWSER_KEY = "ck-test-browser-0123456789"


# Named clients with hashed keys (the gk_ format keys new makes).
NAMED_KEY = "gk_abcXFIytkLIvEMe3nYOKlfiBmt7GDJKY3OeLYBfIk5T1EBgdd"
NEXT_KEY = "ck-test-named-next-0123456789"  # a second key: rotation with overlap
EXPIRED_KEY = "ck-test-named-expired-0123456789"
EARLY_KEY = "ck-test-named-early-0123456789"
DOCS_KEY = "ck-test-docs-try-0123456789"  # a named client that allows the gateway's own origin
# Named clients the SDK tests are refused by: a token budget no call fits in
# (quota_exhausted), and a rate of one call per second (rate_limited).
BUDGET_KEY = "ck-test-sdk-budget-0123456789"
ANTHROPIC_BUDGET_KEY = "ck-test-sdk-anthropic-budget-0123456789"
RATE_KEY = "ck-test-sdk-rate-0123456789"
ANTHROPIC_RATE_KEY = "ck-test-sdk-anthropic-rate-0123456789"
LIVE_KEYS = [
    NAMED_KEY, NEXT_KEY, EXPIRED_KEY, EARLY_KEY, DOCS_KEY,
    BUDGET_KEY, ANTHROPIC_BUDGET_KEY, RATE_KEY, ANTHROPIC_RATE_KEY,
]  # fmt: skip


def named_client() -> dict:
    """Return a named client ``chat-app`` with an active, a rotated-in, an expired, an early key."""
    from gateway.policy.keys import key_item

    return {
        "keys": [
            key_item(NAMED_KEY),
            {"sha256": key_item(NEXT_KEY)[7:], "notBefore": "2020-01-01"},
            {"sha256": key_item(EXPIRED_KEY)[7:], "expires": "2021-01-31T00:00:00Z"},
            {"sha256": key_item(EARLY_KEY)[7:], "notBefore": "2999-01-01T00:00:00+02:00"},
        ],
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["POST"],
        "allowedPaths": ["/chat/completions"],
    }


def live_config(upstream_url: str, dead_url: str, page_origin: str) -> dict:
    """Return the test config against a real upstream, plus slow, dead, SDK and browser clients."""
    config = base_config(upstream_url + "/v1")
    config["bodyTimeoutMs"] = 2000
    config["secrets"]["metrics"] = "${CANARY_METRICS}"
    config["metrics"] = {"tokenRef": "metrics"}
    config["writeTimeoutMs"] = 3000
    config["targets"]["dead"] = {"baseUrl": dead_url}
    config["targets"]["anthropic"] = {"baseUrl": upstream_url}
    config["clients"][ANTHROPIC_KEY] = {
        "target": "anthropic",
        "secretHeaders": {"x-api-key": "anthropic"},
        "allowedMethods": ["POST"],
        "allowedPaths": ["/v1/messages"],
    }
    config["clients"][BROWSER_KEY] = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["GET", "POST"],
        "allowedPaths": ["/chat/completions", "/models", "/files/**"],
        "allowedOrigins": [page_origin],
    }
    config["clients"][SLOW_KEY] = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["*"],
        "allowedPaths": ["/**"],
        "timeoutMs": 500,
    }
    config["clients"]["chat-app"] = named_client()
    _add_sdk_clients(config)
    config["clients"][DEAD_KEY] = {
        "target": "dead",
        "authHeaderRef": "openai",
        "allowedMethods": ["*"],
        "allowedPaths": ["/**"],
        "connectTimeoutMs": 1000,
    }
    return config


def _add_sdk_clients(config: dict) -> None:
    """Add the clients the SDK tests are refused by (see BUDGET_KEY), one per SDK and rule."""
    from gateway.policy.keys import key_item

    openai_style = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["POST"],
        "allowedPaths": ["/chat/completions"],
    }
    anthropic_style = {
        "target": "anthropic",
        "secretHeaders": {"x-api-key": "anthropic"},
        "allowedMethods": ["POST"],
        "allowedPaths": ["/v1/messages"],
    }
    budget = {"limits": {"tokens": ["1/day"]}, "maxTokens": 100}
    rate = {"limits": {"requests": ["1/second"]}}
    for name, key, style, rule in (
        ("sdk-budget", BUDGET_KEY, openai_style, budget),
        ("sdk-anthropic-budget", ANTHROPIC_BUDGET_KEY, anthropic_style, budget),
        ("sdk-rate", RATE_KEY, openai_style, rate),
        ("sdk-anthropic-rate", ANTHROPIC_RATE_KEY, anthropic_style, rate),
    ):
        config["clients"][name] = {"keys": [key_item(key)], **style, **rule}


# --- upstream faults, shared by the fault suite and the soak ---------------------

SLOW = {"Authorization": f"Bearer {SLOW_KEY}"}  # read timeout 500 ms, every path allowed

# (path, key headers, expected): an int is the status and error of a refused call;
# "broken" is a response that started and must end in an error the client sees
# (or, when the upstream broke before its first body byte, a clean 502).
FAULTS = [
    ("/proxy/anything", {"Authorization": f"Bearer {DEAD_KEY}"}, (502, "upstream_unreachable")),
    ("/proxy/silence?delay=2", SLOW, (504, "upstream_timeout")),
    ("/proxy/reset-before-headers", SLOW, (502, "upstream_error")),
    ("/proxy/bad-status", SLOW, (502, "upstream_error")),
    ("/proxy/huge-headers", SLOW, (502, "upstream_error")),
    ("/proxy/reset-mid-body", SLOW, "broken"),
    ("/proxy/cut-mid-event", SLOW, "broken"),
    ("/proxy/short-body", SLOW, "broken"),
]


def call_fault(gateway, path, headers, expected):
    started = time.monotonic()
    if expected == "broken":
        response = requests.get(gateway.url + path, headers=headers, stream=True, timeout=10)
        if response.status_code == 502:  # it broke before the first body byte: a clean 502
            assert error_code(response.json()) == "upstream_error"
            return
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.RequestException):
            for _ in response.iter_content(chunk_size=None):
                pass
            # A body shorter than its Content-Length must not look complete.
            declared = response.headers.get("Content-Length")
            if declared and response.raw.tell() < int(declared):
                raise requests.exceptions.ChunkedEncodingError("short body")
    else:
        try:
            response = requests.get(gateway.url + path, headers=headers, timeout=10)
        except requests.exceptions.ConnectionError as exc:
            raise AssertionError(f"{path}: the gateway dropped the connection") from exc
        status, code = expected
        assert response.status_code == status, response.text
        assert error_code(response.json()) == code
        assert_no_canary(response.content)
    assert time.monotonic() - started < 8


def envelope(client, body, headers=AUTH, **kwargs):
    return client.post("/proxy", json=body, headers=headers, **kwargs)


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    seen, message = read_error(response.get_json())  # in whatever shape the call takes
    assert seen == code
    assert message
    assert_no_canary(response.get_data())
    assert "Traceback" not in response.get_data(as_text=True)


def need_redis_server() -> None:
    """Skip a test that needs redis-server where it is missing; fail in CI, which installs it."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
