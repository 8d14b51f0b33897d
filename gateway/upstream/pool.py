"""The upstream connection pool: idle connections bounded, unanswered closes told apart.

urllib3's pool hands out a kept-alive connection as long as the upstream's FIN
has not arrived. These subclasses add what a safe resend needs to know and do:
whether the connection was reused, whether the request went out whole, whether
any byte of the answer came before the close, and a new connection for the
resend. The decision itself is ``retry.may_resend``; the caller makes it.
Written against urllib3 2.x (``_get_conn``, ``_put_conn``, ``_make_request``).
"""

from __future__ import annotations

import functools
import http.client
import socket
import time
from collections.abc import Mapping
from typing import Any

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from requests.exceptions import InvalidURL
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ProtocolError
from urllib3.util import Timeout

__all__ = ["ClosedUnanswered", "PoolAdapter", "ResendTimeout"]


class ClosedUnanswered(ProtocolError):
    """The upstream closed the connection before any byte of its answer arrived.

    A ProtocolError, so urllib3 and requests pass it on as it is (inside
    requests' ConnectionError) for the caller to decide on a resend.
    """

    def __init__(self, reused: bool, written: bool) -> None:
        super().__init__("the upstream closed the connection before answering")
        self.reused = reused  # the connection came from the pool, kept alive
        self.written = written  # the whole request went out


class ResendTimeout(Timeout):
    """A resend's timeouts: on a new connection, within what is left of the call's wait.

    ``left`` bounds the connect and the wait for the answer's head together;
    the body then gets the full ``read`` between bytes, like any other call.
    """

    def __init__(self, connect: float, read: float, left: float) -> None:
        super().__init__(connect=connect, read=read, total=left)
        self.between_bytes = read

    def clone(self) -> ResendTimeout:
        # urllib3 clones the timeout for each request; the clone must stay a resend.
        return ResendTimeout(self._connect, self._read, self.total)


class _BrokenHead(http.client.HTTPException):
    """The connection broke after the answer's first byte: the upstream was answering."""


class _Unframed(http.client.HTTPException):
    """An answer the gateway never passes on: a protocol switch, or a body framed two ways."""


class _Response(http.client.HTTPResponse):
    """http.client's response, kept in step with its connection (RFC 9112 6.3).

    http.client skips ``100 Continue`` only: any other interim answer would pass for
    the final one, and the real answer would be read by the connection's next call.
    """

    def begin(self) -> None:
        # Wait for the first byte (or the close) before parsing: a reset that follows
        # part of a status line must not pass for a close before any answer.
        answered = bool(self.fp.peek(1))
        try:
            super().begin()
            while self.status < 200:  # an interim answer (1xx): its head is read whole
                if self.status == 101:
                    raise _Unframed("the upstream switched protocols unasked")
                self.headers = self.msg = None  # or begin() returns at once
                super().begin()
        except ConnectionError as exc:
            # After an interim answer too: the upstream read the call and failed while
            # answering, which is no stale keep-alive close; it is never sent again.
            if answered:
                raise _BrokenHead("the upstream broke off its answer's head") from exc
            raise
        self._check_framing()

    def _check_framing(self) -> None:
        """Refuse a head framed two ways; close after one whose end is in doubt."""
        lengths = self.headers.get_all("content-length")
        coded = "transfer-encoding" in self.headers
        if lengths:
            values = {value.strip() for line in lengths for value in line.split(",")}
            if coded or len(values) > 1:
                # Each side of a proxy may pick another framing (response splitting).
                raise _Unframed("the upstream framed its answer two ways")
            announced = values != {"0"}
        else:
            announced = coded
        if self.length == 0 and announced:
            # An answer with no body by rule (to a HEAD, a 204 or 304) that announces one:
            # a careless upstream writes it anyway, perhaps later, where the connection's
            # next answer belongs. The connection ends with this answer instead, and
            # nothing is read as its body (http.client would read a chunked one).
            self.will_close = True
            self.chunked = False


