"""The OpenAPI document: valid, complete, and the envelope endpoint fuzzed from it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode

from gateway import create_app

from ..live_gateway import free_port
from ..support import CANARIES, CHAT_KEY, base_config, write_config


def test_document_is_valid_openapi(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    validate(document)
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/proxy", "/proxy/{path}", "/health"}
    assert document["components"]["securitySchemes"]["clientKey"]["scheme"] == "bearer"
    envelope = document["paths"]["/proxy"]["post"]
    for status in ("400", "401", "403", "413", "502", "504"):
        assert "`error` is one of" in envelope["responses"][status]["description"]
    assert "path_not_allowed" in envelope["responses"]["403"]["description"]
    assert document["components"]["schemas"]["Envelope"]["additionalProperties"] is False


def test_docs_page_and_assets_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "swagger-ui-bundle.js" in text and "http" not in text.replace("openapi.json", "")
    asset = client.get("/docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.get_data()) > 100_000


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    # The target is a closed loopback port: every forwarded call fails fast with 502.
    config = base_config(f"http://127.0.0.1:{free_port()}/v1")
    path = write_config(tmp_path_factory.mktemp("fuzz") / "config.yaml", config)
    return create_app({"GATEWAY_CONFIG": path, "GATEWAY_ENVIRON": CANARIES})


def test_envelope_endpoint_never_answers_500(fuzz_app):
    # schemathesis builds the cases from /openapi.json; hypothesis drives them.
    operation = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)["/proxy"]["POST"]

    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(headers={"Authorization": f"Bearer {CHAT_KEY}"})
        assert response.status_code != 500, response.text
        assert response.status_code in (400, 401, 403, 413, 502, 504), response.text
        body = response.json()
        assert set(body) - {"fields"} == {"error", "message", "request_id"}
        assert [body["request_id"]] == response.headers["x-gateway-request-id"]
        for value in CANARIES.values():
            assert value not in response.text

    check()
