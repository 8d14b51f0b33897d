"""What the gateway knows about one request, for the access log and the metrics.

Plain Python with no Flask imports. The edge fills a ``Record`` in as the
request goes (``flask.g.record``); observers read it once, when the response
has ended however it ended. Nothing here decides anything about the request.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ID_HEADER", "Observers", "Record", "request_id"]

# The response header every answer carries its request id in.
ID_HEADER = "X-Gateway-Request-Id"

# What a client's X-Request-ID may hold to be adopted: safe in a log line and a header.
_OFFERED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(offered: str | None) -> str:
    """Return ``offered`` if it is a usable request id, else a new random one."""
    if offered is not None and _OFFERED_ID.fullmatch(offered):
        return offered
    return os.urandom(8).hex()


@dataclass
class Observers:
    """Who reads the records of one app: called when a call goes upstream, and at the end."""

    forwarding: list[Callable[[Record], None]] = field(default_factory=list)
    finished: list[Callable[[Record], None]] = field(default_factory=list)


@dataclass(eq=False)
class Record:
    """One request, from its first byte in to its last byte out.

    Times are ``time.monotonic()`` seconds, except ``wall`` (``time.time()`` at
    the start). Fields stay None where they do not apply (no client before
    authentication, no upstream for a refused call).
    """

    request_id: str
    remote: str | None
    method: str
    observers: Observers = field(repr=False)
    wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    client: str | None = None  # the client's label, never its key
    user: str | None = None  # a session token's end user (never the token)
    target: str | None = None
    path: str | None = None  # the normalized upstream path, or the gateway route
    status: int | None = None
    error: str | None = None  # an error code from errors.CODES
    upstream_status: int | None = None
    upstream_request_id: str | None = None
    upstream_sent: float | None = None
    upstream_ttfb: float | None = None  # seconds from sending to the upstream's headers
    ttfb: float | None = None  # seconds to the first byte of the answer sent to the client
    duration: float | None = None  # seconds to the last byte (set when the response ends)
    bytes_in: int = 0
    bytes_out: int = 0
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    retried: bool = False

    def forwarding(self, target: str) -> None:
        """Note that the call is being sent to ``target`` now."""
        self.target = target
        self.upstream_sent = time.monotonic()
        for observe in self.observers.forwarding:
            observe(self)

    def upstream_answered(self, status: int, upstream_request_id: str | None) -> None:
        """Note the upstream's status line and its own request id."""
        self.upstream_ttfb = time.monotonic() - (self.upstream_sent or self.started)
        self.upstream_status = status
        if upstream_request_id is not None:
            self.upstream_request_id = upstream_request_id[:128]

    def finish(self) -> None:
        """Close the record and hand it to the observers; later calls do nothing."""
        if self.duration is not None:
            return
        self.duration = time.monotonic() - self.started
        for observe in self.observers.finished:
            observe(self)