class _TrackedConnection:
    """Connection mixin: knows whether it was reused and whether its request went out whole."""

    response_class = _Response
    idle_since = 0.0
    reused = False
    written = False
    body_timeout: float | None = None  # a resend's between-bytes timeout, once its head is in

    def request(self, *args: Any, **kwargs: Any) -> None:
        # urllib3 swallows a failed write (EPIPE, ECONNRESET) to read an early answer;
        # this flag is how the failure is still known afterwards.
        self.written = False
        super().request(*args, **kwargs)
        self.written = True

    @property
    def is_connected(self) -> bool:
        """Whether the pooled connection is open with nothing waiting: urllib3's test.

        urllib3 polls the socket; under gevent a poll builds watchers on the event
        loop, a tenth of a forwarded call's CPU. gevent's socket holds a real one,
        non-blocking: one peek there tells the same (readable = a FIN, a reset or
        a stray byte, all of which retire the connection).
        """
        raw = getattr(self.sock, "_sock", None)
        if raw is None or raw.gettimeout() != 0.0:
            return super().is_connected
        try:
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: open, in step
        except OSError:
            pass
        return False

    def getresponse(self) -> Any:
        sock = self.sock
        try:
            response = super().getresponse()
        except ConnectionError as exc:  # EOF or reset before the first byte (see _Response)
            raise ClosedUnanswered(self.reused, self.written) from exc
        if self.body_timeout is not None:
            sock.settimeout(self.body_timeout)
        return response


class _Connection(_TrackedConnection, HTTPConnection):
    pass


class _TLSConnection(_TrackedConnection, HTTPSConnection):
    pass


class _BoundedPool:
    """Pool mixin: connections idle past ``idle_bound`` are closed instead of handed out."""

    def __init__(self, *args: Any, idle_bound: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_bound = idle_bound

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # already closed if the upstream's FIN has arrived
        if conn.sock is not None and time.monotonic() - conn.idle_since >= self.idle_bound:
            # Servers drop idle keep-alive connections after a few seconds (uvicorn and
            # Node after 5 s, gunicorn after 2 s); past the bound, the FIN may be in flight.
            conn.close()
        return conn

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)

    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        if isinstance(timeout, ResendTimeout):
            conn.close()  # a resend goes on a new connection, never on another pooled one
            conn.body_timeout = timeout.between_bytes
        else:
            conn.body_timeout = None
        conn.reused = conn.sock is not None
        return super()._make_request(conn, *args, **kwargs)


class _Pool(_BoundedPool, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_BoundedPool, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class PoolAdapter(HTTPAdapter):
    """requests' adapter on the bounded pools; it never retries by itself.

    The gateway sends through no proxy and keeps no cookie, so the two steps of
    requests' own that only serve those are left out of every call.
    """

    def __init__(self, pool_size: int, idle_bound: float) -> None:
        self._idle_bound = idle_bound  # read by init_poolmanager, which __init__ calls
        super().__init__(pool_connections=16, pool_maxsize=pool_size, max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Build requests' PoolManager, making its pools the bounded ones."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(_Pool, idle_bound=self._idle_bound),
            "https": functools.partial(_TLSPool, idle_bound=self._idle_bound),
        }

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: bool | str,
        proxies: Mapping[str, str] | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> HTTPConnectionPool:
        """Return the pool for the request's host and TLS settings (requests' own, no proxy)."""
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        try:
            host, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        except ValueError as exc:
            raise InvalidURL(exc, request=request) from exc
        return self.poolmanager.connection_from_host(**host, pool_kwargs=pool_kwargs)

    def request_url(self, request: PreparedRequest, proxies: Mapping[str, str] | None) -> str:
        """Return the request target: the URL's path and query (the full URL only for a proxy)."""
        if proxies:
            return super().request_url(request, proxies)
        return request.path_url

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        """Build requests' Response as requests does, but read no cookie into its jar."""
        response = Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response
