"""Budgets in money on the real gateway: two gateways of two workers each on one store.

The fake upstream reports a 10-token prompt and ``max_tokens`` tokens written, so
every figure here is known: at 1000 per million tokens a token costs 1000
micro-units (0.001), and a call with ``max_tokens`` 100 costs 110 000 (0.11).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ..live_gateway import ROOT, LiveGateway
from ..support import CANARIES, error_code, write_config
from .test_live import RedisServer

PRICE = 1000  # per million tokens, in and out: 1000 micro-units a token
BUDGET = 1_000_000  # "1/day": one unit of the currency
KEYS = {
    name: f"ck-money-{name}-0123456789"
    for name in ("money", "burst", "stream", "unpriced", "default", "reset", "seen")
}


def _body(max_tokens: int | None = 100, model: str = "gpt-priced", **more) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **more}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body, separators=(",", ":")).encode()


def _config(upstream_url: str, storage: str) -> dict:
    client = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["POST"],
        "allowedPaths": ["/chat/completions"],
    }
    extra = {
        "money": {"limits": {"cost": ["1/day"], "requests": ["1000/day"]}},
        "burst": {"limits": {"cost": ["1/day"]}},
        "stream": {"limits": {"cost": ["100/month"]}},
        "unpriced": {"limits": {"cost": ["1/day"]}},
        "default": {"limits": {"cost": ["100/day"]}, "defaultMaxTokens": 42},
        "reset": {"limits": {"cost": ["0.5/day"], "tokens": ["100000/day"]}},
        "seen": {"limits": {"cost": ["2.5/day"], "requests": ["1000/day"]}},
    }
    return {
        "limits": {"storage": storage},
        "prices": {"gpt-priced*": {"input": PRICE, "output": PRICE}},
        "targets": {"api": {"baseUrl": upstream_url + "/v1"}},
        "secrets": {"openai": "Bearer ${CANARY_OPENAI}", "metrics": "${CANARY_METRICS}"},
        "metrics": {"tokenRef": "metrics"},
        "clients": {KEYS[name]: {**client, "name": name, **spec} for name, spec in extra.items()},
    }


def _pair(folder, config: dict) -> list[LiveGateway]:
    path = write_config(folder / "config.yaml", config)
    return [LiveGateway(path, CANARIES, folder / f"gunicorn-{i}.log").start() for i in range(2)]


@pytest.fixture(scope="module")
def sqlite_pair(fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("money")
    gateways = _pair(folder, _config(fake_upstream.url, f"sqlite:///{folder}/limits.sqlite3"))
    yield gateways
    for gateway in gateways:
        gateway.stop()


@pytest.fixture(scope="module")
def redis_pair(fake_upstream, tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("money-redis")
    redis = RedisServer(folder).start()
    gateways = _pair(folder, _config(fake_upstream.url, f"redis://127.0.0.1:{redis.port}/0"))
    yield gateways
    for gateway in gateways:
        gateway.stop()
    redis.stop()


def _chat(gateway, name: str, body: bytes, query: str = "") -> requests.Response:
    return requests.post(
        gateway.url + "/proxy/chat/completions" + query,
        data=body,
        headers={"Authorization": f"Bearer {KEYS[name]}", "Content-Type": "application/json"},
        timeout=20,
    )


def _flask(gateway, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "gateway", *args],
        cwd=ROOT,
        env={**gateway.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def _budgets(gateway, name: str) -> dict[str, dict]:
    """Return ``usage --by client``'s budget lines of client ``name``, by budget."""
    rows = csv.DictReader(io.StringIO(_flask(gateway, "usage", "--by", "client", "--csv").stdout))
    return {row["budget"]: row for row in rows if row["client"] == name and row["budget"]}


def _admitted_in_turn(gateway_for, name: str, body: bytes) -> tuple[int, requests.Response]:
    for i in range(100):
        answer = _chat(gateway_for(i), name, body)
        if answer.status_code != 200:
            return i, answer
    raise AssertionError("the budget never ran out")


def test_a_cost_budget_admits_what_it_can_pay_for_and_refuses_the_next_call(sqlite_pair):
    body = _body()
    reserve = (len(body) + 100) * PRICE  # the prompt's bytes bound its tokens
    cost = (10 + 100) * PRICE
    expected = next(k for k in range(100) if k * cost + reserve > BUDGET)
    admitted, refused = _admitted_in_turn(lambda i: sqlite_pair[i % 2], "money", body)
    assert admitted == expected
    assert (refused.status_code, error_code(refused.json())) == (429, "quota_exhausted")
    assert "cost budget" in refused.json()["error"]["message"]  # OpenAI's shape
    # The refusing budget is the one described, in micro-units, with its window and kind.
    assert refused.headers["RateLimit-Limit"] == str(BUDGET)
    assert refused.headers["RateLimit-Remaining"] == str(BUDGET - admitted * cost)
    assert refused.headers["RateLimit-Policy"] == f'{BUDGET};w=86400;kind="cost"'
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    # A cheaper call still fits what is left.
    small = _chat(sqlite_pair[0], "money", _body(max_tokens=1))
    assert small.status_code == 200, small.text


def test_an_admitted_answer_describes_the_limit_closest_to_exhaustion(sqlite_pair):
    body = _body()
    answer = _chat(sqlite_pair[1], "seen", body)
    assert answer.status_code == 200
    # 1000 calls a day is far from spent; 2.5 a day less this call's hold is closer.
    assert answer.headers["RateLimit-Policy"] == '2500000;w=86400;kind="cost"'
    reserved = (len(body) + 100) * PRICE  # at admission the call holds its reservation
    assert answer.headers["RateLimit-Remaining"] == str(2_500_000 - reserved)


