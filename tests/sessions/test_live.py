"""Browser sessions on the real gateway: two gunicorn gateways sharing a secret and a store."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import openai
import pytest
import requests

from gateway.errors import read_error
from gateway.policy.keys import key_item

from ..live_gateway import LiveGateway
from ..spend.test_live import RedisServer
from ..support import error_code, need_redis_server, write_config
from .test_tokens import ENV, OLD_SECRET, ORIGIN, PLAIN_KEY, SECRET, WEB_KEY, session_config

LIMITED_KEY = "ck-test-per-user-0123456789"
BURST_KEY = "ck-test-burst-user-0123456789"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}


def live_session_config(upstream_url: str, storage: str) -> dict:
    """``web-chat`` and ``plain`` of the unit tests, plus clients with per-user limits."""
    config = session_config(upstream_url + "/v1")
    config["limits"] = {"storage": storage}
    web = config["clients"]["web-chat"]
    web["sessions"] = {"ttl": "15m"}
    config["clients"]["per-user"] = {
        **web,
        "keys": [key_item(LIMITED_KEY)],
        "limits": {"requests": ["5/minute"]},  # the client's own: users A and B together
        "sessions": {"ttl": "15m", "limits": {"requests": ["3/minute"]}},
    }
    config["clients"]["burst"] = {
        **web,
        "keys": [key_item(BURST_KEY)],
        "sessions": {"limits": {"requests": ["5/hour"], "concurrent": 100}},
    }
    return config


def _start(config: dict, folder, count: int = 2, workers: int = 2) -> list[LiveGateway]:
    path = write_config(folder / "config.yaml", config)
    return [
        LiveGateway(
            path, ENV, folder / f"gunicorn-{i}.log", folder / f"access-{i}.log", workers=workers
        ).start()
        for i in range(count)
    ]


def _stop_and_check_logs(gateways: list[LiveGateway], tokens: list[str]) -> None:
    for gateway in gateways:
        gateway.stop()
    for gateway in gateways:
        log = gateway.log_text()
        for secret in (SECRET, OLD_SECRET):
            assert secret not in log, "a session secret reached the gateway's log"
        for token in tokens:
            assert token not in log, "a session token reached the gateway's log"
        assert "gs_" not in log, "something like a session token reached the gateway's log"


MINTED: list[str] = []  # every token the tests got: none may be in any log


@pytest.fixture(scope="module")
def sqlite_pair(fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sessions")
    config = live_session_config(fake_upstream.url, f"sqlite:///{folder}/limits.sqlite3")
    gateways = _start(config, folder)
    yield gateways
    _stop_and_check_logs(gateways, MINTED)


@pytest.fixture(scope="module")
def redis_pair(fake_upstream, tmp_path_factory):
    need_redis_server()
    folder = tmp_path_factory.mktemp("sessions-redis")
    redis = RedisServer(folder).start()
    config = live_session_config(fake_upstream.url, f"redis://127.0.0.1:{redis.port}/0")
    gateways = _start(config, folder)
    yield gateways
    _stop_and_check_logs(gateways, MINTED)
    redis.stop()


def mint(gateway, key=WEB_KEY, **body) -> requests.Response:
    answer = requests.post(
        gateway.url + "/sessions",
        json={"user": "alice", "origin": ORIGIN, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    if answer.status_code == 201:
        MINTED.append(answer.json()["token"])
    return answer


def token_of(gateway, key=WEB_KEY, **body) -> str:
    answer = mint(gateway, key, **body)
    assert answer.status_code == 201, answer.text
    return answer.json()["token"]


def as_page(token: str, origin: str | None = ORIGIN) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if origin is not None:
        headers["Origin"] = origin
    return headers


def _chat(gateway, token, origin=ORIGIN) -> requests.Response:
    return requests.post(
        gateway.url + "/proxy/chat/completions",
        json=CHAT,
        headers=as_page(token, origin),
        timeout=20,
    )


# --- minting and using ------------------------------------------------------------------


def test_a_minted_token_works_from_its_origin_in_both_modes(sqlite_pair, fake_upstream):
    gateway = sqlite_pair[0]
    answer = mint(gateway, ttl="10m")
    assert answer.status_code == 201
    body = answer.json()
    assert body["user"] == "alice" and body["origin"] == ORIGIN
    expires = datetime.fromisoformat(body["expires"])
    assert 590 <= (expires - datetime.now(UTC)).total_seconds() <= 601
    assert "Access-Control-Allow-Origin" not in answer.headers

    transparent = _chat(gateway, body["token"])
    assert transparent.status_code == 200, transparent.text
    assert transparent.headers["Access-Control-Allow-Origin"] == ORIGIN
    seen = fake_upstream.last("/v1/chat/completions")
    assert body["token"] not in str(seen.headers)  # the upstream gets the secret, not the token
    line = gateway.access_line(transparent.headers["X-Gateway-Request-Id"])
    assert (line["client"], line["user"]) == ("web-chat", "alice")

    envelope = requests.post(
        gateway.url + "/proxy",
        json={"method": "GET", "path": "/models"},
        headers={**as_page(body["token"]), "Content-Type": "application/json"},
        timeout=10,
    )
    assert envelope.status_code == 200 and envelope.json()["data"][0]["id"] == "gpt-test"
    x_api_key = requests.get(
        gateway.url + "/proxy/models",
        headers={"x-api-key": body["token"], "Origin": ORIGIN},
        timeout=10,
    )
    assert x_api_key.status_code == 200


def test_the_openai_sdk_with_a_session_token_incl_streaming(sqlite_pair, fake_upstream):
    gateway = sqlite_pair[1]
    client = openai.OpenAI(
        base_url=gateway.url + "/proxy",
        api_key=token_of(gateway, user="sdk-user"),
        default_headers={"Origin": ORIGIN},
        max_retries=0,
    )
    completion = client.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == "Hello from the fake upstream"
    stream = client.chat.completions.create(
        model="lockstep", messages=CHAT["messages"], stream=True
    )
    words = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
            fake_upstream.release.release()
    assert words == ["Hello", " from", " the", " fake", " upstream"]


# --- refusals ---------------------------------------------------------------------------


def _refusal(answer: requests.Response) -> tuple[int, str]:
    return answer.status_code, error_code(answer.json())


def test_refused_from_another_origin_and_without_origin(sqlite_pair):
    gateway = sqlite_pair[0]
    token = token_of(gateway)
    assert _refusal(_chat(gateway, token, "https://other.example.com")) == (
        403,
        "origin_not_allowed",
    )
    assert _refusal(_chat(gateway, token, None)) == (403, "origin_not_allowed")


def test_refused_with_a_tampered_signature_or_claims(sqlite_pair):
    from .test_tokens import _resigned

    gateway = sqlite_pair[0]
    token = token_of(gateway)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert _refusal(_chat(gateway, flipped)) == (401, "invalid_session_token")
    other_user = _resigned(token, u="bob")
    assert _refusal(_chat(gateway, other_user)) == (401, "invalid_session_token")


def test_a_token_is_for_its_own_client_only(sqlite_pair):
    from .test_tokens import _resigned

    gateway = sqlite_pair[0]
    token = token_of(gateway)
    # Re-labelled for another client: the signature no longer matches.
    assert _refusal(_chat(gateway, _resigned(token, c="per-user"))) == (
        401,
        "invalid_session_token",
    )
    # A client without sessions can be named by no token at all.
    assert _refusal(_chat(gateway, _resigned(token, c="plain"))) == (401, "invalid_session_token")
    # The token carries its own client's policy: a path only another client allows stays shut.
    answer = requests.get(gateway.url + "/proxy/files/1", headers=as_page(token), timeout=10)
    assert _refusal(answer) == (403, "path_not_allowed")


def test_refused_when_expired(sqlite_pair):
    gateway = sqlite_pair[0]
    token = token_of(gateway, ttl="1s")
    time.sleep(2.1)
    answer = _chat(gateway, token)
    assert _refusal(answer) == (401, "expired_session_token")
    assert "expired at" in read_error(answer.json())[1]


@pytest.mark.parametrize(
    ("key", "body", "expected"),
    (
        (PLAIN_KEY, {}, (403, "sessions_not_allowed")),
        (WEB_KEY, {"origin": "https://evil.example.com"}, (403, "origin_not_allowed")),
        (WEB_KEY, {"ttl": "16m"}, (400, "invalid_session_request")),
    ),
)
def test_minting_refusals(sqlite_pair, key, body, expected):
    assert _refusal(mint(sqlite_pair[0], key, **body)) == expected


def test_a_session_token_presented_to_sessions_mints_nothing(sqlite_pair):
    gateway = sqlite_pair[0]
    assert _refusal(mint(gateway, token_of(gateway))) == (401, "invalid_client_key")


# --- per-user limits --------------------------------------------------------------------


def _clear_of_minute_edge() -> None:
    """Wait if the minute window ends within 5 s: the counts must stay in one window."""
    left = 60 - time.time() % 60
    if left < 5:
        time.sleep(left + 0.1)


def test_user_a_exhausts_3_per_minute_user_b_is_admitted_and_the_client_caps_both(sqlite_pair):
    one, two = sqlite_pair
    _clear_of_minute_edge()
    a = token_of(one, LIMITED_KEY, user="user-a")
    b = token_of(two, LIMITED_KEY, user="user-b")
    assert [_chat(one, a).status_code for _ in range(3)] == [200] * 3
    refused = _chat(two, a)
    assert _refusal(refused) == (429, "rate_limited")
    assert (
        refused.headers["RateLimit-Remaining"] == "0" and int(refused.headers["Retry-After"]) >= 1
    )
    assert "session's user" in read_error(refused.json())[1]
    # B has its own 3, but the client's 5/minute is shared: 2 left for B.
    statuses = [_chat(one if i % 2 else two, b).status_code for i in range(3)]
    assert statuses == [200, 200, 429], statuses
    assert _refusal(_chat(one, b)) == (429, "rate_limited")


def _burst(gateways, token: str, count: int) -> list[int]:
    barrier = threading.Barrier(count)

    def one(i: int) -> int:
        barrier.wait()
        answer = requests.get(
            gateways[i % len(gateways)].url + "/proxy/models", headers=as_page(token), timeout=20
        )
        return answer.status_code

    with ThreadPoolExecutor(count) as pool:
        return sorted(pool.map(one, range(count)))


@pytest.mark.parametrize("pair", ("sqlite_pair", "redis_pair"))
def test_two_gateways_accept_each_others_tokens_and_count_a_user_exactly(pair, request):
    gateways = request.getfixturevalue(pair)
    carol = token_of(gateways[0], BURST_KEY, user="carol")
    dave = token_of(gateways[1], BURST_KEY, user="dave")
    assert _burst(gateways, carol, 16) == [200] * 5 + [429] * 11
    assert _burst(gateways, dave, 8) == [200] * 5 + [429] * 3  # dave's own five


def test_usage_by_user(sqlite_pair, tmp_path):
    from gateway import create_app

    gateway = sqlite_pair[0]
    token = token_of(gateway, user="usage-user")
    assert _chat(gateway, token).status_code == 200
    app = create_app({"GATEWAY_CONFIG": gateway.env["GATEWAY_CONFIG"], "GATEWAY_ENVIRON": ENV})
    runner = app.test_cli_runner()
    deadline = time.monotonic() + 6  # each worker writes its usage rows within a second
    while True:
        result = runner.invoke(args=["usage", "--by", "user", "--client", "web-chat"])
        assert result.exit_code == 0, result.output
        if "usage-user" in result.output or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "usage-user" in result.output and "user-a" not in result.output
    assert (
        "usage-user"
        not in runner.invoke(args=["usage", "--by", "user", "--client", "plain"]).output
    )


# --- notBefore and secret rotation (reloaded with HUP) ----------------------------------


def _reload(gateway: LiveGateway, config: dict, folder) -> None:
    old = gateway.worker_pids()
    write_config(folder / "config.yaml", config)
    os.kill(gateway.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 60
    while old & gateway.worker_pids() or len(gateway.loaded_workers()) < 1:
        assert time.monotonic() < deadline, gateway.log_text()[-2000:]
        time.sleep(0.1)


@pytest.fixture
def alone(fake_upstream, tmp_path):
    config = live_session_config(fake_upstream.url, f"sqlite:///{tmp_path}/limits.sqlite3")
    (gateway,) = _start(config, tmp_path, count=1, workers=1)
    yield gateway, config
    _stop_and_check_logs([gateway], MINTED)


def test_not_before_refuses_the_tokens_minted_earlier(alone, tmp_path):
    gateway, config = alone
    early = token_of(gateway)
    time.sleep(1.1)  # tokens count whole seconds
    edited = copy.deepcopy(config)
    edited["clients"]["web-chat"]["sessions"]["notBefore"] = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    _reload(gateway, edited, tmp_path)
    assert _refusal(_chat(gateway, early)) == (401, "invalid_session_token")
    assert _chat(gateway, token_of(gateway)).status_code == 200


def test_rotating_the_secret_keeps_old_tokens_during_the_overlap_only(alone, tmp_path):
    gateway, config = alone
    config = copy.deepcopy(config)
    config["sessionSecretRef"] = "old-sessions"
    _reload(gateway, config, tmp_path)
    old = token_of(gateway)
    del config["sessionSecretRef"]
    config["sessionSecretRefs"] = ["sessions", "old-sessions"]
    _reload(gateway, config, tmp_path)
    new = token_of(gateway)
    assert _chat(gateway, old).status_code == 200
    assert _chat(gateway, new).status_code == 200
    config["sessionSecretRefs"] = ["sessions"]
    _reload(gateway, config, tmp_path)
    assert _refusal(_chat(gateway, old)) == (401, "invalid_session_token")
    assert _chat(gateway, new).status_code == 200
