"""Browser sessions in-process: the token rule, the config, minting and refusals."""

from __future__ import annotations

import base64
import json
import time

import pytest

from gateway import create_app
from gateway.config.load import parse_config
from gateway.errors import ConfigError, PolicyError
from gateway.policy.keys import key_item
from gateway.policy.sessions import SessionKeys, check_user, format_ttl, parse_ttl

from ..support import CANARIES, base_config, write_config

SECRET = "session-secret-canary-0123456789abcdef"  # 38 characters
OLD_SECRET = "session-secret-old-canary-0123456789abcd"
WEB_KEY = "ck-test-web-chat-0123456789"
PLAIN_KEY = "ck-test-plain-0123456789"
ORIGIN = "https://app.example.com"
ENV = {**CANARIES, "SESSION_SECRET": SECRET, "OLD_SESSION_SECRET": OLD_SECRET}


def session_config(upstream: str = "http://upstream.test/v1") -> dict:
    """Return a config with ``web-chat`` (sessions, 3/minute per user) and ``plain`` (none)."""
    config = base_config(upstream)
    config["secrets"]["sessions"] = "${SESSION_SECRET}"
    config["secrets"]["old-sessions"] = "${OLD_SESSION_SECRET}"
    config["sessionSecretRef"] = "sessions"
    client = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["GET", "POST"],
        "allowedPaths": ["/chat/completions", "/models"],
        "allowedOrigins": [ORIGIN, "https://other.example.com"],
    }
    config["clients"]["web-chat"] = {
        **client,
        "keys": [key_item(WEB_KEY)],
        "sessions": {"ttl": "15m", "limits": {"requests": ["3/minute"], "concurrent": 2}},
    }
    config["clients"]["plain"] = {**client, "keys": [key_item(PLAIN_KEY)]}
    return config


# --- the token rule ---------------------------------------------------------------------


def test_a_minted_token_verifies_and_says_what_it_was_minted_for():
    keys = SessionKeys([SECRET])
    session = keys.mint("web-chat", "user 42", ORIGIN, 600, 1_000_000)
    token = keys.token(session)
    assert token.startswith("gs_")
    assert SECRET not in token
    assert keys.verify(token, 1_000_001) == session
    assert session.expires == 1_000_600 and session.scope == "user:web-chat:user 42"


def _resigned(token: str, **changes) -> str:
    """Return ``token`` with its claims changed and its old signature kept."""
    text, mac = token[3:].split(".")
    claims = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"gs_{encoded}.{mac}"


@pytest.mark.parametrize(
    ("change", "reason"),
    (
        ({"u": "someone-else"}, "signature"),
        ({"c": "plain"}, "signature"),
        ({"o": "https://evil.example"}, "signature"),
        ({"e": 2_000_000_000}, "signature"),
        ({"k": "AAAAAAAA"}, "secret this gateway does not hold"),
    ),
)
def test_a_changed_claim_breaks_the_signature(change, reason):
    keys = SessionKeys([SECRET])
    token = keys.token(keys.mint("web-chat", "alice", ORIGIN, 600, time.time()))
    with pytest.raises(PolicyError) as caught:
        keys.verify(_resigned(token, **change), time.time())
    assert caught.value.code == "invalid_session_token" and reason in caught.value.reason


@pytest.mark.parametrize(
    "token",
    ("gs_", "gs_abc", "gs_x.y", "gs_" + "A" * 3000 + "." + "B" * 43, "gk_abc.def"),
)
def test_garbage_is_an_invalid_token(token):
    with pytest.raises(PolicyError) as caught:
        SessionKeys([SECRET]).verify(token, time.time())
    assert caught.value.code == "invalid_session_token"


def test_a_flipped_signature_byte_is_refused():
    keys = SessionKeys([SECRET])
    token = keys.token(keys.mint("web-chat", "alice", ORIGIN, 600, time.time()))
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(PolicyError, match="invalid_session_token"):
        keys.verify(flipped, time.time())


