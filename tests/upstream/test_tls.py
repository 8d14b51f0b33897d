"""The real app under gunicorn against HTTPS upstreams: trust per target, TLS failures, pooling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ..live_gateway import ROOT, LiveGateway, free_port
from ..support import CANARIES, assert_no_canary, write_config
from ..tls_upstream import TLSUpstream, make_pki, self_signed_context, server_context

# target name -> (server, config beyond baseUrl); every target gets one client key.
TARGETS = {
    "private": ("good", {"caBundle": "ca.pem"}),  # relative: to the config file
    "other_ca": ("good", {"caBundle": "other-ca.pem"}),
    "default_store": ("good", {}),
    "wrong_name": ("wrong_name", {"caBundle": "ca.pem"}),
    "expired": ("expired", {"caBundle": "ca.pem"}),
    "mtls": ("mtls", {"caBundle": "ca.pem", "clientCert": "client.pem", "clientKey": "client.key"}),
    "mtls_no_cert": ("mtls", {"caBundle": "ca.pem"}),
    "self_signed": ("self_signed", {"caBundle": "self-signed.pem"}),
}


def key(target: str) -> dict[str, str]:
    return {"Authorization": f"Bearer ck-test-tls-{target}-0123456789"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def pki(folder):
    return make_pki(folder)


@pytest.fixture(scope="module")
def servers(pki, folder):
    started = {
        "good": TLSUpstream(server_context(pki, "127.0.0.1", "localhost")),
        "wrong_name": TLSUpstream(server_context(pki, "upstream.example")),
        "expired": TLSUpstream(server_context(pki, "127.0.0.1", expired=True)),
        "mtls": TLSUpstream(server_context(pki, "127.0.0.1", require_client_cert=True)),
        "self_signed": TLSUpstream(self_signed_context(folder)),
    }
    for server in started.values():
        server.start()
    yield started
    for server in started.values():
        server.stop()


def tls_config(servers) -> dict:
    return {
        "targets": {
            name: {"baseUrl": servers[server].url + "/v1", **extra}
            for name, (server, extra) in TARGETS.items()
        },
        "secrets": {"openai": "Bearer ${CANARY_OPENAI}"},
        "clients": {
            key(name)["Authorization"][7:]: {
                "target": name,
                "authHeaderRef": "openai",
                "allowedMethods": ["*"],
                "allowedPaths": ["/**"],
                "connectTimeoutMs": 3000,
                "timeoutMs": 5000,
            }
            for name in TARGETS
        },
    }


@pytest.fixture(scope="module")
def tls_gateway(folder, pki, servers):
    # One worker, so "one handshake per pooled connection" is an exact count.
    # The CA variables name the private CA: a gateway that read them would trust
    # it for every target, and the default_store tests would pass calls through.
    env = {
        **CANARIES,
        "REQUESTS_CA_BUNDLE": str(pki.ca_pem),
        "CURL_CA_BUNDLE": str(pki.ca_pem),
        "SSL_CERT_FILE": str(pki.ca_pem),
    }
    config = write_config(folder / "config.yaml", tls_config(servers))
    live = LiveGateway(config, env, folder / "gunicorn.log", workers=1).start()
    yield live
    live.stop()
    log = live.log_text()
    for value in CANARIES.values():
        assert value not in log, "a secret reached the gateway's log"


def wait_for_log(gateway: LiveGateway, text: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while text not in gateway.log_text():
        assert time.monotonic() < deadline, f"the gateway never logged {text!r}"
        time.sleep(0.05)


# --- trusted: calls, streams, mutual TLS, pooling ----------------------------------


def test_private_ca_target_forwards_and_adds_the_secret(tls_gateway, servers):
    response = requests.post(
        tls_gateway.url + "/proxy",
        json={"method": "POST", "path": "/echo", "body": {"q": 1}},
        headers=key("private"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    seen = servers["good"].last("/v1/echo")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert seen.body == b'{"q":1}'
    assert_no_canary(response.content)


def test_sequential_calls_and_streams_reuse_one_tls_connection(tls_gateway, servers):
    good = servers["good"]
    first = requests.get(tls_gateway.url + "/proxy/models", headers=key("private"), timeout=10)
    assert first.status_code == 200
    after_first = good.handshakes
    assert after_first >= 1
    for i in range(20):
        response = requests.get(
            tls_gateway.url + f"/proxy/echo?n={i}", headers=key("private"), timeout=10
        )
        assert response.json()["query"] == f"n={i}"
        stream = requests.get(
            tls_gateway.url + "/proxy/sse?events=3&interval=0.01",
            headers=key("private"),
            timeout=10,
        )
        events = [e for e in stream.content.split(b"\n\n") if e]
        assert len(events) == 4 and events[-1] == b"data: [DONE]"
    # 40 calls and streams after the first, one after another: the same connection.
    assert good.handshakes == after_first


def test_a_burst_opens_at_most_one_tls_connection_per_concurrent_call(tls_gateway, servers):
    good, concurrency, rounds = servers["good"], 16, 2
    before = good.handshakes
    barrier = threading.Barrier(concurrency)

    def caller(i: int) -> list[int]:
        barrier.wait(timeout=10)
        with requests.Session() as session:
            return [
                session.get(
                    tls_gateway.url + f"/proxy/echo?c={i}", headers=key("private"), timeout=20
                ).status_code
                for _ in range(5)
            ]

    for _ in range(rounds):
        with ThreadPoolExecutor(concurrency) as pool:
            statuses = [s for result in pool.map(caller, range(concurrency)) for s in result]
        assert statuses == [200] * concurrency * 5
    # 160 calls; a pooled connection serves many of them, across both bursts.
    assert good.handshakes - before <= concurrency


def test_a_self_signed_upstream_is_trusted_through_its_own_certificate(tls_gateway, servers):
    response = requests.get(tls_gateway.url + "/proxy/echo", headers=key("self_signed"), timeout=10)
    assert response.status_code == 200, response.text
    assert servers["self_signed"].handshakes == 1


def test_mutual_tls_presents_the_client_certificate(tls_gateway, servers):
    response = requests.get(tls_gateway.url + "/proxy/echo", headers=key("mtls"), timeout=10)
    assert response.status_code == 200, response.text
    assert servers["mtls"].last("/v1/echo").headers["Authorization"].startswith("Bearer ")


# --- refused: the call fails with upstream_tls_error and reaches nothing -------------


@pytest.mark.parametrize(
    ("target", "server", "kind"),
    [
        ("default_store", "good", "unknown issuer"),
        ("other_ca", "good", "unknown issuer"),
        ("wrong_name", "wrong_name", "name mismatch"),
        ("expired", "expired", "expired"),
        ("mtls_no_cert", "mtls", "handshake"),
    ],
)
def test_tls_failures_are_upstream_tls_error(tls_gateway, servers, target, server, kind):
    upstream = servers[server]
    path = f"/proxy/echo/{target}"
    response = requests.get(tls_gateway.url + path, headers=key(target), timeout=10)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream_tls_error"
    assert "TLS" in body["message"]
    assert_no_canary(response.content)
    wait_for_log(tls_gateway, f"upstream {target} TLS failed: {kind}")
    if target != "mtls_no_cert":
        # Refused before any HTTP byte: the secret never left the gateway.
        assert not [s for s in upstream.seen if s.path.endswith(f"/echo/{target}")]
    assert "sent a broken response" not in tls_gateway.log_text()


def test_a_ca_trusted_for_one_target_is_not_trusted_for_another_on_the_same_port(
    tls_gateway, servers
):
    # Same host and port, so urllib3 could hand other_ca the private target's
    # pooled, already-verified connection: it must not.
    for _ in range(3):
        trusted = requests.get(tls_gateway.url + "/proxy/echo", headers=key("private"), timeout=10)
        assert trusted.status_code == 200
        for other in ("other_ca", "default_store"):
            refused = requests.get(tls_gateway.url + "/proxy/echo", headers=key(other), timeout=10)
            assert refused.status_code == 502
            assert refused.json()["error"] == "upstream_tls_error"


def test_concurrent_trusted_and_untrusted_calls_never_mix(tls_gateway):
    def call(i: int) -> tuple[str, int]:
        target = ("private", "other_ca", "default_store")[i % 3]
        response = requests.get(tls_gateway.url + "/proxy/echo", headers=key(target), timeout=20)
        return target, response.status_code

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(120)))
    for target, status in results:
        assert status == (200 if target == "private" else 502), target


# --- check-config --probe ------------------------------------------------------------


def _probe(config_path: str) -> subprocess.CompletedProcess:
    """Run ``flask check-config --probe`` on ``config_path`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "gateway", "check-config", "--probe"],
        cwd=ROOT,
        env={**os.environ, **CANARIES, "GATEWAY_CONFIG": config_path},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_probe_reports_each_target_and_sends_no_request(folder, servers, pki):
    raw = tls_config(servers)
    raw["targets"]["closed"] = {"baseUrl": f"https://127.0.0.1:{free_port()}", "caBundle": "ca.pem"}
    raw["targets"]["plain"] = {"baseUrl": "http://127.0.0.1:9"}  # not probed: no TLS
    path = write_config(folder / "probe.yaml", raw)
    seen_before = {name: len(server.seen) for name, server in servers.items()}
    handshakes_before = servers["good"].handshakes
    result = _probe(path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "probe: TLS handshake with each https target (5 failed):" in out
    lines = dict(line.strip().split(": ", 1) for line in out.split("probe:")[1].splitlines()[1:])
    assert lines["private"] == "TLS handshake OK"
    assert lines["mtls"] == "TLS handshake OK"
    assert lines["self_signed"] == "TLS handshake OK"
    assert lines["other_ca"].startswith("TLS failed: unknown issuer")
    assert lines["default_store"].startswith("TLS failed: unknown issuer")
    assert lines["wrong_name"].startswith("TLS failed: name mismatch")
    assert lines["expired"].startswith("TLS failed: expired")
    assert lines["closed"] == "could not connect (NewConnectionError)"
    assert "plain" not in lines
    assert servers["good"].handshakes > handshakes_before
    # A handshake only: no request, so no secret, reached any upstream.
    assert {name: len(server.seen) for name, server in servers.items()} == seen_before
    assert_no_canary(out + result.stderr)


def test_probe_passes_when_every_target_shakes_hands(folder, servers):
    raw = tls_config(servers)
    raw["targets"] = {"private": raw["targets"]["private"], "mtls": raw["targets"]["mtls"]}
    raw["clients"] = {k: v for k, v in raw["clients"].items() if v["target"] in ("private", "mtls")}
    path = write_config(folder / "probe-ok.yaml", raw)
    result = _probe(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(0 failed)" in result.stdout
    assert f"private: {servers['good'].url}/v1 (trusts only " in result.stdout
