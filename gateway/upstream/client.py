"""Upstream calls: one pooled Session per worker process, streaming, fault mapping, resends."""

from __future__ import annotations

import errno
import functools
import http.client
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import requests
import urllib3
from flask import Flask

from ..errors import GatewayError
from ..policy.access import Client
from . import tls
from .pool import ClosedUnanswered, PoolAdapter, ResendTimeout
from .retry import may_resend

__all__ = ["Call", "Upstream", "UpstreamBroke", "body_chunks", "init_app", "prepare"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class Call:
    """One upstream request, already checked against the client's policy."""

    client: Client
    method: str
    path: str
    query: str  # already encoded, as it goes on the wire ("" for none)
    headers: Mapping[str, str]
    body: bytes | None


class UpstreamBroke(ConnectionResetError):
    """The upstream failed while sending its body.

    A reset, not a clean end, so the caller can tell a cut stream from a whole one.
    WSGI servers treat ECONNRESET as a quiet disconnect (gunicorn logs it at debug).
    Before the first byte was sent, ``failure()`` says how to answer instead.
    """

    def __init__(self, timed_out: bool) -> None:
        super().__init__(errno.ECONNRESET, "the upstream broke off the response")
        self.timed_out = timed_out

    def failure(self) -> GatewayError:
        """Return the error a client gets when nothing of the body was sent yet."""
        return _timeout() if self.timed_out else _broken()


def _new_session(pool_size: int, idle_bound: float) -> requests.Session:
    # Why calls go through the Session's adapter and not Session.request: the
    # adapter alone reads no environment (proxies, netrc, CA settings), follows no
    # redirect and keeps no cookie, which is what a gateway must do; Session.request
    # would merge all of those in only for the gateway to refuse them, and costs
    # more than the gateway's own checks. The Session just holds the worker's pool.
    #
    # Why the pool is this size: ``pool_size`` is the worker's concurrency
    # (gunicorn.conf.py passes worker_connections as GATEWAY_POOL_SIZE), so every
    # open request can keep its upstream connection for reuse; pool_connections
    # is how many upstream hosts keep a pool at once.
    session = requests.Session()
    adapter = PoolAdapter(pool_size, idle_bound)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Upstream:
    """Sends calls upstream through a Session built after fork, shared by the worker's threads."""

    def __init__(self, pool_size: int, idle_bound: float) -> None:
        self._pool_size = pool_size
        self._idle_bound = idle_bound
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._pid: int | None = None

    @property
    def session(self) -> requests.Session:
        """Return this process's Session, building it on first use after a fork."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._session = _new_session(self._pool_size, self._idle_bound)
                    self._pid = os.getpid()
        assert self._session is not None
        return self._session

    def send(self, call: Call) -> requests.Response:
        """Send ``call`` and return the response with its body not yet read.

        A call whose reused connection closed before any answer is sent once more,
        on a new connection, when ``may_resend`` allows it, within what is left of
        its read timeout (the wait for the answer's head never starts over).
        """
        client = call.client
        prepared = prepare(call)
        started = time.monotonic()
        try:
            return self._send_once(prepared, client, (client.connect_timeout, client.read_timeout))
        except ClosedUnanswered as closed:
            left = client.read_timeout - (time.monotonic() - started)
            if left <= 0 or not may_resend(
                call.method, call.headers, reused=closed.reused, written=closed.written
            ):
                log.warning(
                    "%s: upstream %s closed the connection before answering (%s not retried)",
                    client.label,
                    client.target.name,
                    call.method,
                )
                raise _broken() from None
        # Counted here: one line per resend, whatever its outcome (logged below if it fails).
        log.info(
            "%s: upstream %s: %s retried on a new connection (the reused one closed unanswered)",
            client.label,
            client.target.name,
            call.method,
        )
        timeout = ResendTimeout(client.connect_timeout, client.read_timeout, left)
        try:
            return self._send_once(prepared, client, timeout, retried=True)
        except ClosedUnanswered:
            log.warning(
                "%s: upstream %s closed the new connection before answering (retried)",
                client.label,
                client.target.name,
            )
            raise _broken() from None

    def _send_once(
        self,
        prepared: requests.PreparedRequest,
        client: Client,
        timeout: tuple[float, float] | ResendTimeout,
        retried: bool = False,
    ) -> requests.Response:
        """Send ``prepared``; map transport faults to errors, but let ClosedUnanswered through."""
        note = " (retried)" if retried else ""
        verify, cert = tls.send_settings(client.target)
        try:
            return self.session.get_adapter(prepared.url).send(
                prepared,
                stream=True,
                timeout=timeout,
                verify=verify,
                cert=cert,
                proxies={},
            )
        except requests.exceptions.SSLError as exc:
            failure = tls.classify(exc)
            log.warning(
                "%s: upstream %s TLS failed: %s%s", client.label, client.target.name, failure, note
            )
            raise _tls_error() from None
        except requests.exceptions.Timeout:
            log.warning("%s: upstream %s timed out%s", client.label, client.target.name, note)
            raise _timeout() from None
        except requests.exceptions.ConnectionError as exc:
            reason = exc.args[0] if exc.args else None
            if isinstance(reason, ClosedUnanswered):
                raise reason from None
            if _could_not_connect(exc):
                log.warning("%s: upstream %s unreachable%s", client.label, client.target.name, note)
                raise GatewayError(
                    "upstream_unreachable", "The gateway could not connect to the upstream."
                ) from None
            log.warning(
                "%s: upstream %s sent a broken response%s", client.label, client.target.name, note
            )
            raise _broken() from None
        except requests.exceptions.RequestException:
            log.warning("%s: upstream %s call failed%s", client.label, client.target.name, note)
            raise _broken() from None
        except OSError:
            # requests checks the target's TLS files exist before each send: one
            # removed since the config was checked lands here.
            log.warning(
                "%s: upstream %s TLS failed: its CA bundle or client certificate file is missing",
                client.label,
                client.target.name,
            )
            raise _tls_error() from None


def prepare(call: Call) -> requests.PreparedRequest:
    """Return the request ``call`` sends upstream: method, URL, headers and body."""
    url = call.client.target.base_url + call.path
    if call.query:
        url += "?" + call.query
    # Only the steps that apply: no cookies, URL credentials or hooks ever do here,
    # and skipping them saves a tenth of the time a forwarded call costs.
    prepared = requests.PreparedRequest()
    prepared.prepare_method(call.method)
    prepared.url = _wire_url(url)
    prepared.prepare_headers(call.headers)
    prepared.prepare_body(call.body, None)
    return prepared


@functools.lru_cache(maxsize=1024)
def _wire_url(url: str) -> str:
    """Return ``url`` as requests' ``prepare_url`` writes it (a refusal is raised each time).

    A pure function of the URL that parses, IDNA-encodes and requotes it, which
    costs as much as the rest of preparing the call; calls repeat a few URLs.
    """
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return prepared.url


def _timeout() -> GatewayError:
    return GatewayError("upstream_timeout", "The upstream did not answer in time.")


def _tls_error() -> GatewayError:
    return GatewayError(
        "upstream_tls_error",
        "The gateway could not set up a trusted TLS connection to the upstream "
        "(certificate or handshake); the gateway's log says why.",
    )


def _broken() -> GatewayError:
    return GatewayError(
        "upstream_error", "The upstream closed the connection or sent a broken response."
    )


def _could_not_connect(exc: requests.exceptions.ConnectionError) -> bool:
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # MaxRetryError wraps the real cause
    return isinstance(
        reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.NameResolutionError
    )


_READ_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def body_chunks(response: requests.Response, client: Client) -> Iterator[bytes]:
    """Yield the upstream body as it arrives, still encoded; close the response at the end."""
    raw = response.raw
    received = 0
    try:
        while chunk := raw.read1(CHUNK_SIZE, decode_content=False):
            received += len(chunk)
            yield chunk
    except _READ_ERRORS as exc:
        log.warning(
            "%s: upstream %s broke off the response after %d bytes (%s)",
            client.label,
            client.target.name,
            received,
            type(exc).__name__,
        )
        timed_out = isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError)
        raise UpstreamBroke(timed_out) from None
    finally:
        response.close()


def init_app(app: Flask) -> None:
    """Give ``app`` its Upstream (the Session itself is built per process on first use)."""
    idle_bound = app.extensions["gateway.config"].upstream_idle
    app.extensions["gateway.upstream"] = Upstream(app.config["UPSTREAM_POOL_SIZE"], idle_bound)