def test_an_expired_token_is_expired_not_invalid():
    keys = SessionKeys([SECRET])
    token = keys.token(keys.mint("web-chat", "alice", ORIGIN, 1, 1_000_000))
    keys.verify(token, 1_000_000.5)
    with pytest.raises(PolicyError) as caught:
        keys.verify(token, 1_000_001)
    assert caught.value.code == "expired_session_token"


def test_rotation_the_new_secret_signs_both_verify_and_a_dropped_one_no_longer_does():
    before = SessionKeys([OLD_SECRET])
    old_token = before.token(before.mint("web-chat", "alice", ORIGIN, 600, time.time()))
    during = SessionKeys([SECRET, OLD_SECRET])
    new_token = during.token(during.mint("web-chat", "alice", ORIGIN, 600, time.time()))
    assert during.verify(old_token, time.time()).user == "alice"
    after = SessionKeys([SECRET])
    assert after.verify(new_token, time.time()).user == "alice"
    with pytest.raises(PolicyError, match="invalid_session_token"):
        after.verify(old_token, time.time())


@pytest.mark.parametrize(
    ("text", "seconds"), (("1s", 1), ("90s", 90), ("15m", 900), ("24h", 86400))
)
def test_ttl_durations(text, seconds):
    assert parse_ttl(text) == seconds
    assert parse_ttl(format_ttl(seconds)) == seconds


@pytest.mark.parametrize("text", ("", "0s", "25h", "1441m", "15", "15 m", "1d", 900, None))
def test_ttl_that_is_not_a_duration_up_to_a_day_is_refused(text):
    with pytest.raises(ValueError, match="at most 24h"):
        parse_ttl(text)


@pytest.mark.parametrize("user", ("", "x" * 129, "line\nbreak", "tab\there", 42))
def test_user_ids_are_1_to_128_printable_characters(user):
    with pytest.raises(ValueError):
        check_user(user)
    assert check_user("alice@example.com") == "alice@example.com"


# --- the config -------------------------------------------------------------------------


def _problems(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(config, ENV)
    return caught.value.problems


def test_the_session_config_loads():
    config = parse_config(session_config(), ENV)
    client = config.by_label["web-chat"]
    assert client.sessions.ttl == 900 and client.sessions.limits.requests[0].count == 3
    assert config.by_label["plain"].sessions is None
    assert SECRET not in repr(config)


def test_sessions_without_a_secret_is_a_problem():
    config = session_config()
    del config["sessionSecretRef"]
    assert any("needs sessionSecretRef" in p for p in _problems(config))


def test_a_short_session_secret_is_a_problem_and_is_not_echoed():
    config = session_config()
    config["secrets"]["sessions"] = "short-secret"
    problems = _problems(config)
    assert any("shorter than 32" in p for p in problems)
    assert not any("short-secret" in p for p in problems)


def test_both_secret_forms_at_once_is_a_problem():
    config = session_config()
    config["sessionSecretRefs"] = ["sessions", "old-sessions"]
    assert any("not both" in p for p in _problems(config))


@pytest.mark.parametrize(
    ("sessions", "where"),
    (
        ({"ttl": "48h"}, "clients.web-chat.sessions.ttl: must be a duration"),
        ({"ttl": 900}, "clients.web-chat.sessions.ttl"),
        ({"limits": {"requests": ["3/fortnight"]}}, "clients.web-chat.sessions.limits.requests"),
        ({"notBefore": "2026-01-01T00:00:00"}, "clients.web-chat.sessions.notBefore: a date"),
        ({"tll": "1m"}, "clients.web-chat.sessions.tll: unknown field; did you mean ttl?"),
    ),
)
def test_session_entries_are_checked_with_their_location(sessions, where):
    config = session_config()
    config["clients"]["web-chat"]["sessions"] = sessions
    assert any(p.startswith(where) for p in _problems(config)), _problems(config)


def test_sessions_need_allowed_origins():
    config = session_config()
    del config["clients"]["web-chat"]["allowedOrigins"]
    assert any("needs allowedOrigins" in p for p in _problems(config))


# --- minting and using in-process -------------------------------------------------------


@pytest.fixture
def session_app(tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", session_config()),
            "GATEWAY_ENVIRON": ENV,
        }
    )
    return app


