"""The request pipeline: whatever stops a call after admission, its slot and reservation go back."""

from __future__ import annotations

import sqlite3

import pytest
import requests
import responses

from gateway.edge import pipeline, stages
from gateway.errors import GatewayError

from ..support import CANARIES, UPSTREAM

HELD_KEY = "ck-test-held-0123456789"
HELD = {"Authorization": f"Bearer {HELD_KEY}"}
CHAT = {"model": "gpt-test", "max_tokens": 100, "messages": []}
REPLY = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


@pytest.fixture
def config_dict(config_dict):
    config_dict["clients"][HELD_KEY] = {
        "target": "api",
        "authHeaderRef": "openai",
        "allowedMethods": ["GET", "POST"],
        "allowedPaths": ["/**"],
        "maxTokens": 100,
        "limits": {"concurrent": 1, "tokens": ["1000/day"]},
    }
    return config_dict


@pytest.fixture
def mocked_upstream():
    """Lenient, unlike the shared one: a call refused before it is sent never reaches it."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def _held(app) -> tuple[int, int]:
    """Return the slots held and the tokens reserved in the app's store."""
    db = sqlite3.connect(app.extensions["gateway.limits"].path)
    try:
        (slots,) = db.execute("SELECT COUNT(*) FROM slots").fetchone()
        (reserved,) = db.execute("SELECT COALESCE(SUM(reserved), 0) FROM counters").fetchone()
    finally:
        db.close()
    return slots, reserved


def _call(client, mode: str, headers: dict | None = None):
    if mode == "envelope":
        envelope = {"method": "POST", "path": "/chat/completions", "body": CHAT}
        if headers:
            envelope["headers"] = headers
        return client.post("/proxy", json=envelope, headers=HELD)
    return client.post("/proxy/chat/completions", json=CHAT, headers={**HELD, **(headers or {})})


def _assert_released_and_next_call_admitted(app, client, mode: str, mock) -> None:
    assert _held(app) == (0, 0)
    mock.upsert(responses.POST, f"{UPSTREAM}/chat/completions", json=REPLY)
    answer = _call(client, mode)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    answer.close()
    assert _held(app) == (0, 0)


_AFTER_SPEND = ("spend", "outgoing", "forward", "answer")


def _failing(stage, when: str, error: BaseException):
    def run(ex) -> None:
        if when == "after":
            stage(ex)
        raise error

    return run


@pytest.mark.parametrize("mode", ["envelope", "transparent"])
@pytest.mark.parametrize(
    ("name", "when"),
    [("spend", "after")]
    + [(name, when) for name in _AFTER_SPEND[1:] for when in ("before", "after")],
)
@pytest.mark.parametrize(
    ("error", "status"),
    [(GatewayError("upstream_error", "a refusal"), 502), (RuntimeError("a bug"), 500)],
)
def test_a_stage_after_admission_that_raises_releases_slot_and_reservation(
    app, client, mocked_upstream, monkeypatch, mode, name, when, error, status
):
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", json=REPLY)
    chain = getattr(pipeline, mode.upper())
    replies = []
    stage = _failing(next(s for s in chain.stages if s.__name__ == name), when, error)

    def failing(ex) -> None:
        try:
            stage(ex)
        finally:
            replies.append(ex.reply)

    stages_ = tuple(failing if s.__name__ == name else s for s in chain.stages)
    monkeypatch.setattr(chain, "stages", stages_)
    answer = _call(client, mode)
    assert answer.status_code == status
    held_while_answering = _held(app)
    answer.close()
    assert held_while_answering[0] == 1  # it was admitted: else this test would prove nothing
    for reply in replies:
        if reply is not None:
            assert reply.raw.closed  # the upstream connection is let go too
    monkeypatch.undo()
    _assert_released_and_next_call_admitted(app, client, mode, mocked_upstream)


@pytest.mark.parametrize(
    ("mode", "headers", "upstream_answer", "status", "code"),
    [
        ("envelope", {"X-Bad": "a\x01b"}, None, 400, "invalid_header"),
        ("envelope", {"X Bad": "1"}, None, 400, "invalid_header"),
        ("envelope", {"X-Bad": "\u20ac"}, None, 400, "invalid_header"),
        ("transparent", None, requests.ConnectionError("reset"), 502, "upstream_error"),
        ("transparent", None, requests.ConnectTimeout("slow"), 504, "upstream_timeout"),
        ("envelope", None, requests.ReadTimeout("slow"), 504, "upstream_timeout"),
        ("transparent", None, f"key={CANARIES['CANARY_OPENAI']}", 502, "secret_in_response"),
    ],
)
def test_a_refusal_after_admission_releases_slot_and_reservation(
    app, client, mocked_upstream, mode, headers, upstream_answer, status, code
):
    if upstream_answer is not None:
        mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", body=upstream_answer)
    answer = _call(client, mode, headers)
    assert (answer.status_code, answer.get_json()["error"]) == (status, code)
    answer.close()
    _assert_released_and_next_call_admitted(app, client, mode, mocked_upstream)


def test_a_client_leaving_mid_stream_releases_slot_and_reservation(app, client, mocked_upstream):
    mocked_upstream.add(responses.POST, f"{UPSTREAM}/chat/completions", body=b"data: {}\n\n" * 1000)
    answer = client.post("/proxy/chat/completions", json=CHAT, headers=HELD, buffered=False)
    assert answer.status_code == 200
    next(iter(answer.response))
    assert _held(app)[0] == 1
    answer.close()  # the client is gone
    _assert_released_and_next_call_admitted(app, client, "transparent", mocked_upstream)


def test_every_stage_names_a_public_function():
    for chain in (pipeline.ENVELOPE, pipeline.TRANSPARENT):
        assert chain.stages[0] is stages.record  # first taken, so the record is filled last
        names = [stage.__name__ for stage in chain.stages]
        assert names[-4:] == list(_AFTER_SPEND)
