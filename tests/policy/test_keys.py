"""Named clients, hashed keys, expiry and rotation: the format, the config, the requests."""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import requests
import responses

from bench.config_load import ENV, write_config
from gateway.config.load import parse_config
from gateway.config.source import load_config
from gateway.errors import ConfigError, PolicyError
from gateway.policy.keys import KEY_PATTERN, checksum_ok, instant, key_digest, key_item, new_key

from ..support import (
    CANARIES,
    CHAT_KEY,
    EARLY_KEY,
    EXPIRED_KEY,
    NAMED_KEY,
    NEXT_KEY,
    UPSTREAM,
    base_config,
    named_client,
)

ALL_KEYS = (CHAT_KEY, NAMED_KEY, NEXT_KEY, EXPIRED_KEY, EARLY_KEY)
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, CANARIES)
    for problem in info.value.problems:
        for key in ALL_KEYS:
            assert key not in problem, "a client key in a config problem"
    return info.value.problems


def with_named(**changes) -> dict:
    raw = base_config()
    raw["clients"]["chat-app"] = {**named_client(), **changes}
    return raw


# --- the key format ---------------------------------------------------------


def test_new_keys_have_the_documented_shape_and_a_valid_checksum():
    keys = {new_key() for _ in range(2000)}
    assert len(keys) == 2000
    for key in keys:
        assert re.fullmatch(KEY_PATTERN, key) and len(key) == 52
        assert checksum_ok(key)
    # Every base62 character turns up in the random part: nothing is fixed or skipped.
    assert set("".join(key[3:46] for key in keys)) == set(
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    )


def test_a_changed_character_fails_the_checksum():
    key = new_key()
    for i in range(3, len(key)):
        replacement = "A" if key[i] != "A" else "B"
        assert not checksum_ok(key[:i] + replacement + key[i + 1 :])
    assert not checksum_ok(key[:-1])
    assert not checksum_ok("gk_" + "a" * 49)
    assert not checksum_ok(key_item(key))


def test_the_scanner_pattern_finds_a_key_inside_text():
    key = new_key()
    found = re.findall(KEY_PATTERN, f'config = {{"token": "{key}"}}\nnext line')
    assert found == [key] and checksum_ok(found[0])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-31", datetime(2027, 1, 31, tzinfo=UTC)),
        (date(2027, 1, 31), datetime(2027, 1, 31, tzinfo=UTC)),
        ("2027-01-31T00:00:00Z", datetime(2027, 1, 31, tzinfo=UTC)),
        ("2027-01-31T02:00:00+02:00", datetime(2027, 1, 31, tzinfo=UTC)),
        (
            datetime(2027, 1, 31, 2, tzinfo=timezone(timedelta(hours=2))),
            datetime(2027, 1, 31, tzinfo=UTC),
        ),
    ],
)
def test_dates_and_date_times_become_utc(value, expected):
    assert instant(value) == expected


@pytest.mark.parametrize(
    "value", ["2027-01-31T00:00:00", datetime(2027, 1, 31), "31/01/2027", "soon", True, 20270131]
)
def test_ambiguous_or_malformed_dates_are_refused(value):
    with pytest.raises(ValueError):
        instant(value)


# --- the config ---------------------------------------------------------------


def test_a_named_client_takes_its_keys_and_its_name():
    config = parse_config(with_named(), CANARIES)
    client, item = config.client_for(NAMED_KEY, NOW)
    assert client.label == "chat-app"
    assert item.digest == key_digest(NAMED_KEY) and not item.plaintext
    # Rotation with overlap: the old and the new key open the same client.
    assert config.client_for(NEXT_KEY, NOW)[0] is client
    assert len(client.keys) == 4
    # Plaintext clients keep working next to it, named by position.
    assert config.client_for(CHAT_KEY, NOW)[0].label == "client#1"


def test_a_plaintext_client_may_carry_a_name():
    raw = base_config()
    raw["clients"][CHAT_KEY]["name"] = "legacy-chat"
    config = parse_config(raw, CANARIES)
    assert config.client_for(CHAT_KEY, NOW)[0].label == "legacy-chat"


@pytest.mark.parametrize(
    ("key", "moment", "code"),
    [
        (EXPIRED_KEY, NOW, "expired_client_key"),
        (EARLY_KEY, NOW, "invalid_client_key"),
        (NEXT_KEY, datetime(2019, 12, 31, 23, 59, tzinfo=UTC), "invalid_client_key"),
        # The boundaries: expires is the first moment refused, notBefore the first accepted.
        (EXPIRED_KEY, datetime(2021, 1, 31, tzinfo=UTC), "expired_client_key"),
        (key_item(NAMED_KEY), NOW, "invalid_client_key"),
        (key_item(NAMED_KEY)[7:], NOW, "invalid_client_key"),
        (key_digest(NAMED_KEY).hex().upper(), NOW, "invalid_client_key"),
        ("chat-app", NOW, "invalid_client_key"),
    ],
)
def test_keys_outside_their_window_and_hashes_are_refused(key, moment, code):
    config = parse_config(with_named(), CANARIES)
    with pytest.raises(PolicyError) as info:
        config.client_for(key, moment)
    assert info.value.code == code


