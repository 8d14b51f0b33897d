"""Spend control, Flask-free: rates, the stores' exactness, model and ceiling rules, usage."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from gateway.errors import PolicyError
from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.policy.models import ModelPattern
from gateway.spend.calls import NOT_PARSED, read_call, rewritten_body
from gateway.spend.meter import UsageMeter
from gateway.spend.store.base import DryStore, StoreUnavailable, UsageRow
from gateway.spend.store.sqlite import SQLiteStore

NOW = 1_800_000_030.0  # 30 s into a minute


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("60/minute", 60, 60), ("2000/day", 2000, 86400), (" 5 / second ", 5, 1), ("1/hour", 1, 3600)],
)
def test_rates_parse(text, count, period):
    rate = parse_rate(text)
    assert (rate.count, rate.period) == (count, period)


@pytest.mark.parametrize(
    "text", ["0/minute", "60/min", "60", "-1/day", "1.5/day", 60, None, "/day"]
)
def test_bad_rates_say_what_to_write(text):
    with pytest.raises(ValueError, match="per period"):
        parse_rate(text)


def _ask(requests=(), concurrent=None, tokens=(), reservation=0, scope="client:c"):
    limits = LimitSet(
        tuple(parse_rate(r) for r in requests), concurrent, tuple(parse_rate(t) for t in tokens)
    )
    return Ask(((scope, limits),), reservation)


@pytest.fixture
def store(tmp_path):
    return SQLiteStore(str(tmp_path / "limits.sqlite3"))


def test_a_request_limit_counts_and_resets_with_its_window(store):
    ask = _ask(requests=["2/minute"])
    first, second, third = (store.admit(ask, NOW) for _ in range(3))
    assert first.admitted and second.admitted and not third.admitted
    assert third.code == "rate_limited"
    assert third.headers()["Retry-After"] == "30"
    assert second.headers() == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "30",
        "RateLimit-Policy": '2;w=60;kind="requests"',
    }
    assert store.admit(ask, NOW + 30).admitted  # the next minute


def test_the_tightest_limit_is_the_one_in_the_headers(store):
    verdict = store.admit(_ask(requests=["100/minute", "3/day"]), NOW)
    assert verdict.headers()["RateLimit-Limit"] == "3"
    assert verdict.headers()["RateLimit-Remaining"] == "2"


def test_a_refused_call_counts_against_nothing(store):
    ask = _ask(requests=["1/minute", "10/day"])
    store.admit(ask, NOW)
    for _ in range(5):
        assert not store.admit(ask, NOW).admitted
    later = store.admit(_ask(requests=["10/day"]), NOW)
    assert later.headers()["RateLimit-Remaining"] == "8"  # 1 before, this one: 2 of 10


def test_a_concurrency_slot_is_freed_when_the_call_finishes(store):
    ask = _ask(concurrent=1)
    held = store.admit(ask, NOW)
    refused = store.admit(ask, NOW)
    assert refused.code == "too_many_concurrent"
    store.finish(held.ticket, None)
    assert store.admit(ask, NOW).admitted


def test_a_slot_whose_holder_stopped_renewing_expires(store):
    from gateway.spend.store.base import LEASE_SECONDS

    ask = _ask(concurrent=1)
    store.admit(ask, NOW)
    assert not store.admit(ask, NOW + LEASE_SECONDS - 1).admitted
    assert store.admit(ask, NOW + LEASE_SECONDS + 1).admitted


def test_a_token_reservation_is_replaced_by_the_usage_reported(store):
    ask = _ask(tokens=["1000/day"], reservation=600)
    first = store.admit(ask, NOW)
    assert store.admit(ask, NOW).code == "quota_exhausted"  # 600 reserved + 600 > 1000
    store.finish(first.ticket, 100)
    assert store.admit(ask, NOW).admitted  # 100 used + 600 <= 1000


def test_without_usage_the_reservation_stays_spent(store):
    ask = _ask(tokens=["1000/day"], reservation=600)
    store.finish(store.admit(ask, NOW).ticket, None)
    assert store.admit(ask, NOW).code == "quota_exhausted"


def test_a_dry_check_counts_nothing(store):
    ask = _ask(requests=["1/minute"])
    for _ in range(3):
        assert DryStore(store).admit(ask, NOW).admitted
    assert store.admit(ask, NOW).admitted
    refused = DryStore(store).admit(ask, NOW)
    assert (refused.admitted, refused.code) == (False, "rate_limited")


def _burst_in_process(path: str, n: int, results) -> None:
    store = SQLiteStore(path)
    ask = _ask(requests=["5/day"], tokens=["1000/day"], reservation=100)
    for _ in range(n):
        results.put(store.admit(ask).admitted)


def test_a_burst_from_four_processes_admits_exactly_the_limit(tmp_path):
    path = str(tmp_path / "limits.sqlite3")
    SQLiteStore(path).admit(_ask(requests=["1000/day"], scope="warm"))  # make the file
    results = multiprocessing.get_context("fork").Queue()
    workers = [
        multiprocessing.get_context("fork").Process(
            target=_burst_in_process, args=(path, 6, results)
        )
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    admitted = [results.get(timeout=5) for _ in range(24)]
    assert admitted.count(True) == 5


def test_a_burst_from_threads_never_overspends_a_token_budget(store):
    ask = _ask(tokens=["1000/day"], reservation=150)
    admitted = []

    def call():
        verdict = store.admit(ask)
        if verdict.admitted:
            admitted.append(verdict)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 6  # 6 x 150 = 900; a 7th would make 1050


def test_an_unusable_store_says_so(tmp_path):
    (tmp_path / "dir").mkdir()
    store = SQLiteStore(str(tmp_path / "dir"))  # a directory, not a file
    with pytest.raises(StoreUnavailable):
        store.admit(_ask(requests=["1/day"]), NOW)


def test_usage_rows_are_kept_and_read_back(store):
    store.record(UsageRow(NOW, "chat", "gpt-x", 10, 5, 200))
    assert store.usage(NOW - 1) == [UsageRow(NOW, "chat", "gpt-x", 10, 5, 200)]
    assert store.usage(NOW + 1) == []


# --- models and ceilings -------------------------------------------------------------

MODELS = (
    ModelPattern.compile("openai/gpt-4o-mini"),
    ModelPattern.compile("anthropic/claude-3-5-haiku*"),
)


def _read(body, query=(), models=MODELS, max_tokens=1024, budget=False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_call(data, query, models, max_tokens, budget)


@pytest.mark.parametrize(
    ("body", "query", "code"),
    [
        ({"model": "openai/gpt-4o", "max_tokens": 10}, (), "model_not_allowed"),
        (
            {"model": "openai/gpt-4o-mini", "max_tokens": 10},
            [("model", "openai/o1")],
            "model_not_allowed",
        ),
        ({"max_tokens": 10}, [("model", "openai/o1")], "model_not_allowed"),
        ({"model": ["openai/gpt-4o-mini"], "max_tokens": 10}, (), "invalid_model"),
        (
            b'{"model": "openai/gpt-4o-mini", "model": "openai/o1", "max_tokens": 5}',
            (),
            "invalid_json",
        ),
        (b"{not json", (), "invalid_json"),
        (b"[1, 2]", (), "invalid_json"),
        ({"model": "openai/gpt-4o-mini", "max_tokens": 2000}, (), "max_tokens_not_allowed"),
        (
            {"model": "openai/gpt-4o-mini", "max_completion_tokens": 2000},
            (),
            "max_tokens_not_allowed",
        ),
        ({"model": "openai/gpt-4o-mini"}, (), "max_tokens_required"),
        ({"model": "openai/gpt-4o-mini", "max_tokens": "10"}, (), "max_tokens_required"),
        ({"model": "openai/gpt-4o-mini", "max_tokens": True}, (), "max_tokens_required"),
        ({"model": "openai/gpt-4o-mini", "max_tokens": 0}, (), "max_tokens_required"),
    ],
)
def test_models_and_ceilings_are_refused(body, query, code):
    with pytest.raises(PolicyError) as info:
        _read(body, query)
    assert info.value.code == code


CHAT = {"model": "openai/gpt-4o-mini", "max_tokens": 10}


@pytest.mark.parametrize(
    ("body", "query", "code"),
    [
        # The model in the one form checked, or refused (model_required).
        ({"max_tokens": 10, "messages": []}, (), "model_required"),
        ({"model": None, "max_tokens": 10}, (), "model_required"),
        ({"Model": "openai/o1", "max_tokens": 10}, (), "model_required"),
        ({**CHAT, "MODEL": "openai/o1"}, (), "model_required"),
        ({**CHAT, "mo_del": "openai/o1"}, (), "model_required"),
        ({"models": ["openai/gpt-4o-mini"], "max_tokens": 10}, (), "model_required"),
        ({**CHAT, "Models": ["openai/o1"]}, (), "model_required"),
        ({"max_tokens": 10}, [("Model", "openai/gpt-4o-mini")], "model_required"),
        # Every model named is checked: OpenRouter's fallbacks too.
        ({**CHAT, "models": ["openai/gpt-4o-mini", "openai/o1"]}, (), "model_not_allowed"),
        ({**CHAT, "models": "openai/gpt-4o-mini"}, (), "invalid_model"),
        ({**CHAT, "models": [None]}, (), "invalid_model"),
        # A ceiling or a count spelled another way would be read by some upstream.
        ({**CHAT, "MAX_TOKENS": 100000}, (), "max_tokens_required"),
        ({**CHAT, "max_to\u212aens": 100000}, (), "max_tokens_required"),  # Kelvin sign
        ({**CHAT, "N": 20}, (), "invalid_choice_count"),
        ({**CHAT, "n": 0}, (), "invalid_choice_count"),
        ({**CHAT, "n": 129}, (), "invalid_choice_count"),
        ({**CHAT, "n": "2"}, (), "invalid_choice_count"),
        ({**CHAT, "best_of": 2.0}, (), "invalid_choice_count"),
        ({**CHAT, "generationConfig": {"CandidateCount": 8}}, (), "invalid_choice_count"),
    ],
)
def test_a_call_names_its_model_and_counts_in_the_one_form_checked(body, query, code):
    with pytest.raises(PolicyError) as info:
        _read(body, query)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1beta/models/gemini-2.5-pro:generateContent", "gemini-2.5-pro"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent", "gemini-2.5-pro"),
        ("/v1beta/models/gemini-2.5-pro%3AgenerateContent", "gemini-2.5-pro"),
        ("/v1/projects/p/locations/l/publishers/google/models/gemini-x:rawPredict", "gemini-x"),
        ("/openai/deployments/gpt-4o-prod/chat/completions", "gpt-4o-prod"),
        ("/model/anthropic.claude-v2/converse-stream", "anthropic.claude-v2"),
    ],
)
def test_a_model_named_in_the_path_is_checked_and_metered(path, model):
    body = json.dumps({"generationConfig": {"maxOutputTokens": 10}, "max_tokens": 10}).encode()
    with pytest.raises(PolicyError) as info:
        read_call(body, (), MODELS, None, True, path=path)
    assert info.value.code == "model_not_allowed"
    call = read_call(body, (), (ModelPattern.compile(model),), None, True, path=path)
    assert call.model == model


def test_a_path_model_needs_no_body_model_but_a_body_model_is_checked_too():
    allowed = (ModelPattern.compile("dep"),)
    path = "/openai/deployments/dep/chat/completions"
    assert read_call(json.dumps(CHAT).encode(), (), (), 50, False, path=path).model == "dep"
    with pytest.raises(PolicyError) as info:
        read_call(json.dumps(CHAT).encode(), (), allowed, None, False, path=path)
    assert info.value.code == "model_not_allowed"
    call = read_call(b'{"max_tokens": 5}', (), allowed, None, True, path=path)
    assert (call.model, call.ceiling) == ("dep", 5)


@pytest.mark.parametrize(
    "model", ["", "x" * 257, "gpt\r\nforged", "gpt\x00", "a\u202eb", "x" * 100_000]
)
def test_model_names_are_bounded_for_every_client(model):
    for models, max_tokens in ((MODELS, 1024), ((), None)):
        for body, query in (({"model": model}, ()), ({}, [("model", model)])):
            with pytest.raises(PolicyError) as info:
                _read(body, query, models=models, max_tokens=max_tokens)
            assert info.value.code == "invalid_model"
    with pytest.raises(PolicyError) as info:
        read_call(None, (), (), None, False, path=f"/v1beta/models/{model}:generateContent")
    assert info.value.code == "invalid_model"


def test_a_plain_name_of_256_characters_is_a_model():
    assert _read({"model": "é" * 256}, models=(), max_tokens=None).model == "é" * 256


@pytest.mark.parametrize(
    ("fields", "reserved"),
    [
        ({"max_tokens": 100, "n": 5}, 500),
        ({"max_tokens": 100, "n": 2, "best_of": 7}, 700),
        ({"max_output_tokens": 100, "max_tokens": 30}, 100),
        ({"generationConfig": {"maxOutputTokens": 100, "candidateCount": 4}}, 400),
        ({"generation_config": {"max_output_tokens": 100, "candidate_count": 3}}, 300),
        ({"inferenceConfig": {"maxTokens": 100}}, 100),
    ],
)
def test_the_reservation_is_the_ceiling_for_every_answer(fields, reserved):
    body = json.dumps({"model": "openai/gpt-4o-mini", **fields}).encode()
    call = read_call(body, (), MODELS, None, True)
    assert call.reservation(len(body)) == reserved + len(body)


def test_without_rules_n_and_case_variants_are_the_upstream_s_business():
    call = _read({**CHAT, "Model": "x", "n": 0}, models=(), max_tokens=None)
    assert (call.model, call.count) == ("openai/gpt-4o-mini", 1)


def test_a_star_matches_any_run_of_characters():
    call = _read({"model": "anthropic/claude-3-5-haiku-20241022", "max_tokens": 10})
    assert call.model == "anthropic/claude-3-5-haiku-20241022" and call.ceiling == 10


def test_a_call_without_a_model_is_not_an_llm_call():
    assert _read(b"", [("limit", "5")]).model is None


def test_the_reservation_bounds_the_prompt_by_its_size():
    body = json.dumps({"model": "openai/gpt-4o-mini", "max_tokens": 100, "messages": []}).encode()
    call = read_call(body, (), MODELS, None, True)
    assert call.reservation(len(body)) == 100 + len(body)


def test_a_budget_makes_a_ceiling_required_even_without_max_tokens():
    with pytest.raises(PolicyError) as info:
        _read({"model": "openai/gpt-4o-mini"}, models=(), max_tokens=None, budget=True)
    assert info.value.code == "max_tokens_required"


def test_without_rules_a_body_that_is_not_json_is_simply_not_an_llm_call():
    assert read_call(b"\x00binary", (), (), None, False).model is None


def test_streamed_chat_calls_are_asked_for_usage():
    call = _read({"model": "openai/gpt-4o-mini", "max_tokens": 5, "stream": True})
    body = json.loads(rewritten_body(call, "/chat/completions", True))
    assert body["stream_options"] == {"include_usage": True}
    assert rewritten_body(call, "/v1/messages", True) is None  # Anthropic reports it anyway


# --- usage read from answers -----------------------------------------------------------


def _meter(content_type: str, pieces: list[bytes], whole=True) -> UsageMeter:
    meter = UsageMeter(content_type)
    for piece in pieces:
        meter.feed(piece)
    if whole:
        meter.end()
    return meter


def test_openai_json_usage():
    body = json.dumps({"usage": {"prompt_tokens": 12, "completion_tokens": 30}}).encode()
    meter = _meter("application/json", [body[:7], body[7:]])
    assert (meter.input_tokens, meter.output_tokens, meter.tokens) == (12, 30, 42)


def test_openai_stream_usage_from_the_last_chunk():
    events = [
        b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": null}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    assert (
        _meter("text/event-stream", [stream[i : i + 5] for i in range(0, len(stream), 5)]).tokens
        == 10
    )


def test_anthropic_stream_usage_input_from_the_start_output_cumulative():
    start = {"usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 1}}
    events = [
        b"event: message_start\ndata: "
        + json.dumps({"type": "message_start", "message": start}).encode()
        + b"\n\n",
        *(
            b"event: message_delta\ndata: "
            + json.dumps({"type": "message_delta", "usage": {"output_tokens": n}}).encode()
            + b"\n\n"
            for n in (9, 15)
        ),
    ]
    meter = _meter("text/event-stream", events)
    assert (meter.input_tokens, meter.output_tokens) == (25, 15)


def test_gemini_usage_from_a_stream_and_an_array():
    chunk = {"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5}}
    last = {
        "usageMetadata": {
            "promptTokenCount": 8,
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 7,
        }
    }
    events = [b"data: " + json.dumps(m).encode() + b"\r\n\r\n" for m in (chunk, last)]
    meter = _meter("text/event-stream", events)
    assert (meter.input_tokens, meter.output_tokens) == (8, 27)
    meter = _meter("application/json", [json.dumps([chunk, last]).encode()])
    assert meter.tokens == 35


def test_bedrock_converse_usage():
    body = {"usage": {"inputTokens": 4, "outputTokens": 6, "cacheReadInputTokens": 2}}
    assert _meter("application/json", [json.dumps(body).encode()]).tokens == 12


@pytest.mark.parametrize(
    ("usage", "kind"),
    [
        ({"prompt_tokens": 10**20, "completion_tokens": 5}, "input"),
        ({"prompt_tokens": 10, "completion_tokens": -5}, "output"),
        ({"prompt_tokens": 10, "completion_tokens": 2**53 + 1}, "output"),
        ({"prompt_tokens": 10.5, "completion_tokens": 5}, "input"),
        ({"prompt_tokens": "10", "completion_tokens": 5}, "input"),
        ({"input_tokens": 2**53, "cache_read_input_tokens": 1, "output_tokens": 1}, "input"),
        ({"input_tokens": 3, "output_tokens": True}, "output"),
    ],
)
def test_absurd_usage_is_distrusted(usage, kind):
    meter = _meter("application/json", [json.dumps({"usage": usage}).encode()])
    assert meter.tokens is None and meter.distrusted == {kind}
    assert all(v is None or 0 <= v <= 2**53 for v in (meter.input_tokens, meter.output_tokens))


def test_a_null_cache_figure_is_no_usage_not_a_bad_one():
    usage = {"input_tokens": 3, "cache_read_input_tokens": None, "output_tokens": 4}
    meter = _meter("application/json", [json.dumps({"usage": usage}).encode()])
    assert (meter.tokens, meter.distrusted) == (7, set())


def test_a_cut_stream_reports_no_usage():
    events = [b'data: {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n']
    assert _meter("text/event-stream", events, whole=False).tokens is None


def test_a_body_already_read_as_json_is_checked_the_same():
    call = read_call(
        None, (), MODELS, 1024, False, {"model": "openai/gpt-4o-mini", "max_tokens": 9}
    )
    assert (call.model, call.ceiling) == ("openai/gpt-4o-mini", 9)
    with pytest.raises(PolicyError) as info:
        read_call(None, (), MODELS, 1024, False, ["openai/o1"])
    assert info.value.code == "invalid_json"
    with pytest.raises(PolicyError) as info:
        read_call(None, (), MODELS, 1024, False, {"model": "openai/o1", "max_tokens": 9})
    assert info.value.code == "model_not_allowed"


@pytest.mark.parametrize(
    ("body", "code", "reason"),
    [
        ({"MODEL": "a", "Model": "b", "model": "c"}, "model_required", "writes 'MODEL'"),
        (
            {"model": "m", "max_tokens": 5, "Max_Tokens": 5, "MAX_TOKENS": 5},
            "max_tokens_required",
            "writes 'Max_Tokens'",
        ),
        (
            {"model": "m", "max_tokens": 5, "max_to\u212aens": 5},
            "max_tokens_required",
            "writes 'max_to\u212aens'",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "generationConfig": {"maxOutputTokens": 5, "MaxOutputTokens": 9},
            },
            "max_tokens_required",
            "writes 'MaxOutputTokens'",
        ),
        (
            {"model": "m", "max_tokens": 5, "generation_config": {}, "GenerationConfig": {}},
            "max_tokens_required",
            "writes 'GenerationConfig'",
        ),
        ({"model": "m", "max_tokens": 5, "N": 2, "n": 1}, "invalid_choice_count", "writes 'N'"),
        ({"model": "m", "max_tokens": 5, "Models": ["m"]}, "model_required", "writes 'Models'"),
    ],
)
def test_the_first_respelled_key_is_the_one_refused(body, code, reason):
    # Each object's keys are folded once for all the fields read from it; the
    # refusal still names the first respelled key in the body's own order.
    for data in (json.dumps(body, ensure_ascii=False).encode(), None):
        with pytest.raises(PolicyError) as info:
            read_call(data, (), (), None, True, body if data is None else NOT_PARSED)
        assert (info.value.code, info.value.reason.split(";")[0]) == (code, reason)


@pytest.mark.parametrize(
    "data",
    [
        b'{"model": "m", "model": "m", "max_tokens": 5}',
        b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "role": "system"}]}',
        b'{"model": "m", "max_tokens": 5, "generationConfig": {"a": 1, "b": {"c": 1, "c": 2}}}',
        b'{"model": "m", "max_tokens": 5, "mod\\u0065l": "x"}',
    ],
)
def test_a_key_written_twice_anywhere_is_refused(data):
    with pytest.raises(PolicyError) as info:
        read_call(data, (), (), None, True)
    assert info.value.code == "invalid_json"
    # Without rules such a body is not read as an LLM call at all (nothing to meter by).
    assert read_call(data, (), (), None, False).model is None
