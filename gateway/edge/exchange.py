"""One request on its way through the stages: what they found, and what they hold.

Each stage reads and fills the ``Exchange``; a stage that takes something (a
limit slot, a token reservation, an upstream response, the socket's write
timeout) registers its release with ``hold``. ``close()`` runs every release
once, in reverse order, however the request ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from flask import Response

from ..config.load import GatewayConfig
from ..observe.record import Record
from ..policy.access import Client, PathPattern
from ..policy.keys import KeyItem
from ..policy.sessions import Session
from ..spend.admission import Admission
from ..spend.calls import NOT_PARSED
from ..spend.store.base import Store
from ..upstream.client import Call, Upstream

if TYPE_CHECKING:
    import requests

__all__ = ["OBSERVER", "Exchange", "Observer", "Stage"]

# The WSGI environ key under which an observer of the stages (``flask explain``)
# hands itself to a request.
OBSERVER = "gateway.observer"


class Exchange:
    """The state of one proxied request, shared by its stages."""

    def __init__(
        self,
        config: GatewayConfig,
        record: Record,
        store: Store | None,
        upstream: Upstream,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        self.record = record
        self.store = store  # the handle spend control counts on (explain's is dry)
        self.upstream = upstream
        self.observer = observer
        self.client: Client | None = None
        self.key: KeyItem | None = None  # the client key, or None for a session token
        self.session: Session | None = None  # what a gs_ session token says
        self.origin: str | None = None
        self.method: str | None = None  # as the call names it (the envelope's own)
        self.raw_path: str | None = None  # as the client wrote it
        self.path: str | None = None  # normalized
        self.pattern: PathPattern | None = None  # the allowedPaths pattern that matched
        self.envelope: dict | None = None
        self.headers: list[tuple[str, str]] = []  # the client's, before filtering
        self.query = ""
        self.body: bytes | None = None
        self.parsed: Any = NOT_PARSED  # the body as already parsed (an envelope's)
        self.bytes_in = 0
        self.admission: Admission | None = None
        self.call: Call | None = None
        self.reply: requests.Response | None = None  # the upstream's, while it is read
        self.sent = False  # whether the upstream may have got the call
        self.status: int | None = None  # the upstream's, once its answer goes out
        self.error: str | None = None  # how a stream that had started was cut
        self.response: Response | None = None  # set by the stage that answers
        self._holds: list[Callable[[], Any]] = []

    def hold(self, release: Callable[[], Any]) -> None:
        """Register ``release`` to run when the request ends, however it ends."""
        self._holds.append(release)

    def close(self) -> None:
        """Run every release once, last taken first; one failing does not skip the others."""
        holds, self._holds = self._holds, []
        failure: BaseException | None = None
        for release in reversed(holds):
            try:
                release()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others ran
                failure = failure or exc
        if failure is not None:
            raise failure

    def closing(self, response: Response) -> Response:
        """Close this exchange when ``response`` is closed (an ``after_this_request`` hook)."""
        response.call_on_close(self.close)
        return response


Stage = Callable[[Exchange], None]


class Observer(Protocol):
    """Something that watches the stages run (``flask explain``); live requests have none."""

    def around(self, stage: Stage, exchange: Exchange) -> None:
        """Run ``stage`` on ``exchange`` (or answer in its place), looking at what it found."""
