"""The gateway's own refusals, as the official OpenAI and Anthropic SDKs read them (issue 21).

Each SDK, changed only in base_url, gets its usual typed exception with the
gateway's code where its users look (``e.code``; ``e.body["error"]``), the
gateway's sentence as the message, and the gateway's request id as
``e.request_id``, the id its access log has. A refusal no retry can change is
sent once however many retries the SDK may make; a short rate limit is retried
after its Retry-After, and then admitted.
"""

from __future__ import annotations

import os
import threading
import time

import anthropic
import openai
import pytest

from ..support import (
    ANTHROPIC_BUDGET_KEY,
    ANTHROPIC_KEY,
    ANTHROPIC_RATE_KEY,
    BUDGET_KEY,
    CHAT_KEY,
    RATE_KEY,
    READONLY_KEY,
)

HI = [{"role": "user", "content": "hi"}]


def _openai(gateway, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/proxy", api_key=key, max_retries=retries)


def _anthropic(gateway, key: str, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url + "/proxy", api_key=key, max_retries=retries)


def _lines(gateway, request_id: str) -> list[dict]:
    """Return the access lines of every try of a call that sent ``request_id``."""
    time.sleep(0.3)  # each line is written when its answer has ended
    return [line for line in gateway.access_lines() if line["request_id"] == request_id]


def _assert_logged_as(gateway, exc, status: int, code: str) -> None:
    """Check the SDK's ``request_id`` is the gateway's, and the access log has the refusal."""
    assert exc.status_code == status
    assert exc.request_id == exc.response.headers["X-Gateway-Request-Id"]
    line = gateway.access_line(exc.request_id)
    assert (line["status"], line["error"]) == (status, code)


OPENAI_REFUSALS = [
    # (key, call, exception, status, code)
    (
        CHAT_KEY,
        lambda c: c.embeddings.create(model="m", input="x"),
        openai.PermissionDeniedError,
        403,
        "path_not_allowed",
    ),
    (
        READONLY_KEY,
        lambda c: c.chat.completions.create(model="m", messages=HI),
        openai.PermissionDeniedError,
        403,
        "method_not_allowed",
    ),
    (
        "ck-wrong",
        lambda c: c.models.list(),
        openai.AuthenticationError,
        401,
        "invalid_client_key",
    ),
    (
        BUDGET_KEY,
        lambda c: c.chat.completions.create(model="gpt-test", messages=HI),
        openai.BadRequestError,
        400,
        "max_tokens_required",
    ),
    (
        BUDGET_KEY,
        lambda c: c.chat.completions.create(model="gpt-test", max_tokens=10, messages=HI),
        openai.RateLimitError,
        429,
        "quota_exhausted",
    ),
]


@pytest.mark.parametrize(("key", "call", "exception", "status", "code"), OPENAI_REFUSALS)
def test_openai_sdk_reads_a_refusal_as_its_own(live_gateway, key, call, exception, status, code):
    with pytest.raises(exception) as info:
        call(_openai(live_gateway, key))
    exc = info.value
    assert exc.code == code
    # OpenAI's own kinds: every refusal but a 429 is an invalid_request_error.
    assert exc.type == ("insufficient_quota" if status == 429 else "invalid_request_error")
    error = exc.body  # the SDK hands on the body's "error" object
    assert error["param"] is None
    # The message is the gateway's sentence, not a dump of its JSON.
    assert exc.message == f"Error code: {status} - {error['message']}"
    assert error["message"].endswith(".") and "{" not in exc.message
    _assert_logged_as(live_gateway, exc, status, code)


ANTHROPIC_REFUSALS = [
    # (key, call, exception, status, Anthropic's error.type, code)
    (
        ANTHROPIC_KEY,
        lambda c: c.models.list(),
        anthropic.PermissionDeniedError,
        403,
        "permission_error",
        "method_not_allowed",
    ),
    (
        "ck-wrong",
        lambda c: c.messages.create(model="claude-test", max_tokens=8, messages=HI),
        anthropic.AuthenticationError,
        401,
        "authentication_error",
        "invalid_client_key",
    ),
    (
        ANTHROPIC_BUDGET_KEY,
        lambda c: c.messages.create(model="claude-test", max_tokens=1000, messages=HI),
        anthropic.PermissionDeniedError,
        403,
        "permission_error",
        "max_tokens_not_allowed",
    ),
    (
        ANTHROPIC_BUDGET_KEY,
        lambda c: c.messages.create(model="", max_tokens=8, messages=HI),
        anthropic.BadRequestError,
        400,
        "invalid_request_error",
        "invalid_model",
    ),
    (
        ANTHROPIC_BUDGET_KEY,
        lambda c: c.messages.create(model="claude-test", max_tokens=8, messages=HI),
        anthropic.RateLimitError,
        429,
        "rate_limit_error",
        "quota_exhausted",
    ),
]


@pytest.mark.parametrize(("key", "call", "exception", "status", "kind", "code"), ANTHROPIC_REFUSALS)
def test_anthropic_sdk_reads_a_refusal_as_its_own(
    live_gateway, key, call, exception, status, kind, code
):
    with pytest.raises(exception) as info:
        call(_anthropic(live_gateway, key))
    exc = info.value
    assert exc.body["type"] == "error"
    error = exc.body["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert exc.type == kind  # what the SDK itself read from error.type
    assert error["message"].endswith(".") and error["message"] in str(exc)
    _assert_logged_as(live_gateway, exc, status, code)


def test_openai_sdk_sends_a_spent_budget_once(live_gateway):
    """max_retries=2 would send a 429 three times; x-should-retry: false stops it at one."""
    request_id = os.urandom(8).hex()
    client = _openai(live_gateway, BUDGET_KEY, retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-test",
            max_tokens=10,
            messages=HI,
            extra_headers={"X-Request-ID": request_id},  # every try carries it: one id, n lines
        )
    assert time.monotonic() - started < 2
    assert info.value.response.headers["x-should-retry"] == "false"
    assert [line["error"] for line in _lines(live_gateway, request_id)] == ["quota_exhausted"]


def test_anthropic_sdk_sends_a_spent_budget_once(live_gateway):
    """The Anthropic SDK would sleep out the whole Retry-After (hours) before each retry."""
    request_id = os.urandom(8).hex()
    client = _anthropic(live_gateway, ANTHROPIC_BUDGET_KEY, retries=2)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            client.messages.create(
                model="claude-test",
                max_tokens=8,
                messages=HI,
                extra_headers={"X-Request-ID": request_id},
            )
        except BaseException as exc:  # noqa: BLE001 - checked below, in the test's thread
            raised.append(exc)

    # In a thread: a retry would sleep for hours, and the test must fail, not hang.
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "the SDK is waiting to retry a spent budget"
    assert [type(exc) for exc in raised] == [anthropic.RateLimitError]
    assert [line["error"] for line in _lines(live_gateway, request_id)] == ["quota_exhausted"]


def _early_in_a_second() -> None:
    """Wait for the start of a second: a rate of 1/second counts in epoch-aligned seconds."""
    while time.time() % 1 > 0.3:
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("sdk", "key", "create"),
    [
        (
            _openai,
            RATE_KEY,
            lambda c, **kw: c.chat.completions.create(model="gpt-test", messages=HI, **kw),
        ),
        (
            _anthropic,
            ANTHROPIC_RATE_KEY,
            lambda c, **kw: c.messages.create(model="claude-test", max_tokens=8, messages=HI, **kw),
        ),
    ],
)
def test_sdk_retries_a_rate_limit_after_its_retry_after(live_gateway, sdk, key, create):
    _early_in_a_second()
    create(sdk(live_gateway, key))  # this second's one call
    request_id = os.urandom(8).hex()
    started = time.monotonic()
    create(sdk(live_gateway, key, retries=2), extra_headers={"X-Request-ID": request_id})
    waited = time.monotonic() - started
    tries = _lines(live_gateway, request_id)
    assert [(line["status"], line["error"]) for line in tries] == [
        (429, "rate_limited"),
        (200, None),
    ]
    # Retry-After was 1: the SDK waited about that long, not its own backoff or more.
    assert 0.5 < waited < 3
