"""HTTPS upstreams for the TLS tests: the fake upstream behind certificates made by trustme.

Each server counts its TLS handshakes, so a test can tell pooled connections from
one connection per call.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .fake_upstream import FakeUpstream


@dataclass
class PKI:
    """A CA, a second CA nobody trusts for these upstreams, and the files tests point at."""

    ca: trustme.CA
    other_ca: trustme.CA
    ca_pem: Path
    other_ca_pem: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> PKI:
    """Make two CAs and a client certificate from the first, as PEM files in ``folder``."""
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    client = ca.issue_cert("gateway-client@example.test")
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    (folder / "client.key").chmod(0o600)
    return PKI(
        ca,
        other_ca,
        folder / "ca.pem",
        folder / "other-ca.pem",
        folder / "client.pem",
        folder / "client.key",
    )


def server_context(
    pki: PKI, *names: str, expired: bool = False, require_client_cert: bool = False
) -> ssl.SSLContext:
    """Return a server context with a certificate from ``pki.ca`` for ``names``."""
    now = datetime.datetime.now(datetime.UTC)
    validity = {}
    if expired:
        validity = {
            "not_before": now - datetime.timedelta(days=30),
            "not_after": now - datetime.timedelta(days=1),
        }
    leaf = pki.ca.issue_cert(*names, **validity)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        pki.ca.configure_trust(context)
    return context


def self_signed_context(folder: Path) -> ssl.SSLContext:
    """Return a server context with a self-signed, non-CA certificate for 127.0.0.1.

    The certificate is written to ``folder / "self-signed.pem"``, for a caBundle.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "self-signed.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with trustme.Blob(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    ).tempfile() as key_file:
        context.load_cert_chain(folder / "self-signed.pem", key_file)
    return context


class TLSUpstream(FakeUpstream):
    """The fake upstream over TLS on 127.0.0.1, counting handshakes."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context
        self.handshakes = 0
        self.failed_handshakes = 0
        self._count_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host}:{port}"

    def finish_request(self, request, client_address) -> None:
        # The handshake runs in the connection's own thread, so a slow or failing
        # client never holds up accepting the next one.
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.settimeout(10)
            try:
                tls.do_handshake()
            except OSError:  # ssl.SSLError included: the client refused us, or we it
                with self._count_lock:
                    self.failed_handshakes += 1
                return
            with self._count_lock:
                self.handshakes += 1
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            tls.close()
