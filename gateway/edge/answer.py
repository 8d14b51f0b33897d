"""The last stages: send the call upstream, and pass its answer back through the filters.

The answer's path: upstream chunks -> egress scan -> usage meter -> client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import Response

from ..errors import GatewayError
from ..policy import egress
from ..policy.headers import response_headers
from ..spend.meter import UsageMeter, metered
from ..upstream.client import Call, UpstreamBroke, body_chunks
from .exchange import Exchange

__all__ = ["answer", "forward"]

log = logging.getLogger(__name__)

# Failures that show the upstream never got the call: its token reservation returns whole.
_NOT_SENT = frozenset({"upstream_unreachable", "upstream_tls_error"})


class UpstreamResponse(Response):
    # An upstream response without Content-Type must stay without one.
    default_mimetype = None


def forward(ex: Exchange) -> None:
    """Send the call; hold the upstream's response (its connection) until the request ends."""
    ex.record.forwarding(ex.client.target.name)
    ex.sent = True
    try:
        reply = ex.upstream.send(ex.call)
    except GatewayError as exc:
        ex.sent = exc.code not in _NOT_SENT
        raise
    ex.hold(reply.close)
    ex.reply = reply


def answer(ex: Exchange) -> None:
    """Answer with the upstream's response, through the egress guard and the usage meter."""
    config, call, reply = ex.config, ex.call, ex.reply
    headers = response_headers(reply.raw.headers.items())
    chunks = body_chunks(reply, call.client)
    if config.guarded:
        headers, dropped = egress.guard_headers(headers, config.guarded)
        for name in dropped:
            _log_block(call, f"response header {name} (dropped)")
        coding = reply.headers.get("Content-Encoding")
        chunks = egress.scan_body(chunks, config.guarded, coding)
    admission = ex.admission
    if admission.llm.model is not None:
        admission.meter = UsageMeter(reply.headers.get("Content-Type"))
        chunks = metered(chunks, admission.meter)
    ex.hold(chunks.close)
    status = reply.status_code
    ex.record.upstream_answered(status, _upstream_request_id(headers))
    headers += admission.headers.items()
    body = _Body(chunks, ex)
    ex.status = status
    ex.response = UpstreamResponse(body, status=status, headers=headers, direct_passthrough=True)


def _upstream_request_id(headers: list[tuple[str, str]]) -> str | None:
    """Return the upstream's own request id (OpenAI's x-request-id, Anthropic's request-id)."""
    for name, value in headers:
        if name.lower() in ("x-request-id", "request-id"):
            return value
    return None


def _log_block(call: Call, where: str) -> None:
    log.warning(
        "%s: egress guard: a secret in the %s from target %s",
        call.client.label,
        where,
        call.client.target.name,
    )


class _Body:
    """What the WSGI server iterates and closes; closing it closes the exchange.

    Its first chunk is read before the response starts, so a failure that early
    (an upstream break, a secret in the first bytes) still gets a clean JSON error;
    later, the same failures cut the connection. werkzeug hands a direct-passthrough
    body to the server as it is, so ``close()`` is where the exchange's holds end:
    completed, client gone, or cut.
    """

    def __init__(self, chunks: Iterator[bytes], ex: Exchange) -> None:
        self._chunks = chunks
        self._exchange = ex
        try:
            self._first = next(chunks, b"")
        except UpstreamBroke as exc:
            raise exc.failure() from None
        except egress.SecretInResponse:
            _log_block(ex.call, "response body (before it was sent)")
            raise GatewayError(
                "secret_in_response", "The upstream's answer held a secret; it was not sent."
            ) from None
        except egress.UnreadableEncoding:
            raise GatewayError(
                "upstream_error",
                "The upstream's answer is in an encoding the gateway cannot check.",
            ) from None

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            yield self._first
        try:
            yield from self._chunks
        except UpstreamBroke as exc:
            self._exchange.error = exc.failure().code
            raise
        except egress.SecretInResponse:
            self._exchange.error = "secret_in_response"
            _log_block(self._exchange.call, "response body (the stream was cut)")
            raise

    def close(self) -> None:
        self._exchange.close()