def _mint(client, key=WEB_KEY, **body):
    body = {"user": "alice", "origin": ORIGIN, **body}
    return client.post("/sessions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_minting_answers_201_with_the_token_and_no_cors(session_app):
    client = session_app.test_client()
    answer = client.post(
        "/sessions",
        json={"user": "alice", "origin": ORIGIN, "ttl": "10m"},
        headers={"Authorization": f"Bearer {WEB_KEY}", "Origin": ORIGIN},
    )
    assert answer.status_code == 201, answer.json
    assert set(answer.json) == {"token", "user", "origin", "expires"}
    assert answer.json["token"].startswith("gs_") and answer.json["user"] == "alice"
    assert answer.json["expires"].endswith("Z")
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert answer.headers["Cache-Control"] == "no-store"
    preflight = client.options(
        "/sessions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.mark.parametrize(
    ("key", "body", "status", "code"),
    (
        (PLAIN_KEY, {}, 403, "sessions_not_allowed"),
        (WEB_KEY, {"origin": "https://evil.example"}, 403, "origin_not_allowed"),
        (WEB_KEY, {"ttl": "16m"}, 400, "invalid_session_request"),
        (WEB_KEY, {"user": ""}, 400, "invalid_session_request"),
        (WEB_KEY, {"origin": "https://app.example.com/"}, 400, "invalid_session_request"),
        (WEB_KEY, {"extra": 1}, 400, "invalid_session_request"),
        ("ck-nobody", {}, 401, "invalid_client_key"),
    ),
)
def test_minting_refusals(session_app, key, body, status, code):
    answer = _mint(session_app.test_client(), key, **body)
    assert (answer.status_code, answer.json["error"]) == (status, code), answer.json
    if code == "invalid_session_request":
        assert answer.json["fields"]


def test_a_session_token_cannot_mint_another(session_app):
    client = session_app.test_client()
    token = _mint(client).json["token"]
    answer = _mint(client, token)
    assert (answer.status_code, answer.json["error"]) == (401, "invalid_client_key")


def test_a_token_is_refused_without_origin_or_from_another_and_is_held_to_its_clients_paths(
    session_app,
):
    client = session_app.test_client()
    token = _mint(client).json["token"]
    auth = {"Authorization": f"Bearer {token}"}
    for origin in (None, "https://other.example.com"):
        headers = auth if origin is None else {**auth, "Origin": origin}
        answer = client.get("/proxy/models", headers=headers)
        assert (answer.status_code, answer.json["error"]) == (403, "origin_not_allowed")
    answer = client.get("/proxy/files/1", headers={**auth, "Origin": ORIGIN})
    assert (answer.status_code, answer.json["error"]) == (403, "path_not_allowed")


def test_explain_describes_a_session_token(session_app):
    token = _mint(session_app.test_client()).json["token"]
    result = session_app.test_cli_runner().invoke(
        args=["explain", "--key", token, "--origin", ORIGIN, "GET", "/proxy/models"]
    )
    assert "client: web-chat" in result.output
    assert "session: user 'alice' on https://app.example.com" in result.output
    assert "is the token's origin and in allowedOrigins" in result.output
    assert "decision: forwarded" in result.output, result.output
    assert token not in result.output and SECRET not in result.output
    refused = session_app.test_cli_runner().invoke(
        args=["explain", "--key", token + "x", "--origin", ORIGIN, "GET", "/proxy/models"]
    )
    assert "refused: 401 invalid_session_token" in refused.output, refused.output
