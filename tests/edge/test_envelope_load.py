"""The envelope's plain-shape loader gives exactly what the marshmallow schema gives."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from gateway.edge import envelope
from gateway.edge.envelope import MAX_HEADERS, MAX_QUERY_ITEMS, EnvelopeSchema, load_envelope

CASES = [
    {"path": "/models"},
    {"path": "/chat/completions", "method": "post", "body": {"model": "m", "messages": []}},
    {"path": "/x", "method": "Delete", "body": None},
    {"path": "", "method": "GET"},
    {"path": "/x", "query": {"a": "1", "b": [1, 2.5, True, "c"], "c": []}},
    {"path": "/x", "headers": {"X-A": "b", "X-C": ""}, "body": [1, "two"]},
    {"path": "/x", "query": {}, "headers": {}},
    # Each of these goes through the schema and is refused there.
    {},
    {"path": 5},
    {"path": None},
    {"path": "/x", "extra": 1},
    {"path": "/x", "method": "TRACE"},
    {"path": "/x", "method": None},
    {"path": "/x", "method": 1},
    {"path": "/x", "method": "stra\u00dfe"},
    {"path": "/x", "query": None},
    {"path": "/x", "query": []},
    {"path": "/x", "query": {"a": None}},
    {"path": "/x", "query": {"a": [None]}},
    {"path": "/x", "query": {"a": {"b": 1}}},
    {"path": "/x", "query": {"a": [[1]]}},
    {"path": "/x", "query": {"a": ["x"] * (MAX_QUERY_ITEMS + 1)}},
    {"path": "/x", "query": {"a" * 257: "x"}},
    {"path": "/x", "query": {"a": "x" * 8193}},
    {"path": "/x", "headers": None},
    {"path": "/x", "headers": "x"},
    {"path": "/x", "headers": {"X-A": 1}},
    {"path": "/x", "headers": {"X-A": None}},
    {"path": "/x", "headers": {f"X-{i}": "v" for i in range(MAX_HEADERS + 1)}},
    {"path": "/x", "headers": {"X-A": "v" * 8193}},
]


def _schema_load(data: dict) -> tuple[str, object]:
    try:
        return "loaded", list(EnvelopeSchema().load(data).items())
    except ValidationError as exc:
        return "refused", exc.messages


@pytest.mark.parametrize("data", CASES)
def test_loads_as_the_schema_does(data):
    try:
        got = ("loaded", list(load_envelope(data).items()))
    except ValidationError as exc:
        got = ("refused", exc.messages)
    assert got == _schema_load(data)


@pytest.mark.parametrize("data", CASES[:7])
def test_a_plain_envelope_skips_the_schema(data, monkeypatch):
    def no_schema(_data):
        raise AssertionError("a plain envelope went through marshmallow")

    monkeypatch.setattr(envelope._SCHEMA, "load", no_schema)
    assert list(load_envelope(data).items()) == _schema_load(data)[1]
