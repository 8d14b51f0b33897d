"""Request ids, the access log, the client address and /metrics, with a mocked upstream."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from gateway.config.load import parse_config
from gateway.errors import ConfigError
from gateway.observe.access_log import fields, text_line
from gateway.observe.metrics import Metrics
from gateway.observe.record import Observers, Record, request_id
from gateway.policy.keys import new_key

from ..support import AUTH, CANARIES, CHAT_KEY, UPSTREAM, base_config, write_config

METRICS_TOKEN = CANARIES["CANARY_METRICS"]
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}
GENERATED = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def call(client, method, path, **kwargs):
    """Make a request and close its answer, as a WSGI server does (observers run on close)."""
    return client.open(path, method=method, buffered=True, **kwargs)


def log_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture
def config_dict() -> dict:
    config = base_config()
    config["secrets"]["metrics"] = "${CANARY_METRICS}"
    config["metrics"] = {"tokenRef": "metrics"}
    return config


# --- request ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/health", {}, 200),
        ("GET", "/nowhere", {}, 404),
        ("GET", "/proxy", {}, 405),
        ("GET", "/proxy/models", {}, 401),
        ("GET", "/proxy/admin", AUTH, 403),
        ("GET", "/proxy/a/%2e%2e/b", AUTH, 400),
        ("GET", "/metrics", {}, 401),
        ("GET", "/proxy/models", AUTH, 200),
    ],
)
def test_every_answer_carries_a_request_id_and_errors_name_it(
    client, mocked_upstream, method, path, headers, status
):
    if status == 200 and path.startswith("/proxy"):
        mocked_upstream.get(UPSTREAM + "/models", json={"data": []})
    response = call(client, method, path, headers=headers)
    assert response.status_code == status
    rid = response.headers["X-Gateway-Request-Id"]
    assert GENERATED.fullmatch(rid)
    if status >= 400:
        assert response.get_json()["request_id"] == rid


def test_ids_are_new_for_every_request(client):
    ids = {call(client, "GET", "/health").headers["X-Gateway-Request-Id"] for _ in range(500)}
    assert len(ids) == 500


@pytest.mark.parametrize(
    ("offered", "adopted"),
    [
        ("abc-123", True),
        ("a" * 128, True),
        ("trace:1.2_3-x", True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ('quote"d', False),
        ("é-accent", False),
    ],
)
def test_a_client_request_id_is_adopted_only_when_safe(client, mocked_upstream, offered, adopted):
    mocked_upstream.get(UPSTREAM + "/models", json={})
    response = call(client, "GET", "/proxy/models", headers={**AUTH, "X-Request-ID": offered})
    rid = response.headers["X-Gateway-Request-Id"]
    assert (rid == offered) is adopted
    if not adopted:
        assert GENERATED.fullmatch(rid)
    # The upstream gets the gateway's id, never the unusable one the client sent.
    assert mocked_upstream.calls[0].request.headers["X-Request-ID"] == rid


def test_the_upstreams_own_request_ids_pass_through_untouched(client, mocked_upstream):
    mocked_upstream.get(
        UPSTREAM + "/models",
        json={},
        headers={"x-request-id": "req_openai_1", "request-id": "req_anthropic_1"},
    )
    response = call(client, "GET", "/proxy/models", headers=AUTH)
    assert response.headers["x-request-id"] == "req_openai_1"
    assert response.headers["request-id"] == "req_anthropic_1"
    assert response.headers["X-Gateway-Request-Id"] not in ("req_openai_1", "req_anthropic_1")


def test_an_upstream_cannot_set_the_gateways_request_id(client, mocked_upstream):
    mocked_upstream.get(UPSTREAM + "/models", json={}, headers={"X-Gateway-Request-Id": "forged"})
    response = call(client, "GET", "/proxy/models", headers=AUTH)
    assert response.headers.getlist("X-Gateway-Request-Id") != ["forged"]
    assert len(response.headers.getlist("X-Gateway-Request-Id")) == 1


def test_request_id_rule():
    assert request_id("ok") == "ok"
    assert request_id(None) != request_id(None)
    assert GENERATED.fullmatch(request_id("\r\nX-Injected: 1"))


# --- the access log -------------------------------------------------------------


def test_one_json_line_per_request_with_the_documented_fields(client, mocked_upstream, capsys):
    mocked_upstream.post(
        UPSTREAM + "/chat/completions", json={"ok": 1}, headers={"x-request-id": "req_up_7"}
    )
    capsys.readouterr()
    body = json.dumps({"method": "POST", "path": "/chat/completions", "query": {"q": "v"}})
    answer = call(
        client,
        "POST",
        "/proxy",
        data=body,
        content_type="application/json",
        headers={**AUTH, "X-Request-ID": "r-1"},
    )
    (line,) = log_lines(capsys)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("time"))
    assert line.pop("duration_ms") >= line.pop("ttfb_ms") >= 0
    assert line == {
        "request_id": "r-1",
        "remote": "127.0.0.1",
        "client": "client#1",
        "target": "api",
        "method": "POST",
        "path": "/chat/completions",
        "status": 200,
        "error": None,
        "upstream_status": 200,
        "upstream_request_id": "req_up_7",
        "bytes_in": len(body),
        "bytes_out": len(answer.get_data()),
    }


def test_refusals_are_logged_with_their_code_and_no_client_before_authentication(client, capsys):
    capsys.readouterr()
    call(client, "GET", f"/proxy/models?key={CHAT_KEY}")
    call(client, "GET", "/proxy/admin?x=1", headers=AUTH)
    pasted = new_key()
    call(client, "GET", f"/probe/{pasted}/x")
    unauthenticated, refused, unknown = log_lines(capsys)
    assert "client" not in unauthenticated
    assert (unauthenticated["status"], unauthenticated["error"]) == (401, "missing_client_key")
    assert unauthenticated["path"] == "/proxy/models"  # what was probed, never the query
    assert (refused["client"], refused["path"], refused["error"]) == (
        "client#1",
        "/admin",
        "path_not_allowed",
    )
    # A gk_ key pasted into a path is never logged.
    assert (unknown["path"], unknown["error"]) == ("/probe/gk_[redacted]/x", "not_found")
    text = json.dumps([unauthenticated, refused, unknown])
    assert CHAT_KEY not in text and "x=1" not in text and pasted not in text


def test_a_long_probed_path_is_logged_bounded(client, capsys):
    capsys.readouterr()
    call(client, "GET", "/proxy/" + "a" * 5000)
    (line,) = log_lines(capsys)
    assert line["error"] == "missing_client_key"
    assert line["path"] == ("/proxy/" + "a" * 5000)[:1024]


def test_the_text_format_is_one_readable_line(tmp_path, config_dict, capsys):
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
            "GATEWAY_ENVIRON": CANARIES,
            "GATEWAY_LOG_FORMAT": "text",
        }
    )
    capsys.readouterr()
    call(app.test_client(), "GET", "/proxy/admin", headers={**AUTH, "X-Request-ID": "t-1"})
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"\S+Z 127\.0\.0\.1 client#1 GET api:/admin 403 path_not_allowed "
        r"[\d.]+ms ttfb=[\d.]+ms in=0 out=\d+ upstream=- upstream_id=- id=t-1",
        line,
    ), line


def test_text_values_that_could_break_the_line_are_quoted():
    record = Record("r", "1.2.3.4", "GET", Observers(), upstream_request_id='a b"\nc')
    record.finish()
    line = text_line(fields(record))
    assert "\n" not in line and 'upstream_id="a b\\"\\nc"' in line


def test_an_unknown_log_format_is_a_config_problem(tmp_path, config_dict):
    with pytest.raises(ConfigError, match="GATEWAY_LOG_FORMAT: 'xml' is not a log format"):
        create_app(
            {
                "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
                "GATEWAY_ENVIRON": CANARIES,
                "GATEWAY_LOG_FORMAT": "xml",
            }
        )


def test_usage_filled_in_by_a_pipeline_stage_is_logged_and_counted():
    # Issue 10's usage meter sets these on the record: nothing else has to change.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    observers = Observers(finished=[metrics.finished])
    record = Record("r", "1.2.3.4", "POST", observers, client="client#1", target="api")
    record.model, record.input_tokens, record.output_tokens = "gpt-x", 12, 34
    record.status = 200
    record.finish()
    line = fields(record)
    assert (line["model"], line["input_tokens"], line["output_tokens"]) == ("gpt-x", 12, 34)
    labels = {"client": "client#1", "model": "gpt-x"}
    assert registry.get_sample_value("gateway_tokens_total", {**labels, "kind": "input"}) == 12
    assert registry.get_sample_value("gateway_tokens_total", {**labels, "kind": "output"}) == 34
    record.finish()  # a second close counts nothing twice
    assert registry.get_sample_value("gateway_tokens_total", {**labels, "kind": "input"}) == 12


def test_max_model_labels_is_read_from_the_config():
    raw = base_config()
    raw["secrets"]["key"] = "${METRICS_KEY}"
    env = {**CANARIES, "METRICS_KEY": "metrics-token-long-enough"}
    raw["metrics"] = {"tokenRef": "key"}
    assert parse_config(raw, env).max_model_labels == 100
    raw["metrics"]["maxModelLabels"] = 7
    assert parse_config(raw, env).max_model_labels == 7


def test_the_model_label_holds_at_most_max_models_names_and_other():
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_models=3)
    observers = Observers(finished=[metrics.finished])
    for i in range(10):
        record = Record(f"r{i}", "1.2.3.4", "POST", observers, client="c", target="api")
        record.model, record.input_tokens, record.status = f"model-{i % 5}", 1, 200
        record.finish()
    samples = [s for f in registry.collect() if f.name == "gateway_tokens" for s in f.samples]
    models = {s.labels["model"]: s.value for s in samples if s.name == "gateway_tokens_total"}
    assert models == {"model-0": 2, "model-1": 2, "model-2": 2, "other": 4}


# --- client address -------------------------------------------------------------


def _remote(tmp_path, config_dict, capsys, trusted, forwarded):
    if trusted is not None:
        config_dict["trustedProxies"] = trusted
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", config_dict),
            "GATEWAY_ENVIRON": CANARIES,
        }
    )
    capsys.readouterr()
    call(
        app.test_client(),
        "GET",
        "/health",
        headers={"X-Forwarded-For": forwarded},
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )
    return log_lines(capsys)[0]["remote"]


@pytest.mark.parametrize(
    ("trusted", "forwarded", "remote"),
    [
        (None, "203.0.113.9", "10.0.0.1"),  # default 0: forwarded headers are ignored
        (0, "203.0.113.9", "10.0.0.1"),
        (1, "203.0.113.9", "203.0.113.9"),
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # a hop the client wrote is not believed
        (2, "6.6.6.6, 203.0.113.9", "6.6.6.6"),
        (2, "203.0.113.9", "10.0.0.1"),  # fewer hops than trusted: none believed
    ],
)
def test_trusted_proxies_decide_the_client_address(
    tmp_path, config_dict, capsys, trusted, forwarded, remote
):
    assert _remote(tmp_path, config_dict, capsys, trusted, forwarded) == remote


# --- /metrics -------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_need_the_metrics_token(client):
    for headers in (
        {},
        AUTH,  # a client key is not a metrics token
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": "Bearer é"},
    ):
        response = call(client, "GET", "/metrics", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_metrics_token"
        assert METRICS_TOKEN not in response.get_data(as_text=True)
    assert call(client, "GET", "/metrics", headers=SCRAPE).status_code == 200


def test_without_a_metrics_section_there_is_no_metrics_route(tmp_path):
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(tmp_path / "c.yaml", base_config()),
            "GATEWAY_ENVIRON": CANARIES,
        }
    )
    response = call(app.test_client(), "GET", "/metrics", headers=SCRAPE)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


def test_metrics_count_requests_refusals_latency_and_in_flight(client, mocked_upstream):
    mocked_upstream.get(UPSTREAM + "/models", json={})
    call(client, "GET", "/proxy/models", headers=AUTH)
    call(client, "GET", "/proxy/admin", headers=AUTH)
    call(client, "GET", "/proxy/models")
    found = samples(call(client, "GET", "/metrics", headers=SCRAPE).get_data(as_text=True))

    def labels(**values):
        return frozenset(values.items())

    chat = {"client": "client#1", "target": "api"}
    assert found["gateway_requests_total", labels(**chat, status="200")] == 1
    assert found["gateway_requests_total", labels(**chat, status="403")] == 1
    assert found["gateway_requests_total", labels(client="", target="", status="401")] == 1
    refused = labels(client="client#1", code="path_not_allowed")
    assert found["gateway_refusals_total", refused] == 1
    assert found["gateway_refusals_total", labels(client="", code="missing_client_key")] == 1
    assert found["gateway_request_duration_seconds_count", labels(**chat)] == 2
    assert found["gateway_upstream_ttfb_seconds_count", labels(target="api")] == 1
    assert found["gateway_in_flight", labels(target="api")] == 0


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(trustedProxies=-1), "trustedProxies: must be greater than"),
        (lambda c: c.update(trustedProxies="1"), "trustedProxies: not a valid integer"),
        (lambda c: c.update(metrics={}), "metrics.tokenRef: is required"),
        (lambda c: c.update(metrics={"tokenRef": "nope"}), "metrics.tokenRef: unknown secret"),
        (lambda c: c.update(metrics={"tokenRf": "x"}), "metrics.tokenRf: unknown field; did you"),
        (lambda c: c.update(metrics="yes"), "metrics: invalid input type"),
        (
            lambda c: c["metrics"].update(maxModelLabels=-1),
            "metrics.maxModelLabels: must be greater than or equal to 0",
        ),
        (
            lambda c: c.update(metrics={"tokenRef": "openai"}, secrets={"openai": "short-1"}),
            "metrics.tokenRef: secret 'openai' is shorter than 16",
        ),
        (
            lambda c: c["secrets"].update(key="${KEY}"),
            "metrics.tokenRef: secret 'key' is also a client key",
        ),
    ],
)
def test_observability_config_problems_are_located(mutate, expected):
    raw = base_config()
    raw["metrics"] = {"tokenRef": "key"}
    raw["secrets"]["key"] = "${METRICS_KEY}"
    mutate(raw)
    env = {**CANARIES, "METRICS_KEY": "metrics-token-long-enough", "KEY": CHAT_KEY}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
    assert not any(CHAT_KEY in p for p in caught.value.problems)


def test_the_usage_meter_fills_the_record_for_the_log_and_the_metrics(
    client, mocked_upstream, capsys
):
    usage = {"model": "gpt-x", "usage": {"prompt_tokens": 12, "completion_tokens": 34}}
    mocked_upstream.post(UPSTREAM + "/chat/completions", json=usage)
    capsys.readouterr()
    body = {"model": "gpt-x", "max_tokens": 50, "messages": []}
    assert call(client, "POST", "/proxy/chat/completions", json=body, headers=AUTH).status_code
    (line,) = log_lines(capsys)
    assert (line["model"], line["input_tokens"], line["output_tokens"]) == ("gpt-x", 12, 34)
    found = samples(call(client, "GET", "/metrics", headers=SCRAPE).get_data(as_text=True))
    labels = {("client", "client#1"), ("model", "gpt-x")}
    assert found["gateway_tokens_total", frozenset({*labels, ("kind", "input")})] == 12
    assert found["gateway_tokens_total", frozenset({*labels, ("kind", "output")})] == 34


def test_every_gateway_module_logs_at_info_through_the_gateway_handler(app):
    # One logger for the whole package: a module deep in it (a resend's info line)
    # is heard as well as the edge.
    import logging

    for name in ("gateway.upstream.client", "gateway.spend.admission", "gateway.edge.routes"):
        logger = logging.getLogger(name)
        assert logger.isEnabledFor(logging.INFO), name
    assert logging.getLogger("gateway").handlers