def test_a_model_without_a_price_is_refused_before_the_upstream(sqlite_pair, fake_upstream):
    before = len(fake_upstream.seen)
    answer = _chat(sqlite_pair[0], "unpriced", _body(model="gpt-unknown"))
    assert (answer.status_code, error_code(answer.json())) == (403, "model_not_priced")
    fallback = _chat(sqlite_pair[0], "unpriced", _body(models=["gpt-priced", "gpt-unknown"]))
    assert (fallback.status_code, error_code(fallback.json())) == (403, "model_not_priced")
    assert len(fake_upstream.seen) == before


def test_default_max_tokens_arrives_at_the_upstream_and_is_what_is_reserved(
    sqlite_pair, fake_upstream
):
    answer = _chat(sqlite_pair[1], "default", _body(max_tokens=None))
    assert answer.status_code == 200, answer.text
    sent = json.loads(fake_upstream.last("/v1/chat/completions").body)
    assert sent["max_tokens"] == 42 and sent["model"] == "gpt-priced"
    assert _budgets(sqlite_pair[1], "default")["cost/day"]["used"] == "0.052000"  # (10 + 42)
    named = _chat(sqlite_pair[1], "default", _body(max_tokens=7))
    assert named.status_code == 200
    assert json.loads(fake_upstream.last("/v1/chat/completions").body)["max_tokens"] == 7


def test_a_stream_settles_its_cost_from_the_usage_it_reports(sqlite_pair, fake_upstream):
    answer = _chat(sqlite_pair[0], "stream", _body(max_tokens=30, stream=True))
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert b'"include_usage":true' in fake_upstream.last("/v1/chat/completions").body
    # Reported usage 10 + 30 tokens: 0.04, though 30 + the body's bytes were reserved.
    budget = _budgets(sqlite_pair[0], "stream")["cost/month"]
    assert (budget["limit"], budget["used"], budget["left"]) == (
        "100.000000",
        "0.040000",
        "99.960000",
    )
    rows = csv.DictReader(io.StringIO(_flask(sqlite_pair[0], "usage", "--csv").stdout))
    assert {row["client"]: row["cost"] for row in rows}["stream"] == "0.040000"


def test_usage_shows_each_budget_limit_used_and_left(sqlite_pair):
    _chat(sqlite_pair[0], "reset", _body(max_tokens=100))
    budgets = _budgets(sqlite_pair[0], "reset")
    assert budgets["cost/day"] == {
        **budgets["cost/day"],
        "limit": "0.500000",
        "used": "0.110000",
        "left": "0.390000",
    }
    assert (budgets["tokens/day"]["limit"], budgets["tokens/day"]["used"]) == ("100000", "110")
    table = _flask(sqlite_pair[0], "usage", "--by", "client", "--client", "reset").stdout
    assert re.search(r"cost/day\s+0\.500000\s+0\.110000\s+0\.390000", table), table


def test_limits_reset_reopens_a_spent_budget(sqlite_pair):
    _admitted_in_turn(lambda i: sqlite_pair[i % 2], "reset", _body())
    assert _chat(sqlite_pair[1], "reset", _body()).status_code == 429
    result = _flask(sqlite_pair[0], "limits", "reset", "reset", "--kind", "cost")
    assert "cost 0.5/day" in result.stdout
    assert "limits reset for client reset by " in result.stderr  # who did it
    assert _budgets(sqlite_pair[0], "reset")["cost/day"]["used"] == "0.000000"
    assert _budgets(sqlite_pair[0], "reset")["tokens/day"]["used"] != "0"  # another kind
    assert _chat(sqlite_pair[1], "reset", _body()).status_code == 200


def _metric(text: str, name: str, client: str, kind: str, window: str) -> float:
    pattern = rf'^{name}\{{client="{client}",kind="{kind}",window="{window}"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    assert match, f"no {name} for {client} {kind} {window}"
    return float(match.group(1))


def test_budget_metrics_show_used_and_limit_for_every_kind(sqlite_pair):
    _chat(sqlite_pair[0], "money", _body(max_tokens=1))  # may be refused; the gauges show either
    answer = requests.get(
        sqlite_pair[1].url + "/metrics",
        headers={"Authorization": f"Bearer {CANARIES['CANARY_METRICS']}"},
        timeout=20,
    )
    assert answer.status_code == 200
    text = answer.text
    budget = _budgets(sqlite_pair[0], "money")
    assert _metric(text, "gateway_budget_limit", "money", "cost", "day") == 1.0
    assert _metric(text, "gateway_budget_used", "money", "cost", "day") == float(
        budget["cost/day"]["used"]
    )
    assert _metric(text, "gateway_budget_limit", "money", "requests", "day") == 1000
    assert _metric(text, "gateway_budget_used", "money", "requests", "day") == float(
        budget["requests/day"]["used"]
    )


def test_parallel_bursts_never_overspend_a_cost_budget_on_redis(redis_pair):
    body = _body()
    cost = (10 + 100) * PRICE
    admitted = 0
    for _ in range(3):
        barrier = threading.Barrier(12)

        def one(i: int, barrier: threading.Barrier = barrier) -> requests.Response:
            barrier.wait()
            return _chat(redis_pair[i % 2], "burst", body)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(12)))
        for answer in answers:
            assert answer.status_code in (200, 429), answer.text
        admitted += sum(a.status_code == 200 for a in answers)
    # At most what one unit pays for (9 calls of 0.11), and reservations never let a
    # burst past it; each call reserves (body + 100) tokens, so at least 1 / that fits.
    assert 1_000_000 // ((len(body) + 100) * PRICE) <= admitted <= BUDGET // cost
    budget = _budgets(redis_pair[0], "burst")["cost/day"]
    assert budget["used"] == f"0.{admitted * 110:03d}000"
    assert float(budget["used"]) <= 1.0
