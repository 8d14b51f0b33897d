"""A proxied request as an ordered list of stages (mitmproxy's addon chain, in miniature).

    record -> authenticate -> read the call (envelope or transparent) -> path policy
    -> spend -> outgoing headers -> forward -> answer (egress guard, usage meter)

Any stage can refuse (a GatewayError) or answer (``exchange.response``); what a
stage holds is released when the response closes, in reverse order, however the
request ended: refused by a later stage, an exception, the client gone, the
stream over. An observer (``flask explain``) may run each stage in its place;
a live request has none and pays for nothing but the check.
"""

from __future__ import annotations

from flask import Response, after_this_request

from . import answer, stages
from .exchange import Exchange, Stage

__all__ = ["ENVELOPE", "TRANSPARENT", "Pipeline"]


class Pipeline:
    """Stages run in order until one answers; the exchange closes with the response."""

    def __init__(self, *stages: Stage) -> None:
        self.stages = stages

    def run(self, ex: Exchange) -> Response:
        """Run ``ex`` through the stages and return the answer; a refusal raises GatewayError.

        Whatever the response (an answer, a refusal's error page, an exception's
        500), closing it closes the exchange; a streamed answer's body closes it too.
        """
        after_this_request(ex.closing)
        observer = ex.observer
        try:
            for stage in self.stages:
                if observer is None:
                    stage(ex)
                else:
                    observer.around(stage, ex)
                if ex.response is not None:
                    return ex.response
        except BaseException:
            # A refusal (or a failure) frees what the call held before its answer is
            # sent: a client that reads the 4xx and calls again at once, perhaps on
            # another worker, must find its slot free. (Closing again later is a no-op.)
            ex.close()
            raise
        raise RuntimeError("no stage answered")  # pragma: no cover - answer always does


# The two modes differ only in the stages that read the call: a transparent call
# is judged on its path before its body is read; an envelope's path is in its body.
TRANSPARENT = Pipeline(
    stages.record,
    stages.authenticate,
    stages.transparent,
    stages.judge_path,
    stages.transparent_body,
    stages.spend,
    stages.outgoing,
    answer.forward,
    answer.answer,
)
ENVELOPE = Pipeline(
    stages.record,
    stages.authenticate,
    stages.envelope,
    stages.judge_path,
    stages.envelope_call,
    stages.spend,
    stages.outgoing,
    answer.forward,
    answer.answer,
)