def test_window_boundaries_accept_inside():
    config = parse_config(with_named(), CANARIES)
    assert config.client_for(NEXT_KEY, datetime(2020, 1, 1, tzinfo=UTC))[0].label == "chat-app"
    just_before = datetime(2021, 1, 30, 23, 59, 59, tzinfo=UTC)
    assert config.client_for(EXPIRED_KEY, just_before)[0].label == "chat-app"


HASH = key_item(NAMED_KEY)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_named(keys=["sha256:abc"]), "clients.chat-app.keys[0]: must be sha256:<64 hex"),
        (with_named(keys=[HASH.upper()]), "clients.chat-app.keys[0]: must be sha256:<64 hex"),
        (with_named(keys=[NAMED_KEY]), "clients.chat-app.keys[0]: holds a key, not its hash"),
        (
            with_named(keys=[{"sha256": NAMED_KEY}]),
            "clients.chat-app.keys[0].sha256: holds a key, not its hash",
        ),
        (with_named(keys=[]), "clients.chat-app.keys: must not be empty"),
        (
            with_named(keys=[{"expires": "2027-01-01"}]),
            "clients.chat-app.keys[0].sha256: is required",
        ),
        (
            with_named(keys=[{"sha256": HASH[7:], "expires": "next week"}]),
            "clients.chat-app.keys[0].expires: must be an ISO 8601 date",
        ),
        (
            with_named(keys=[{"sha256": HASH[7:], "expires": "2027-01-31T00:00:00"}]),
            "clients.chat-app.keys[0].expires: a date-time needs a UTC offset",
        ),
        (
            with_named(
                keys=[{"sha256": HASH[7:], "notBefore": "2027-02-01", "expires": "2027-01-31"}]
            ),
            "clients.chat-app.keys[0].notBefore: must be before expires",
        ),
        (
            with_named(keys=[{"sha256": HASH[7:], "expiers": "2027-01-31"}]),
            "clients.chat-app.keys[0].expiers: unknown field; did you mean expires?",
        ),
        (
            with_named(keys=[42]),
            "clients.chat-app.keys[0]: must be sha256:<64 hex digits>, or a map",
        ),
        (
            with_named(name="other"),
            "clients.chat-app.name: a client with keys is named by its map key",
        ),
    ],
)
def test_key_item_problems_are_located(raw, expected):
    problems = problems_of(raw)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("name", ["Chat-App", "-chat", ".", "..", "a" * 65, "chat app", "chät"])
def test_a_name_that_breaks_the_rule_is_refused_without_echoing_it(name):
    raw = base_config()
    raw["clients"][name] = named_client()
    problems = problems_of(raw)
    assert problems == [
        "clients.client#4: a client with keys is named by its map key, which must be lowercase "
        "letters, digits, -, _ or ., start with a letter or digit, and be at most 64 characters"
    ]


def test_a_plaintext_key_given_keys_by_mistake_is_not_echoed():
    raw = base_config()
    raw["clients"]["Ck-Test-Named-0123456789"] = named_client()
    assert not any("Ck-Test" in p for p in problems_of(raw))


def test_the_same_key_under_two_clients_is_refused():
    raw = with_named()
    raw["clients"]["other-app"] = {**named_client(), "keys": [key_item(NEXT_KEY)]}
    raw["clients"]["third-app"] = {**named_client(), "keys": [key_item(CHAT_KEY)]}
    raw["clients"]["fourth-app"] = {**named_client(), "keys": [HASH, HASH]}
    problems = problems_of(raw)
    assert sorted(problems) == sorted(
        [
            "clients.other-app.keys[0]: the same key as clients.chat-app.keys[1]; "
            "a key belongs to one client, listed once",
            "clients.third-app.keys[0]: the same key as clients.client#1; "
            "a key belongs to one client, listed once",
            "clients.fourth-app.keys[0]: the same key as clients.chat-app.keys[0]; "
            "a key belongs to one client, listed once",
            "clients.fourth-app.keys[1]: the same key as clients.chat-app.keys[0]; "
            "a key belongs to one client, listed once",
        ]
    )


def test_a_name_used_twice_is_refused():
    raw = with_named()
    raw["clients"][CHAT_KEY]["name"] = "chat-app"
    problems = problems_of(raw)
    assert problems == [
        "clients.client#4: the name 'chat-app' is already used by client#1; names must be unique"
    ]


