"""Spend control on the real gateway: two gateways of two workers each sharing one store."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from ..live_gateway import ROOT, LiveGateway, free_port
from ..support import CANARIES, error_code, need_redis_server, write_config

KEYS = {
    name: f"ck-spend-{name}-0123456789"
    for name in (
        "burst", "conc", "leaver", "killed", "budget", "models", "usage", "load", "free",
        "locked", "reserved",
    )
}  # fmt: skip
CHAT = {"model": "gpt-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}


def _config(upstream_url: str, storage: str) -> dict:
    client = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["GET", "POST"],
        "allowedPaths": ["/**"],
    }
    limits = {
        "burst": {"limits": {"requests": ["5/day"]}},
        "conc": {"limits": {"concurrent": 2}},
        "leaver": {"limits": {"concurrent": 1}},
        "killed": {"limits": {"concurrent": 1}},
        "budget": {"limits": {"tokens": ["1000/day"]}, "maxTokens": 100},
        "models": {"allowedModels": ["gpt-test*"], "maxTokens": 50},
        "usage": {"limits": {"tokens": ["10000000/day"]}},
        "load": {
            "limits": {"requests": ["1000000/day"], "concurrent": 1000, "tokens": ["100000000/day"]}
        },
        "free": {},
        "locked": {"limits": {"concurrent": 1}},
        "reserved": {"limits": {"tokens": ["1000/day"]}, "maxTokens": 100},
    }
    clients = {KEYS[name]: {**client, "name": name, **extra} for name, extra in limits.items()}
    clients[KEYS["usage"] + "-anthropic"] = {
        "name": "usage-anthropic",
        "target": "anthropic",
        "secretHeaders": {"x-api-key": "anthropic"},
        "allowedMethods": ["POST"],
        "allowedPaths": ["/v1/messages"],
        "limits": {"tokens": ["10000000/day"]},
    }
    return {
        "limits": {"storage": storage},
        "targets": {
            "api": {"baseUrl": upstream_url + "/v1"},
            "anthropic": {"baseUrl": upstream_url},
        },
        "secrets": {"openai": "Bearer ${CANARY_OPENAI}", "anthropic": "${CANARY_ANTHROPIC}"},
        "clients": clients,
    }


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def sqlite_pair(fake_upstream, tmp_path_factory):
    """Two gateways (two workers each) sharing one SQLite file; 6 s worker timeout and lease."""
    folder = tmp_path_factory.mktemp("spend")
    config = write_config(
        folder / "config.yaml",
        _config(fake_upstream.url, f"sqlite:///{folder}/limits.sqlite3"),
    )
    gateways = [
        LiveGateway(config, CANARIES, folder / f"gunicorn-{i}.log", worker_timeout=6).start()
        for i in range(2)
    ]
    yield gateways
    for gateway in gateways:
        gateway.stop()


def _burst(gateways, name: str, count: int, call) -> list[requests.Response]:
    barrier = threading.Barrier(count)

    def one(i: int) -> requests.Response:
        barrier.wait()
        return call(gateways[i % len(gateways)], name)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _models(gateway, name):
    return requests.get(gateway.url + "/proxy/models", headers=_auth(name), timeout=20)


def test_a_burst_of_16_against_5_per_day_across_two_gateways_admits_exactly_5(sqlite_pair):
    answers = _burst(sqlite_pair, "burst", 16, _models)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 5 + [429] * 11, statuses
    for answer in answers:
        assert answer.headers["RateLimit-Limit"] == "5"
        if answer.status_code == 429:
            assert error_code(answer.json()) == "rate_limited"
            assert int(answer.headers["Retry-After"]) >= 1


def test_counts_survive_a_restart(sqlite_pair):
    gateway = sqlite_pair[0]
    gateway.stop()
    gateway.start()
    answer = _models(gateway, "burst")
    assert answer.status_code == 429 and error_code(answer.json()) == "rate_limited"
    assert _models(gateway, "free").status_code == 200


def _stream(gateway, name, events=20, interval=0.1):
    return requests.get(
        gateway.url + f"/proxy/files/sse?events={events}&interval={interval}",
        headers=_auth(name),
        stream=True,
        timeout=20,
    )


def test_a_concurrency_cap_holds_under_a_burst_across_gateways(sqlite_pair):
    def call(gateway, name):
        answer = _stream(gateway, name, events=15)
        if answer.status_code == 200:
            for _ in answer.iter_content(chunk_size=None):
                pass
        return answer

    statuses = sorted(a.status_code for a in _burst(sqlite_pair, "conc", 8, call))
    assert statuses == [200] * 2 + [429] * 6, statuses
    assert _models(sqlite_pair[1], "conc").status_code == 200  # all slots free again


def _admitted_within(gateway, name: str, seconds: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        answer = _models(gateway, name)
        if answer.status_code == 200:
            return time.monotonic() - started
        assert error_code(answer.json()) == "too_many_concurrent"
        time.sleep(0.2)
    return None


def test_a_client_leaving_mid_stream_frees_its_slot(sqlite_pair):
    stream = _stream(sqlite_pair[0], "leaver", events=400, interval=0.05)
    next(stream.iter_content(chunk_size=None))
    assert _models(sqlite_pair[1], "leaver").status_code == 429
    stream.close()
    assert _admitted_within(sqlite_pair[1], "leaver", 5) is not None


def test_a_slot_held_by_a_killed_worker_is_freed_within_the_worker_timeout(sqlite_pair):
    gateway = sqlite_pair[0]
    stream = _stream(gateway, "killed", events=400, interval=0.05)
    next(stream.iter_content(chunk_size=None))
    assert _models(sqlite_pair[1], "killed").status_code == 429
    for pid in gateway.worker_pids():
        os.kill(pid, signal.SIGKILL)
    stream.close()
    waited = _admitted_within(sqlite_pair[1], "killed", 20)
    assert waited is not None, "the dead worker's slot was never freed"


def _chat(gateway, name, body=CHAT, query=""):
    return requests.post(
        gateway.url + "/proxy/chat/completions" + query, json=body, headers=_auth(name), timeout=20
    )


def test_a_parallel_burst_never_overspends_a_token_budget(sqlite_pair):
    # Each call may write 100 tokens and reports 110 (10 of prompt): a budget of 1000
    # holds 9 such calls, and reservations must stop a burst from starting a 10th.
    admitted = 0
    for _ in range(3):
        answers = _burst(sqlite_pair, "budget", 12, lambda g, n: _chat(g, n))
        for answer in answers:
            assert answer.status_code in (200, 429), answer.text
            if answer.status_code == 429:
                assert error_code(answer.json()) == "quota_exhausted"
        admitted += sum(a.status_code == 200 for a in answers)
    assert 5 <= admitted <= 9
    assert admitted * 110 <= 1000


def _usage(gateway, *args: str, models: tuple[str, ...] = ()) -> list[dict]:
    """Return ``flask usage --csv``'s rows, once every one of ``models`` has one (or 6 s).

    Each worker writes its usage rows in batches, within a second of the call.
    """
    deadline = time.monotonic() + 6
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "gateway", "usage", *args, "--csv"],
            cwd=ROOT,
            env={**gateway.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        named = {row.get("model") for row in rows}
        if all(model in named for model in models) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_usage_is_counted_from_openai_and_anthropic_streams(sqlite_pair, fake_upstream):
    gateway = sqlite_pair[1]
    body = {**CHAT, "model": "gpt-usage-stream", "max_tokens": 7, "stream": True}
    answer = _chat(gateway, "usage", body)
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    sent = fake_upstream.last("/v1/chat/completions")
    assert b'"include_usage":true' in sent.body  # asked for, since the client has a budget
    answer = requests.post(
        gateway.url + "/proxy/v1/messages",
        json={"model": "claude-usage-stream", "max_tokens": 50, "stream": True, "messages": []},
        headers={"x-api-key": KEYS["usage"] + "-anthropic"},
        timeout=20,
    )
    assert answer.status_code == 200
    rows = {
        row["model"]: row
        for row in _usage(
            gateway, "--by", "model", models=("gpt-usage-stream", "claude-usage-stream")
        )
    }
    assert rows["gpt-usage-stream"]["input_tokens"] == "10"
    assert rows["gpt-usage-stream"]["output_tokens"] == "7"
    assert rows["claude-usage-stream"]["input_tokens"] == "3"
    assert rows["claude-usage-stream"]["output_tokens"] == "4"
    by_client = {row["client"]: row for row in _usage(gateway, "--by", "client")}
    assert "usage-anthropic" in by_client and "budget" in by_client


@pytest.mark.parametrize(
    ("body", "query", "status", "code"),
    [
        (
            {"model": "gpt-test", "max_tokens": 10},
            "?model=gpt-4-expensive",
            403,
            "model_not_allowed",
        ),
        ({"model": "gpt-4-expensive", "max_tokens": 10}, "", 403, "model_not_allowed"),
        ({"model": "gpt-test", "max_tokens": 51}, "", 403, "max_tokens_not_allowed"),
        ({"model": "gpt-test"}, "", 400, "max_tokens_required"),
    ],
)
def test_models_and_ceilings_in_both_modes(sqlite_pair, fake_upstream, body, query, status, code):
    gateway = sqlite_pair[1]
    before = len(fake_upstream.seen)
    transparent = _chat(gateway, "models", body, query)
    assert (transparent.status_code, error_code(transparent.json())) == (status, code)
    envelope_query = dict([query[1:].split("=")]) if query else {}
    envelope = requests.post(
        gateway.url + "/proxy",
        json={"method": "POST", "path": "/chat/completions", "query": envelope_query, "body": body},
        headers=_auth("models"),
        timeout=20,
    )
    assert (envelope.status_code, error_code(envelope.json())) == (status, code)
    assert len(fake_upstream.seen) == before


def test_a_duplicated_model_key_is_refused(sqlite_pair):
    answer = requests.post(
        sqlite_pair[1].url + "/proxy/chat/completions",
        data=b'{"model": "gpt-test", "model": "gpt-4-expensive", "max_tokens": 5}',
        headers={**_auth("models"), "Content-Type": "application/json"},
        timeout=20,
    )
    assert (answer.status_code, error_code(answer.json())) == (400, "invalid_json")


# A header the envelope can carry but HTTP cannot send: refused after admission.
BAD_HEADERS = [{"X-Bad": "a\u0001b"}, {"X Bad": "1"}, {"X-Bad": "\u20ac"}]


def _bad_envelope(gateway, name: str, headers: dict) -> requests.Response:
    envelope = {"method": "POST", "path": "/chat/completions", "headers": headers, "body": CHAT}
    return requests.post(gateway.url + "/proxy", json=envelope, headers=_auth(name), timeout=20)


def _refused_once_the_last_call_ended(gateway, headers):
    # A call's slot is freed when the server closes its answer, just after its last
    # byte: a next call on another gateway may come first. Held any longer is the leak.
    deadline = time.monotonic() + 2
    while True:
        answer = _bad_envelope(gateway, "locked", headers)
        if answer.status_code != 429 or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def _a_refused_call_frees_its_slot(gateways) -> None:
    for headers in BAD_HEADERS:  # concurrent: 1, on one worker or the other
        for gateway in gateways:
            answer = _refused_once_the_last_call_ended(gateway, headers)
            assert (answer.status_code, error_code(answer.json())) == (400, "invalid_header")
            assert _chat(gateway, "locked").status_code == 200  # its slot was freed


def _a_refused_call_returns_its_reservation(gateways) -> None:
    for _ in range(4):  # 12 reservations of 100+ tokens would spend a budget of 1000
        for headers in BAD_HEADERS:
            answer = _bad_envelope(gateways[0], "reserved", headers)
            assert (answer.status_code, error_code(answer.json())) == (400, "invalid_header")
    answer = _chat(gateways[1], "reserved")
    assert answer.status_code == 200, answer.text  # every reservation was returned whole


@pytest.mark.parametrize(
    "check", [_a_refused_call_frees_its_slot, _a_refused_call_returns_its_reservation]
)
def test_a_refusal_after_admission_releases_what_it_holds(sqlite_pair, check):
    check(sqlite_pair)


# --- Redis: two gateways on one Redis; Redis stopped and started again ---------------------


class RedisServer:
    def __init__(self, folder) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(
                c.laddr.port == self.port
                for c in psutil.Process(self.process.pid).net_connections()
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def redis_pair(fake_upstream, tmp_path_factory):
    need_redis_server()
    folder = tmp_path_factory.mktemp("spend-redis")
    redis = RedisServer(folder).start()
    config = write_config(
        folder / "config.yaml", _config(fake_upstream.url, f"redis://127.0.0.1:{redis.port}/0")
    )
    gateways = [
        LiveGateway(config, CANARIES, folder / f"gunicorn-{i}.log").start() for i in range(2)
    ]
    yield gateways, redis
    for gateway in gateways:
        gateway.stop()
    redis.stop()


def test_a_burst_against_two_gateways_sharing_redis_admits_exactly_5(redis_pair):
    gateways, _ = redis_pair
    statuses = sorted(a.status_code for a in _burst(gateways, "burst", 16, _models))
    assert statuses == [200] * 5 + [429] * 11, statuses


@pytest.mark.parametrize(
    "check", [_a_refused_call_frees_its_slot, _a_refused_call_returns_its_reservation]
)
def test_a_refusal_after_admission_releases_what_it_holds_on_redis(redis_pair, check):
    check(redis_pair[0])


def test_redis_stopped_refuses_limited_calls_only_and_recovers_when_it_is_back(redis_pair):
    gateways, redis = redis_pair
    redis.stop()
    answer = _models(gateways[0], "conc")
    assert (answer.status_code, error_code(answer.json())) == (503, "limits_unavailable")
    assert _models(gateways[1], "free").status_code == 200
    redis.start()
    deadline = time.monotonic() + 10
    while _models(gateways[0], "conc").status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not recover when Redis came back"
        time.sleep(0.2)


def test_many_concurrent_limited_calls_all_succeed_under_every_limit(sqlite_pair):
    # Every limit applies (requests, a slot, a token reservation and its settling),
    # none is reached: under load the store must never fail a call.
    def call(i: int) -> int:
        body = {**CHAT, "model": f"gpt-load-{i % 4}", "max_tokens": 5}
        return _chat(sqlite_pair[i % 2], "load", body).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(400)))
    assert statuses == [200] * 400


@pytest.mark.parametrize("storage", ["sqlite", "redis"])
def test_usage_rows_waiting_in_a_worker_are_written_when_it_stops(
    storage, request, fake_upstream, tmp_path
):
    # Rows are written in batches; a graceful stop (SIGTERM) must not lose the last
    # ones (on Redis, sent at exit over gevent's sockets).
    if storage == "redis":
        url = f"redis://127.0.0.1:{request.getfixturevalue('redis_pair')[1].port}/0"
    else:
        url = f"sqlite:///{tmp_path}/l.sqlite3"
    config = write_config(tmp_path / "config.yaml", _config(fake_upstream.url, url))
    gateway = LiveGateway(config, CANARIES, tmp_path / "gunicorn.log", workers=1).start()
    models = [f"gpt-stop-{storage}-{i}" for i in range(5)]
    try:
        for model in models:
            assert _chat(gateway, "usage", {**CHAT, "model": model, "max_tokens": 5}).ok
    finally:
        gateway.stop()
    rows = _usage(gateway, "--by", "model")
    assert sorted(row["model"] for row in rows if row["model"] in models) == models
