"""The official OpenAI and Anthropic SDKs, changed only in base_url, through the real gateway."""

from __future__ import annotations

import anthropic
import openai
import pytest

from ..support import ANTHROPIC_KEY, CANARIES, CHAT_KEY, READONLY_KEY


@pytest.fixture
def openai_client(live_gateway):
    return openai.OpenAI(base_url=live_gateway.url + "/proxy", api_key=CHAT_KEY, max_retries=0)


@pytest.fixture
def anthropic_client(live_gateway):
    return anthropic.Anthropic(
        base_url=live_gateway.url + "/proxy", api_key=ANTHROPIC_KEY, max_retries=0
    )


def assert_secret_not_key(seen, header, secret):
    assert seen.headers[header] == secret
    assert CHAT_KEY not in str(seen.headers) and ANTHROPIC_KEY not in str(seen.headers)


def test_openai_chat_completion(openai_client, fake_upstream):
    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Hello from the fake upstream"
    seen = fake_upstream.last("/v1/chat/completions")
    assert_secret_not_key(seen, "Authorization", "Bearer " + CANARIES["CANARY_OPENAI"])


def test_openai_streaming_chunks_arrive_as_sent(openai_client, fake_upstream):
    # "lockstep": the upstream sends each chunk only after the SDK yielded the last one.
    stream = openai_client.chat.completions.create(
        model="lockstep", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    words = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
            fake_upstream.release.release()
    assert words == ["Hello", " from", " the", " fake", " upstream"]


def test_openai_models_list(openai_client):
    assert [m.id for m in openai_client.models.list()] == ["gpt-test"]


def test_openai_disallowed_path_raises_permission_denied(openai_client):
    with pytest.raises(openai.PermissionDeniedError) as info:
        openai_client.embeddings.create(model="m", input="x")
    assert info.value.status_code == 403
    assert info.value.response.json()["error"] == "path_not_allowed"


def test_openai_disallowed_method_raises_permission_denied(live_gateway):
    client = openai.OpenAI(
        base_url=live_gateway.url + "/proxy", api_key=READONLY_KEY, max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.json()["error"] == "method_not_allowed"


def test_openai_unknown_key_raises_authentication_error(live_gateway):
    client = openai.OpenAI(base_url=live_gateway.url + "/proxy", api_key="ck-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_anthropic_message(anthropic_client, fake_upstream):
    message = anthropic_client.messages.create(
        model="claude-test", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "Hello from Claude's stand-in"
    seen = fake_upstream.last("/v1/messages")
    assert_secret_not_key(seen, "x-api-key", CANARIES["CANARY_ANTHROPIC"])
    assert "anthropic-version" in {k.lower() for k in seen.headers}


def test_anthropic_message_stream(anthropic_client, fake_upstream):
    texts = []
    with anthropic_client.messages.stream(
        model="lockstep", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        for text in stream.text_stream:
            texts.append(text)
            fake_upstream.release.release()
        final = stream.get_final_message()
    assert texts == ["Hello", " from", " Claude's", " stand-in"]
    assert final.stop_reason == "end_turn"


def test_anthropic_disallowed_path_raises_permission_denied(anthropic_client):
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client.models.list()
