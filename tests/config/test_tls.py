"""TLS settings in the config: caBundle, clientCert, clientKey, and plain-http warnings."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from gateway import create_app
from gateway.config.source import load_config
from gateway.errors import ConfigError

from ..support import AUTH, CANARIES, base_config, write_config
from ..tls_upstream import TLSUpstream, make_pki, server_context

HTTPS = "https://api.example.com/v1"


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


def load(tmp_path, target: dict, name: str = "config.yaml"):
    raw = base_config(target.pop("baseUrl", HTTPS))
    raw["targets"]["api"].update(target)
    return load_config(write_config(tmp_path / name, raw), CANARIES)


def problems(tmp_path, target: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, target)
    return caught.value.problems


def test_tls_paths_are_relative_to_the_config_file(tmp_path, pki, monkeypatch):
    monkeypatch.chdir("/")
    (tmp_path / "conf").mkdir()
    config = load(
        tmp_path,
        {"caBundle": "../ca.pem", "clientCert": "../client.pem", "clientKey": "../client.key"},
        "conf/config.yaml",
    )
    target = config.targets["api"]
    assert target.ca_bundle == str(tmp_path / "conf" / ".." / "ca.pem")
    assert target.client_cert == str(tmp_path / "conf" / ".." / "client.pem")
    assert target.client_key == str(tmp_path / "conf" / ".." / "client.key")
    assert config.warnings == ()


def test_a_target_without_tls_settings_uses_the_default_store(tmp_path):
    target = load(tmp_path, {}).targets["api"]
    assert (target.ca_bundle, target.client_cert, target.client_key) == (None, None, None)


def _encrypted_key(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    path = tmp_path / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a password"),
        )
    )
    path.chmod(0o600)
    return path.name


def _other_key(pki, tmp_path):
    other = pki.other_ca.issue_cert("someone-else.example")
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "other.key").chmod(0o600)
    return "other.key"


def _file(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return name


HALF_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBnotbase64!!\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("make_target", "expected"),
    [
        (lambda t, p: {"caBundle": "missing.pem"}, "caBundle: {}/missing.pem: file not found"),
        (lambda t, p: {"caBundle": "."}, "caBundle: {}: is a directory; name a PEM file"),
        (
            lambda t, p: {"caBundle": _file(t, "empty.pem", b"")},
            "caBundle: {}/empty.pem: holds no PEM certificate",
        ),
        (
            lambda t, p: {"caBundle": "client.key"},
            "caBundle: {}/client.key: holds no PEM certificate",
        ),
        (
            lambda t, p: {"caBundle": _file(t, "broken.pem", HALF_PEM)},
            "caBundle: {}/broken.pem: holds a certificate that cannot be parsed",
        ),
        (lambda t, p: {"caBundle": ""}, "caBundle: must not be empty"),
        (
            lambda t, p: {"baseUrl": "http://127.0.0.1:8080", "caBundle": "ca.pem"},
            "caBundle: applies only to an https baseUrl",
        ),
        (
            lambda t, p: {"clientKey": "client.key"},
            "clientKey: needs clientCert, the certificate it belongs to",
        ),
        (
            lambda t, p: {"clientCert": "client.pem", "clientKey": "nokey.pem"},
            "clientKey: {}/nokey.pem: file not found",
        ),
        (
            lambda t, p: {"clientCert": "client.pem"},
            "clientCert: {}/client.pem: holds no PEM private key; set clientKey",
        ),
        (
            lambda t, p: {"clientCert": "client.key", "clientKey": "client.key"},
            "clientCert: {}/client.key: holds no PEM certificate",
        ),
        (
            lambda t, p: {"clientCert": "client.pem", "clientKey": _other_key(p, t)},
            "clientKey: {}/other.key: the key does not belong to clientCert's certificate",
        ),
        (
            lambda t, p: {"clientCert": "client.pem", "clientKey": _encrypted_key(p, t)},
            "clientKey: {}/encrypted.key: the key is encrypted",
        ),
    ],
)
def test_bad_tls_files_are_located_problems(tmp_path, pki, make_target, expected):
    found = problems(tmp_path, make_target(tmp_path, pki))
    assert len(found) == 1, found
    assert f"targets.api.{expected.format(tmp_path)}" in found[0]


def test_every_tls_problem_is_reported_at_once(tmp_path, pki):
    found = problems(
        tmp_path, {"caBundle": "nope.pem", "clientCert": "nope.crt", "clientKey": "nope.key"}
    )
    assert [p.split(": ")[1] for p in found] == ["targets.api.caBundle", "targets.api.clientCert"]


def test_a_combined_cert_and_key_file_is_accepted(tmp_path, pki):
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    combined.chmod(0o600)
    target = load(tmp_path, {"clientCert": "combined.pem"}).targets["api"]
    assert target.client_cert == str(combined) and target.client_key is None


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o604, True)])
def test_a_key_readable_by_others_is_warned_about(tmp_path, pki, mode, warned):
    pki.client_key.chmod(mode)
    config = load(tmp_path, {"clientCert": "client.pem", "clientKey": "client.key"})
    assert bool(config.warnings) == warned
    if warned:
        assert (
            f"targets.api.clientKey: {pki.client_key} is readable by group or others"
            in (config.warnings[0])
        )
        assert f"(mode {mode:03o}); chmod 600" in config.warnings[0]


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://127.0.0.1:8080", False),
        ("http://127.5.5.5", False),
        ("http://[::1]:9000/v1", False),
        ("http://10.1.2.3", False),
        ("http://192.168.1.20:8000", False),
        ("http://172.20.0.5", False),
        ("http://[fd00::5]", False),
        ("http://localhost:8000", False),
        ("http://api.localhost", False),
        ("http://backend:8000", False),  # a single-label (container) name
        ("https://api.example.com", False),
        ("http://api.example.com/v1", True),
        ("http://8.8.8.8", True),
        ("http://[2001:4860::8888]", True),
        ("http://upstream.internal.corp", True),
    ],
)
def test_plain_http_off_the_local_network_is_warned_about(tmp_path, url, warned):
    config = load(tmp_path, {"baseUrl": url})
    assert bool(config.warnings) == warned
    if warned:
        assert "targets.api.baseUrl: plain http to " in config.warnings[0]
        assert config.warnings[0].endswith("use https")


def test_check_config_prints_warnings_and_trust_without_failing(tmp_path, pki):
    raw = base_config("http://api.example.com/v1")
    raw["targets"]["private"] = {
        "baseUrl": "https://private.example.com",
        "caBundle": "ca.pem",
        "clientCert": "client.pem",
        "clientKey": "client.key",
    }
    pki.client_key.chmod(0o644)
    app = create_app(
        {
            "TESTING": True,
            "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", raw),
            "GATEWAY_ENVIRON": dict(CANARIES),
        }
    )
    result = app.test_cli_runner().invoke(args=["check-config"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr
    assert "targets.api.baseUrl: plain http to api.example.com" in result.stderr
    assert "targets.private.clientKey: " in result.stderr
    assert (
        f"private: https://private.example.com (trusts only {pki.ca_pem}; "
        f"client certificate {pki.client_cert})" in result.stdout
    )


def test_a_ca_bundle_removed_after_start_is_a_tls_error_not_a_crash(tmp_path, pki):
    server = TLSUpstream(server_context(pki, "127.0.0.1")).start()
    try:
        raw = base_config(server.url + "/v1")
        raw["targets"]["api"]["caBundle"] = "ca.pem"
        app = create_app(
            {
                "TESTING": True,
                "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", raw),
                "GATEWAY_ENVIRON": dict(CANARIES),
            }
        )
        client = app.test_client()
        assert client.get("/proxy/models", headers=AUTH).status_code == 200
        pki.ca_pem.unlink()
        response = client.get("/proxy/models", headers=AUTH)
        assert response.status_code == 502
        assert response.json["error"] == "upstream_tls_error"
    finally:
        server.stop()
