"""Upstream TLS: what each target trusts, its config checks, and what a TLS failure was.

Plain Python with no Flask imports. The gateway never turns verification off: a
target trusts either the default store (certifi, as requests ships it) or, with
``caBundle``, only the CAs in that file.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.util.ssl_match_hostname import CertificateError

from ..policy.access import Target

__all__ = [
    "TLSFailure",
    "ca_bundle_problem",
    "classify",
    "client_cert_problems",
    "key_file_warning",
    "plain_http_warning",
    "probe",
    "send_settings",
]

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
_EXPIRED = 10
_NOT_YET_VALID = 9
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_NAME_MISMATCH = frozenset({62, 64})


class TLSFailure(NamedTuple):
    """Why a TLS connection failed: a stable ``kind`` and OpenSSL's short ``detail``.

    ``kind`` is one of: expired, not yet valid, unknown issuer, name mismatch,
    certificate rejected, handshake. ``detail`` is OpenSSL's reason or verify
    message, which names certificates and host names but never request data.
    """

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


def send_settings(target: Target) -> tuple[str | bool, str | tuple[str, str] | None]:
    """Return the ``verify`` and ``cert`` arguments an adapter sends to ``target`` with.

    A CA bundle path (not ``True``) makes urllib3 trust only that file, and puts
    it in the connection pool's key: two targets on one host:port with different
    trust never share a pooled connection.
    """
    verify: str | bool = target.ca_bundle or True
    if target.client_cert and target.client_key:
        return verify, (target.client_cert, target.client_key)
    return verify, target.client_cert


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception it wraps (requests and urllib3 nest them)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = (getattr(current, "reason", None), current.__cause__, current.__context__)
        todo += [e for e in (*inner, *current.args) if isinstance(e, BaseException)]


def classify(exc: BaseException) -> TLSFailure:
    """Return what kind of TLS failure ``exc`` (or an exception it wraps) is."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            code = cause.verify_code
            detail = cause.verify_message or ""
            if code == _EXPIRED:
                return TLSFailure("expired", detail)
            if code == _NOT_YET_VALID:
                return TLSFailure("not yet valid", detail)
            if code in _UNKNOWN_ISSUER:
                return TLSFailure("unknown issuer", detail)
            if code in _NAME_MISMATCH:
                return TLSFailure("name mismatch", detail)
            return TLSFailure("certificate rejected", detail)
        if isinstance(cause, CertificateError):  # urllib3's own host name check
            return TLSFailure("name mismatch", "")
    for cause in causes:
        if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            # No alert, just a closed connection: e.g. a TLS 1.3 upstream that wants
            # a client certificate and hangs up while the request is being written.
            return TLSFailure("handshake", f"the upstream closed the connection, {_name(cause)}")
        if isinstance(cause, ssl.SSLError):
            return TLSFailure("handshake", cause.reason or _name(cause))
    return TLSFailure("handshake", _name(causes[-1]))


def _name(exc: BaseException) -> str:
    return type(exc).__name__


# --- config checks -------------------------------------------------------------


def _read(path: Path) -> bytes | str:
    """Return the file's bytes, or why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a directory; name a PEM file"
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__})"


def ca_bundle_problem(path: Path) -> str | None:
    """Return why ``path`` cannot serve as a CA bundle, or None when it holds a certificate."""
    data = _read(path)
    if isinstance(data, str):
        return data
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        return "holds a certificate that cannot be parsed"
    if not context.cert_store_stats()["x509"]:
        return "holds no certificate"
    return None


class _Encrypted(Exception):
    """Raised by the password callback: the key needs a password the gateway never has."""


def _no_password() -> bytes:
    raise _Encrypted


def client_cert_problems(cert: Path, key: Path | None) -> list[tuple[str, str]]:
    """Return ``(field, problem)`` pairs for a client certificate and its key (if apart)."""
    data = _read(cert)
    if isinstance(data, str):
        return [("clientCert", data)]
    problems = []
    if b"-----BEGIN CERTIFICATE-----" not in data:
        problems.append(("clientCert", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"))
    key_data = data if key is None else _read(key)
    key_field = "clientCert" if key is None else "clientKey"
    if isinstance(key_data, str):
        problems.append((key_field, key_data))
    elif b"PRIVATE KEY-----" not in key_data:
        problems.append((key_field, "holds no PEM private key; set clientKey to the key's file"))
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), None if key is None else str(key), _no_password)
    except _Encrypted:
        return [(key_field, "the key is encrypted; give the gateway an unencrypted key file")]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [(key_field, "the key does not belong to clientCert's certificate")]
        return [(key_field, "the certificate or key cannot be parsed")]
    return []


def key_file_warning(path: Path) -> str | None:
    """Return a warning when the private key file at ``path`` is group- or world-readable."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None  # reported as a problem by client_cert_problems
    if mode & 0o044:
        return (
            f"{path} is readable by group or others (mode {mode:03o}); "
            "chmod 600 it so only the gateway's user can read the key"
        )
    return None


def plain_http_warning(base_url: str) -> str | None:
    """Return a warning for an ``http://`` URL outside loopback and private networks.

    Secrets go to such a target unencrypted. Host names count as local when they
    are ``localhost`` or have a single label (a container or cluster service
    name: public names have a dot); any other name is warned about.
    """
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or host.endswith(".localhost") or "." not in host:
            return None
    else:
        if address.is_loopback or address.is_private or address.is_link_local:
            return None
    return (
        f"plain http to {host}, which is not a loopback or private address: "
        "secrets and responses travel unencrypted; use https"
    )


# --- probing ---------------------------------------------------------------------


def probe(target: Target, timeout: float) -> str | None:
    """Connect to ``target`` and shake hands as the gateway would; return what failed, or None.

    Only the TLS handshake: no HTTP request is sent, so no secret is either.
    """
    parts = urlsplit(target.base_url)
    verify, cert = send_settings(target)
    cert_file, key_file = cert if isinstance(cert, tuple) else (cert, None)
    connection = urllib3.connection.HTTPSConnection(
        parts.hostname,
        parts.port or 443,
        timeout=timeout,
        cert_reqs="CERT_REQUIRED",
        ca_certs=DEFAULT_CA_BUNDLE_PATH if verify is True else verify,
        cert_file=cert_file,
        key_file=key_file,
    )
    try:
        connection.connect()
    except (ssl.SSLError, CertificateError, urllib3.exceptions.SSLError) as exc:
        return f"TLS failed: {classify(exc)}"
    except urllib3.exceptions.NewConnectionError as exc:
        # Before ConnectTimeoutError: urllib3 makes this a subclass of it.
        return f"could not connect ({type(exc).__name__})"
    except (urllib3.exceptions.ConnectTimeoutError, TimeoutError):
        return f"no TLS handshake within {timeout:g} s"
    except OSError as exc:
        return f"could not connect ({type(exc).__name__})"
    finally:
        connection.close()
    return None
