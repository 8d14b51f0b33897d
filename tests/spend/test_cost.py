"""Budgets in money, Flask-free: prices, cost budgets on the stores, months, default ceilings."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from gateway.config.load import parse_config
from gateway.errors import ConfigError, PolicyError
from gateway.policy.limits import Ask, LimitSet, parse_cost, parse_rate
from gateway.policy.prices import Price, PriceTable, money, parse_price
from gateway.spend.admission import price_of
from gateway.spend.budgets import budget_states, reset_budgets
from gateway.spend.calls import read_call, rewritten_body
from gateway.spend.store.sqlite import SQLiteStore

from ..support import CANARIES, CHAT_KEY, base_config

NOW = datetime(2026, 2, 14, 12, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "micro"), [("5/day", 5_000_000), ("0.5/hour", 500_000), ("100/month", 100_000_000)]
)
def test_cost_budgets_are_whole_micro_units(text, micro):
    assert parse_cost(text).count == micro


@pytest.mark.parametrize("text", ["0/day", "1.0000001/day", "1000000000/day", "-1/day", "5/week"])
def test_bad_cost_budgets_say_what_to_write(text):
    with pytest.raises(ValueError, match="amount per period"):
        parse_cost(text)


def test_a_month_is_the_calendar_month_in_utc():
    start, end = parse_rate("10/month").window(NOW)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 2, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    _, end = parse_rate("10/month").window(december)
    assert datetime.fromtimestamp(end, UTC) == datetime(2027, 1, 1, tzinfo=UTC)


def test_prices_are_exact_and_costs_round_up_to_a_micro_unit():
    assert parse_price(0.15) == 150_000 and parse_price("3") == 3_000_000
    for bad in (-1, 0.0000001, "x", True, float("nan")):
        with pytest.raises(ValueError):
            parse_price(bad)
    price = Price(input=150_000, output=600_000)  # gpt-4o-mini
    assert price.cost(1_000_000, 0) == 150_000
    assert price.cost(1, 1) == 1  # 0.75 micro-units, rounded up
    assert money(1_234_567) == "1.234567"


def test_the_first_matching_price_wins_and_a_targets_own_come_first():
    config = {
        **base_config(),
        "prices": {
            "anthropic/claude-*": {"input": 3, "output": 15},
            "*": {"input": 1, "output": 1},
        },
    }
    config["targets"]["api"]["prices"] = {"anthropic/claude-haiku*": {"input": 1, "output": 5}}
    table = parse_config(config, CANARIES).targets["api"].prices
    assert table.price("anthropic/claude-haiku-4") == Price(1_000_000, 5_000_000)
    assert table.price("anthropic/claude-opus-4") == Price(3_000_000, 15_000_000)
    assert table.price("openai/gpt-4o") == Price(1_000_000, 1_000_000)


@pytest.mark.parametrize(
    ("prices", "problem"),
    [
        ({"m": {"input": 1}}, "prices.m.output: is required"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be a number"),
        ({"m": {"input": 1, "output": 1, "cache": 1}}, "prices.m.cache: unknown field"),
        ({"m": 3}, "prices.m: must be {input: <price>, output: <price>}"),
    ],
)
def test_a_bad_price_is_refused_with_its_location(prices, problem):
    with pytest.raises(ConfigError) as info:
        parse_config({**base_config(), "prices": prices}, CANARIES)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_default_ceiling_above_max_tokens_is_refused():
    config = base_config()
    config["clients"][CHAT_KEY].update(maxTokens=100, defaultMaxTokens=200)
    with pytest.raises(ConfigError) as info:
        parse_config(config, CANARIES)
    assert "defaultMaxTokens: must be at most maxTokens (100)" in info.value.problems[0]


def test_sessions_can_have_cost_budgets():
    config = base_config()
    config["sessionSecretRef"] = "rapid"
    config["secrets"]["rapid"] = "s" * 40
    config["clients"][CHAT_KEY].update(
        allowedOrigins=["https://app.example"], sessions={"limits": {"cost": ["0.10/day"]}}
    )
    client = parse_config(config, {**CANARIES}).clients[0]
    assert client.sessions.limits.cost == (parse_cost("0.10/day"),)


def test_an_unpriced_model_is_refused_only_where_a_cost_budget_applies():
    prices = PriceTable.build([("gpt-*", Price(1, 2))])
    call = read_call(json.dumps({"model": "o3", "max_tokens": 5}).encode(), (), (), None, True)
    with pytest.raises(PolicyError) as info:
        price_of(call, prices, required=True)
    assert info.value.code == "model_not_priced"
    assert price_of(call, prices, required=False) is None
    both = json.dumps({"models": ["gpt-a", "gpt-b"], "model": "gpt-c", "max_tokens": 5}).encode()
    fallback = read_call(both, (), (), None, True)
    prices = PriceTable.build([("gpt-a", Price(9, 1)), ("gpt-*", Price(1, 7))])
    assert price_of(fallback, prices, required=True) == Price(9, 7)  # the dearest of each


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/v1/chat/completions", {}, ["max_tokens"]),
        ("/v1/messages", {}, ["max_tokens"]),
        ("/v1/responses", {}, ["max_output_tokens"]),
        ("/v1beta/models/g:generateContent", {}, ["generationConfig", "maxOutputTokens"]),
        ("/model/m/converse", {"inferenceConfig": {"topP": 1}}, ["inferenceConfig", "maxTokens"]),
    ],
)  # fmt: skip
def test_a_default_ceiling_is_written_where_the_dialect_reads_it(path, body, where):
    raw = json.dumps({"model": "m", **body}).encode()
    call = read_call(raw, (), (), None, True, path=path, default_ceiling=64)
    assert call.ceiling == 64 and call.ceiling_added
    sent = rewritten_body(call, path, False)
    value = json.loads(sent)
    for key in where:
        value = value[key]
    assert value == 64
    again = read_call(sent, (), (), None, True, path=path, default_ceiling=64)
    assert not again.ceiling_added  # what the gateway wrote is where the upstream reads it


def test_a_cost_budget_reserves_settles_and_resets_exactly(tmp_path):
    now = time.time()  # reset clears the windows of now
    store = SQLiteStore(str(tmp_path / "limits.sqlite3"))
    limits = LimitSet(cost=(parse_cost("1/day"),), tokens=(parse_rate("1000/day"),))
    ask = Ask((("client:c", limits),), reservation=300, cost=600_000)
    first = store.admit(ask, now)
    assert first.admitted
    second = store.admit(ask, now)
    assert not second.admitted and second.code == "quota_exhausted"
    assert second.headers()["RateLimit-Remaining"] == "400000"  # held by the first call
    assert 'kind="cost"' in second.headers()["RateLimit-Policy"]
    store.finish(first.ticket, tokens=110, cost=110_000)
    assert store.admit(ask, now).admitted  # 110 000 spent + 600 000 reserved

    class Named:
        label = "c"
        limits = LimitSet(cost=(parse_cost("1/day"),))

    states = budget_states(store, [Named], now)
    assert [(s.kind, s.limit, s.used, s.left) for s in states] == [
        ("cost", 1_000_000, 710_000, 290_000)
    ]
    reset_budgets(store, Named, ["cost"])
    # Spent is cleared; the call still in flight keeps its reservation until it settles.
    assert budget_states(store, [Named])[0].used == 600_000
