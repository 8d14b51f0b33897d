"""Event streams carry what proxies in front need to pass them event by event."""

from __future__ import annotations

import pytest
import responses

from gateway.policy.headers import response_headers

from ..support import CHAT_KEY, UPSTREAM


@pytest.mark.parametrize(
    ("upstream_headers", "cache_control"),
    [
        ([("Content-Type", "text/event-stream")], "no-transform"),
        ([("Content-Type", "text/event-stream; charset=utf-8")], "no-transform"),
        (
            [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
            "no-cache, no-transform",
        ),
        (
            [("content-type", "TEXT/EVENT-STREAM"), ("cache-control", "private, no-transform")],
            "private, no-transform",
        ),
        (
            [
                ("Content-Type", "text/event-stream"),
                ("Cache-Control", "no-cache"),
                ("Cache-Control", "no-store"),
            ],
            "no-cache, no-store, no-transform",
        ),
    ],
)
def test_event_streams_ask_proxies_not_to_buffer_or_transform(upstream_headers, cache_control):
    headers = response_headers(
        [*upstream_headers, ("X-Accel-Buffering", "yes"), ("X-Request-Id", "r1")]
    )
    names = [name.lower() for name, _ in headers]
    assert names.count("cache-control") == 1 and names.count("x-accel-buffering") == 1
    values = {name.lower(): value for name, value in headers}
    assert values["cache-control"] == cache_control
    assert values["x-accel-buffering"] == "no"
    assert values["x-request-id"] == "r1"


@pytest.mark.parametrize(
    "upstream_headers",
    [
        [("Content-Type", "application/json"), ("Cache-Control", "max-age=60")],
        [("Content-Type", "text/plain"), ("X-Accel-Buffering", "yes")],
        [],
    ],
)
def test_other_answers_keep_their_headers(upstream_headers):
    assert response_headers(upstream_headers) == upstream_headers


def test_a_live_stream_carries_the_headers(client):
    with responses.RequestsMock() as mock:
        mock.get(
            UPSTREAM + "/models",
            body=b"data: 1\n\n",
            headers={"Cache-Control": "no-cache"},
            content_type="text/event-stream",
        )
        answer = client.get("/proxy/models", headers={"Authorization": f"Bearer {CHAT_KEY}"})
    assert answer.headers["Cache-Control"] == "no-cache, no-transform"
    assert answer.headers["X-Accel-Buffering"] == "no"
    assert answer.data == b"data: 1\n\n"
