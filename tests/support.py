"""Shared test data and helpers: canary secrets and a config builder."""

from __future__ import annotations

import yaml

# Every secret in the tests is a canary: no response, header or log line may hold one.
CANARIES = {
    "CANARY_OPENAI": "sk-canary-openai-3f9a1c",
    "CANARY_RAPID": "canary-rapid-77d0e2",
    "CANARY_ANTHROPIC": "sk-ant-canary-41b8aa",
}
UPSTREAM = "http://upstream.test/v1"
CHAT_KEY = "ck-test-chat-0123456789"
READONLY_KEY = "ck-test-readonly-0123456789"
RAPID_KEY = "ck-test-rapid-0123456789"


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
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


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


def live_config(upstream_url: str, dead_url: str, page_origin: str) -> dict:
    """Return the test config against a real upstream, plus slow, dead, SDK and browser clients."""
    config = base_config(upstream_url + "/v1")
    config["bodyTimeoutMs"] = 2000
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
    config["clients"][DEAD_KEY] = {
        "target": "dead",
        "authHeaderRef": "openai",
        "allowedMethods": ["*"],
        "allowedPaths": ["/**"],
        "connectTimeoutMs": 1000,
    }
    return config
