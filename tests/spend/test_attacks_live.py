"""Spend control against a caller who has read the providers' docs (issue 19), under gunicorn.

One gateway of two workers on SQLite, and one on Redis with a 3 s worker timeout
(so a concurrency lease is 3 s and a stream can outlast it in seconds).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis as redis_client
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..live_gateway import LiveGateway
from ..support import CANARIES, error_code, write_config
from .test_live import RedisServer, _usage

KEYS = {name: f"ck-attack-{name}-0123456789" for name in ("models", "n", "lease", "free", "odd")}
CHAT = {"model": "gpt-test", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}
SCRAPE = {"Authorization": f"Bearer {CANARIES['CANARY_METRICS']}"}


def _config(upstream_url: str, storage: str) -> dict:
    client = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["GET", "POST"],
        "allowedPaths": ["/**"],
    }
    extra = {
        "models": {"allowedModels": ["gpt-test*", "gemini-ok", "dep-ok"], "maxTokens": 50},
        "n": {"limits": {"tokens": ["2000/day"]}, "maxTokens": 100},
        "lease": {"limits": {"concurrent": 1}},
        "free": {},
        "odd": {"limits": {"tokens": ["100000/day"]}},
    }
    return {
        "limits": {"storage": storage},
        "targets": {"api": {"baseUrl": upstream_url + "/v1"}},
        "secrets": {"openai": "Bearer ${CANARY_OPENAI}", "metrics": "${CANARY_METRICS}"},
        "metrics": {"tokenRef": "metrics"},
        "clients": {KEYS[name]: {**client, "name": name, **more} for name, more in extra.items()},
    }


def _start(folder, upstream_url: str, storage: str, **settings) -> LiveGateway:
    config = write_config(folder / "config.yaml", _config(upstream_url, storage))
    env = {**CANARIES, "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics")}
    return LiveGateway(config, env, folder / "gunicorn.log", **settings).start()


@pytest.fixture(scope="module")
def on_sqlite(fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attacks-sqlite")
    gateway = _start(folder, fake_upstream.url, f"sqlite:///{folder}/limits.sqlite3")
    gateway.db = folder / "limits.sqlite3"
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def on_redis(fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attacks-redis")
    server = RedisServer(folder).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    gateway = _start(folder, fake_upstream.url, url, worker_timeout=3)
    gateway.redis = redis_client.Redis.from_url(url)
    yield gateway
    gateway.stop()
    server.stop()


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _post(gateway, name: str, path: str, body, query: str = "") -> requests.Response:
    return requests.post(
        f"{gateway.url}/proxy{path}{query}", json=body, headers=_auth(name), timeout=20
    )


def _envelope(gateway, name: str, path: str, body) -> requests.Response:
    return requests.post(
        gateway.url + "/proxy",
        json={"method": "POST", "path": path, "body": body},
        headers=_auth(name),
        timeout=20,
    )


# --- 1. the model in the one form checked --------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({**CHAT, "models": ["gpt-test", "gpt-expensive"]}, 403, "model_not_allowed"),
        ({"models": ["gpt-test"], "max_tokens": 20}, 400, "model_required"),
        ({"max_tokens": 20, "messages": []}, 400, "model_required"),
        ({"model": None, "max_tokens": 20}, 400, "model_required"),
        ({"Model": "gpt-expensive", "max_tokens": 20}, 400, "model_required"),
        ({**CHAT, "MODEL": "gpt-expensive"}, 400, "model_required"),
        ({**CHAT, "MAX_TOKENS": 100000}, 400, "max_tokens_required"),
    ],
)
def test_a_body_must_name_its_model_as_checked(on_sqlite, fake_upstream, body, status, code):
    before = len(fake_upstream.seen)
    for answer in (
        _post(on_sqlite, "models", "/chat/completions", body),
        _envelope(on_sqlite, "models", "/chat/completions", body),
    ):
        assert (answer.status_code, error_code(answer.json())) == (status, code), answer.text
    assert len(fake_upstream.seen) == before


def test_a_models_list_of_allowed_names_passes(on_sqlite):
    answer = _post(on_sqlite, "models", "/chat/completions", {**CHAT, "models": ["gpt-test-2"]})
    assert answer.status_code == 200


# --- 2. models named in the path: Gemini and Azure -----------------------------------

GEMINI = {
    "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
    "generationConfig": {"maxOutputTokens": 11},
}
AZURE = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 13}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1beta/models/gemini-expensive:generateContent", GEMINI),
        ("/v1beta/models/gemini-expensive:streamGenerateContent", GEMINI),
        ("/v1beta/models/gemini-expensive%3AgenerateContent", GEMINI),
        ("/openai/deployments/dep-expensive/chat/completions", AZURE),
    ],
)
def test_a_model_named_in_the_path_is_checked(on_sqlite, fake_upstream, path, body):
    before = len(fake_upstream.seen)
    answer = _post(on_sqlite, "models", path, body, "?api-version=2024-10-21")
    assert (answer.status_code, error_code(answer.json())) == (403, "model_not_allowed")
    assert len(fake_upstream.seen) == before


def test_a_model_named_in_the_path_is_metered(on_sqlite):
    gemini = _post(on_sqlite, "models", "/v1beta/models/gemini-ok:generateContent", GEMINI)
    assert gemini.status_code == 200, gemini.text
    azure = _post(on_sqlite, "models", "/openai/deployments/dep-ok/chat/completions", AZURE)
    assert azure.status_code == 200, azure.text
    rows = {
        row["model"]: row
        for row in _usage(on_sqlite, "--by", "model", models=("gemini-ok", "dep-ok"))
    }
    assert (rows["gemini-ok"]["input_tokens"], rows["gemini-ok"]["output_tokens"]) == ("6", "11")
    assert (rows["dep-ok"]["input_tokens"], rows["dep-ok"]["output_tokens"]) == ("10", "13")


# --- 3. n and best_of multiply the cost ------------------------------------------------


@pytest.mark.parametrize("store", ["on_sqlite", "on_redis"])
@pytest.mark.parametrize(
    ("path", "extra"),
    [("/chat/completions", {"n": 5}), ("/completions", {"n": 1, "best_of": 5})],
)
def test_n_and_best_of_never_overspend_a_budget(request, store, path, extra):
    gateway = request.getfixturevalue(store)
    # Each call writes 5 answers of 100 tokens to a 10-token prompt: 510 tokens. A
    # budget of 2,000 tokens a day holds three such calls, whatever the burst.
    _clear_budget(gateway)  # each case starts with the whole budget
    body = {**CHAT, "max_tokens": 100, **extra}
    spent = 0
    for _ in range(3):
        barrier = threading.Barrier(12)

        def call(_, barrier=barrier) -> requests.Response:
            barrier.wait()
            return _post(gateway, "n", path, body)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(12)))
        for answer in answers:
            assert answer.status_code in (200, 429), answer.text
        spent += 510 * sum(a.status_code == 200 for a in answers)
    assert 0 < spent <= 2000


def _clear_budget(gateway) -> None:
    if hasattr(gateway, "redis"):
        for key in gateway.redis.scan_iter("tok:client:n*"):
            gateway.redis.delete(key)
    elif _has_counters(gateway):
        with sqlite3.connect(gateway.db) as db:
            db.execute("DELETE FROM counters WHERE key LIKE 'tok:client:n%'")


def _has_counters(gateway) -> bool:
    """Return whether the gateway has made its SQLite tables yet (at its first LLM call)."""
    if not gateway.db.exists():
        return False
    with sqlite3.connect(gateway.db) as db:
        return bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'counters'").fetchone())


@pytest.mark.parametrize("count", [{"n": 0}, {"n": 129}, {"best_of": "5"}, {"N": 20}])
def test_a_bad_count_is_refused(on_sqlite, count):
    answer = _post(on_sqlite, "n", "/chat/completions", {**CHAT, **count})
    assert (answer.status_code, error_code(answer.json())) == (400, "invalid_choice_count")


# --- 5. a Redis slot lasts as long as its call ---------------------------------------


def test_a_redis_slot_is_held_by_a_stream_longer_than_the_lease(on_redis):
    # Lease 3 s (the worker timeout): the slot set's expiry was 6 s, renewed never.
    stream = requests.get(
        on_redis.url + "/proxy/files/sse?events=95&interval=0.1",
        headers=_auth("lease"),
        stream=True,
        timeout=20,
    )
    assert stream.status_code == 200
    started = time.monotonic()
    chunks = stream.iter_content(chunk_size=None)
    for _ in chunks:
        if time.monotonic() - started > 8:
            break
    second = requests.get(on_redis.url + "/proxy/models", headers=_auth("lease"), timeout=20)
    assert (second.status_code, error_code(second.json())) == (429, "too_many_concurrent")
    for _ in chunks:
        pass
    stream.close()
    deadline = time.monotonic() + 5
    while (
        requests.get(on_redis.url + "/proxy/models", headers=_auth("lease"), timeout=20).status_code
        != 200
    ):
        assert time.monotonic() < deadline, "the slot was not freed when the stream ended"
        time.sleep(0.2)


# --- 6. model names are bounded ----------------------------------------------------


def test_a_100_kb_model_name_is_refused_for_a_client_without_rules(on_sqlite, fake_upstream):
    before = len(fake_upstream.seen)
    for model in ("x" * 100_000, "gpt\r\nforged", ""):
        body = {**CHAT, "model": model}
        for answer in (
            _post(on_sqlite, "free", "/chat/completions", body),
            _envelope(on_sqlite, "free", "/chat/completions", body),
        ):
            assert (answer.status_code, error_code(answer.json())) == (400, "invalid_model")
            assert len(answer.content) < 1000  # the name is never echoed
    assert len(fake_upstream.seen) == before
    assert "x" * 300 not in on_sqlite.log_text()


def test_400_model_names_keep_the_metrics_bounded(on_sqlite):
    def call(i: int) -> int:
        body = {**CHAT, "model": f"client-chosen-{i:04d}-" + "y" * 200}
        return _post(on_sqlite, "free", "/chat/completions", body).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(400))) == {200}
    scrape = requests.get(on_sqlite.url + "/metrics", headers=SCRAPE, timeout=20)
    assert scrape.status_code == 200
    models = {
        sample.labels["model"]
        for family in text_string_to_metric_families(scrape.text)
        if family.name == "gateway_tokens"
        for sample in family.samples
        if sample.labels.get("client") == "free"
    }
    # At most maxModelLabels (100) names per worker, two workers; the rest are "other".
    assert "other" in models and len(models) <= 2 * 100 + 1
    assert len(scrape.content) < 400_000


# --- 7. absurd usage is distrusted ------------------------------------------------------


@pytest.mark.parametrize("store", ["on_sqlite", "on_redis"])
@pytest.mark.parametrize(
    ("usage", "kind", "model"),
    [
        ({"prompt_tokens": 10**20, "completion_tokens": 5}, "input", "gpt-huge"),
        ({"prompt_tokens": 10, "completion_tokens": -5}, "output", "gpt-negative"),
    ],
)
def test_absurd_usage_keeps_the_reservation_and_the_usage_row(request, store, usage, kind, model):
    gateway = request.getfixturevalue(store)
    body = {**CHAT, "model": f"{model}-{store}", "max_tokens": 40}
    before = _spent(gateway)
    answer = _post(gateway, "odd", "/chat/completions", body, "?usage=" + json.dumps(usage))
    assert answer.status_code == 200, answer.text
    sent = len(json.dumps(body, separators=(", ", ": ")).encode())  # requests' own spelling
    _wait(lambda: _spent(gateway) > before)
    assert _spent(gateway) - before == 40 + sent  # the reservation stays charged
    rows = {row["model"]: row for row in _usage(gateway, "--by", "model", models=(body["model"],))}
    assert rows[body["model"]]["calls"] == "1"  # the row is written
    log = gateway.log_text()
    assert "Traceback" not in log and "OverflowError" not in log
    assert f"odd: the upstream reported {kind} usage that is not a whole number" in log


def _spent(gateway) -> int:
    if hasattr(gateway, "redis"):
        return sum(
            int(gateway.redis.hget(key, "used") or 0)
            for key in gateway.redis.scan_iter("tok:client:odd*")
        )
    if not _has_counters(gateway):
        return 0
    with sqlite3.connect(gateway.db) as db:
        (used,) = db.execute(
            "SELECT COALESCE(SUM(used), 0) FROM counters WHERE key LIKE 'tok:client:odd%'"
        ).fetchone()
    return used


def _wait(done, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.05)