def test_a_hash_as_a_plaintext_map_key_is_refused():
    raw = base_config()
    raw["clients"][HASH] = raw["clients"].pop(CHAT_KEY)
    problems = problems_of(raw)
    assert any(p.startswith("clients.client#3: the map key is a key hash") for p in problems)
    assert not any(HASH in p for p in problems)


def test_every_key_problem_is_reported_at_once():
    raw = with_named(keys=["sha256:bad", {"sha256": HASH[7:], "expires": "x", "notBefore": "y"}])
    raw["clients"]["Bad Name"] = named_client()
    raw["clients"]["other-app"] = {**named_client(), "keys": [key_item(CHAT_KEY)]}
    assert len(problems_of(raw)) == 5


def test_ten_thousand_clients_load_each_key_finds_its_client(tmp_path):
    # The time it takes is held in the benchmark (python -m bench.config_load), not here.
    path = tmp_path / "c.yaml"
    write_config(path, 10_000)
    config = load_config(path, ENV)
    assert len(config.clients) == 10_000 and len(config.keys) == 12_500
    for i in (0, 1, 4999, 9999):
        digest = key_digest(f"key-{i}")
        assert config.keys[digest][0].label == f"app-{i:05d}"


# --- requests ----------------------------------------------------------------


@pytest.fixture
def config_dict(config_dict):
    config_dict["clients"]["chat-app"] = named_client()
    return config_dict


def call(client, key):
    return client.post(
        "/proxy",
        json={"method": "POST", "path": "/chat/completions"},
        headers={"Authorization": f"Bearer {key}"},
    )


@pytest.mark.parametrize("key", [NAMED_KEY, NEXT_KEY])
def test_each_active_key_reaches_the_upstream_with_the_secret(client, mocked_upstream, key):
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", json={"ok": 1})
    response = call(client, key)
    assert response.status_code == 200
    sent = mocked_upstream.calls[0].request.headers
    assert sent["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert key not in str(sent)


@pytest.mark.parametrize(
    ("key", "code", "message"),
    [
        (EXPIRED_KEY, "expired_client_key", "The client key expired at 2021-01-31T00:00:00Z."),
        (EARLY_KEY, "invalid_client_key", "The client key is not valid yet."),
        (HASH, "invalid_client_key", "The client key is not known to this gateway."),
        (HASH[7:], "invalid_client_key", "The client key is not known to this gateway."),
    ],
)
def test_refused_keys_get_401_and_nothing_is_forwarded(client, mocked_upstream, key, code, message):
    response = call(client, key)
    assert response.status_code == 401
    request_id = response.headers["X-Gateway-Request-Id"]
    assert response.get_json() == {"error": code, "message": message, "request_id": request_id}
    assert "invalid_token" in response.headers["WWW-Authenticate"]
    assert len(mocked_upstream.calls) == 0


def test_logs_name_the_client_never_the_key(client, mocked_upstream, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    mocked_upstream.add(
        responses.POST, f"{UPSTREAM}/chat/completions", body=requests.exceptions.ConnectionError()
    )
    for key in (EXPIRED_KEY, EARLY_KEY, NAMED_KEY, "ck-unknown-key-0123456789"):
        call(client, key)
    text = caplog.text
    assert "chat-app: a client key that expired at 2021-01-31T00:00:00Z was used" in text
    assert "chat-app: a client key that is not valid yet was used" in text
    assert "chat-app: upstream api" in text  # the upstream failure names the client too
    for key in (*ALL_KEYS, "ck-unknown-key-0123456789", HASH[7:]):
        assert key not in text


@pytest.mark.parametrize("key", [NAMED_KEY, NEXT_KEY])
def test_a_hashed_key_opens_its_named_client_and_the_secret_arrives(
    live_gateway, fake_upstream, key
):
    response = requests.post(
        live_gateway.url + "/proxy/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    seen = fake_upstream.last("/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert key not in str(seen.headers) + seen.body.decode()


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (EXPIRED_KEY, "expired_client_key"),
        (EARLY_KEY, "invalid_client_key"),
        (key_item(NAMED_KEY), "invalid_client_key"),
        (key_item(NAMED_KEY)[7:], "invalid_client_key"),
    ],
)
def test_expired_early_and_hash_keys_get_401_under_gunicorn(live_gateway, fake_upstream, key, code):
    before = len(fake_upstream.seen)
    response = requests.post(
        live_gateway.url + "/proxy/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error"] == code
    assert len(fake_upstream.seen) == before
    if code == "expired_client_key":
        deadline = time.monotonic() + 5
        while "chat-app: a client key that expired at" not in live_gateway.log_text():
            assert time.monotonic() < deadline, "the expired key's use was not logged"
            time.sleep(0.05)
