"""``flask explain``: the live code path, stopped before the upstream; never disagrees with it."""

from __future__ import annotations

import json
import re

import pytest
import responses
from werkzeug.test import Client

from gateway.commands import explain as explain_command

from ..support import CANARIES, CHAT_KEY, NAMED_KEY, RAPID_KEY, READONLY_KEY, UPSTREAM, named_client

APP_ORIGIN = "https://app.example.com"
NAMED_AUTH = {"Authorization": f"Bearer {NAMED_KEY}"}


@pytest.fixture
def config_dict(config_dict):
    config_dict["clients"]["chat-app"] = {**named_client(), "allowedOrigins": [APP_ORIGIN]}
    return config_dict


def explain(runner, *args):
    return runner.invoke(args=["explain", *args])


def test_a_forwarded_request_shows_client_pattern_upstream_and_masked_secrets(
    runner, mocked_upstream, tmp_path
):
    body = tmp_path / "body.json"
    body.write_text('{"model": "m"}')
    result = explain(
        runner, "--key", NAMED_KEY, "--origin", APP_ORIGIN, "--body", str(body),
        "POST", "/proxy/chat/completions?stream=true",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "client: chat-app" in lines
    assert "path: /chat/completions matches allowedPaths pattern /chat/completions" in lines
    assert "decision: forwarded" in lines
    assert f"upstream: POST {UPSTREAM}/chat/completions?stream=true" in lines
    secret = "Bearer " + CANARIES["CANARY_OPENAI"]
    assert f"  Authorization: (secret: set, {len(secret)} characters)" in lines
    assert "  X-Title: gateway-tests" in lines
    assert "body: 14 bytes" in lines
    assert f"cors: a page on {APP_ORIGIN} can read the answer" in lines
    for value in CANARIES.values():
        assert value not in result.output
    assert NAMED_KEY not in result.output
    assert len(mocked_upstream.calls) == 0  # nothing was sent


def test_every_secret_header_is_masked(runner, mocked_upstream):
    result = explain(runner, "--key", CHAT_KEY, "GET", "/proxy/models")
    assert result.exit_code == 0, result.output
    assert re.search(r"^  Authorization: \(secret: set, \d+ characters\)$", result.output, re.M)
    assert re.search(r"^  x-api-key: \(secret: set, \d+ characters\)$", result.output, re.M)
    for value in CANARIES.values():
        assert value not in result.output
    assert "client: client#1" in result.output


@pytest.mark.parametrize(
    ("args", "decision"),
    [
        (["GET", "/proxy/models"], "refused: 401 missing_client_key"),
        (["--key", "nope", "GET", "/proxy/models"], "refused: 401 invalid_client_key"),
        (["--key", READONLY_KEY, "POST", "/proxy/models"], "refused: 403 method_not_allowed"),
        (["--key", READONLY_KEY, "GET", "/proxy/files/x"], "refused: 403 path_not_allowed"),
        (["--key", CHAT_KEY, "GET", "/proxy/models/%2e%2e/admin"], "refused: 400 invalid_path"),
        (
            [
                "--key",
                NAMED_KEY,
                "--origin",
                "https://evil.example",
                "POST",
                "/proxy/chat/completions",
            ],
            "refused: 403 origin_not_allowed",
        ),
        (["--key", CHAT_KEY, "GET", "/nowhere"], "refused: 404 not_found"),
    ],
)
def test_a_refused_request_says_the_code_and_exits_1(runner, mocked_upstream, args, decision):
    result = explain(runner, *args)
    assert result.exit_code == 1, result.output
    assert f"decision: {decision}" in result.output
    assert len(mocked_upstream.calls) == 0


def test_a_refused_request_after_the_key_still_names_the_client(runner, mocked_upstream):
    result = explain(runner, "--key", NAMED_KEY, "GET", "/proxy/chat/completions")
    assert result.exit_code == 1
    assert "client: chat-app" in result.output.splitlines()
    assert "decision: refused: 403 method_not_allowed" in result.output


def test_the_envelope_is_explained_from_the_body(runner, mocked_upstream, tmp_path):
    envelope = tmp_path / "envelope.json"
    envelope.write_text(
        json.dumps({"method": "GET", "path": "/models/gpt", "query": {"a": [1, 2]}})
    )
    result = explain(runner, "--key", CHAT_KEY, "--body", str(envelope), "POST", "/proxy")
    assert result.exit_code == 0, result.output
    assert "path: /models/gpt matches allowedPaths pattern /models/*" in result.output
    assert f"upstream: GET {UPSTREAM}/models/gpt?a=1&a=2" in result.output


def test_a_preflight_is_answered_by_the_gateway(runner, mocked_upstream):
    result = explain(
        runner, "--origin", APP_ORIGIN, "-H", "Access-Control-Request-Method: POST",
        "OPTIONS", "/proxy/chat/completions",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "decision: answered by the gateway itself: 204" in result.output
    assert f"cors: a page on {APP_ORIGIN} can read the answer" in result.output


# Explain and a live request through the same app must agree on every request.
CASES = [
    ("GET", "/proxy/models", {"Authorization": f"Bearer {CHAT_KEY}"}),
    ("GET", "/proxy/models", {"Authorization": f"Bearer {READONLY_KEY}"}),
    ("DELETE", "/proxy/models", {"Authorization": f"Bearer {READONLY_KEY}"}),
    ("GET", "/proxy/models/a/b", {"Authorization": f"Bearer {CHAT_KEY}"}),
    ("GET", "/proxy/files/a/b?x=1", {"Authorization": f"Bearer {CHAT_KEY}"}),
    ("GET", "/proxy/files/%2e%2e/x", {"Authorization": f"Bearer {CHAT_KEY}"}),
    ("GET", "/proxy//evil.example/x", {"Authorization": f"Bearer {RAPID_KEY}"}),
    ("PUT", "/proxy/any/thing", {"x-api-key": RAPID_KEY}),
    ("POST", "/proxy/chat/completions", {"Authorization": f"Bearer {NAMED_KEY}"}),
    (
        "POST",
        "/proxy/chat/completions",
        {"Authorization": f"Bearer {NAMED_KEY}", "Origin": APP_ORIGIN},
    ),
    (
        "POST",
        "/proxy/chat/completions",
        {"Authorization": f"Bearer {NAMED_KEY}", "Origin": "https://x.example"},
    ),
    ("POST", "/proxy/chat/completions", {"Authorization": "Bearer " + "sha256:" + "0" * 64}),
    ("GET", "/proxy/models", {"Authorization": f"Bearer {CHAT_KEY}", "X-Bad": "a\x01b"}),
    ("GET", "/proxy/models", {}),
]


@pytest.mark.parametrize(("method", "path", "headers"), CASES)
def test_explain_agrees_with_the_live_request(app, runner, method, path, headers):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(
            method, re.compile(re.escape(UPSTREAM) + ".*"), lambda request: (200, {}, b"{}")
        )
        # werkzeug's client, like explain: Flask's adds a User-Agent of its own.
        live = Client(app).open(path, method=method, headers=headers)
        sent = mock.calls[0].request if mock.calls else None
        args = []
        for name, value in headers.items():
            if name == "Authorization":
                args += ["--key", value.removeprefix("Bearer ")]
            elif name == "Origin":
                args += ["--origin", value]
            else:
                args += ["-H", f"{name}: {value}"]
        result = explain(runner, *args, method, path)
        assert len(mock.calls) == (1 if sent else 0)  # explain itself sent nothing
    if sent is not None:
        assert live.status_code == 200 and result.exit_code == 0, result.output
        assert f"upstream: {method} {sent.url}" in result.output
        for name, value in sent.headers.items():
            if name == "X-Request-ID":  # each request's own id
                assert re.search(r"^  X-Request-ID: [0-9a-f]{16}$", result.output, re.M)
                continue
            masked = f"  {name}: (secret: set, {len(value)} characters)"
            assert f"  {name}: {value}" in result.output or masked in result.output
    else:
        assert result.exit_code == 1, result.output
        error = live.get_json()["error"]
        assert f"decision: refused: {live.status_code} {error}:" in result.output


def test_explain_shows_the_limits_and_never_spends_them(config_dict, tmp_path, mocked_upstream):
    from gateway import create_app

    from ..support import write_config

    config_dict["clients"]["chat-app"]["limits"] = {"requests": ["2/day"]}
    config_dict["clients"]["chat-app"]["allowedMethods"] = ["GET", "POST"]
    config_dict["clients"]["chat-app"]["allowedPaths"] = ["/models", "/chat/completions"]
    config_dict["clients"]["chat-app"]["allowedModels"] = ["m*"]
    config_dict["clients"]["chat-app"]["maxTokens"] = 10
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
            "GATEWAY_ENVIRON": CANARIES,
        }
    )
    runner = app.test_cli_runner()
    for _ in range(3):
        result = explain(runner, "--key", NAMED_KEY, "GET", "/proxy/models")
        assert result.exit_code == 0, result.output
        assert "limits: admitted now (RateLimit-Limit: 2, RateLimit-Remaining: 1" in result.output
    body = tmp_path / "body.json"
    body.write_text('{"model": "m-large", "max_tokens": 50}')
    refused = explain(
        runner, "--key", NAMED_KEY, "--body", str(body), "POST", "/proxy/chat/completions"
    )
    assert refused.exit_code == 1 and "max_tokens_not_allowed" in refused.output
    mocked_upstream.get(UPSTREAM + "/models", body="{}")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {NAMED_KEY}"}
    assert [client.get("/proxy/models", headers=auth).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]


def test_a_live_request_builds_no_explain_note(client, mocked_upstream, monkeypatch):
    def never(*args):
        raise AssertionError("an explain note was built on a live request")

    monkeypatch.setattr(explain_command, "_notes", never)
    monkeypatch.setattr(explain_command.Explanation, "around", never)
    monkeypatch.setattr(explain_command, "DryStore", never)
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", json={"id": "x"})
    answer = client.post("/proxy/chat/completions", json={"model": "m"}, headers=NAMED_AUTH)
    assert answer.status_code == 200
