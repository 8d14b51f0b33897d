"""Prometheus metrics from each request's Record; ``GET /metrics`` for the metrics token.

Under gunicorn, prometheus_client runs in multiprocess mode: every worker
writes its counts to files in ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn.conf.py
creates it fresh at start and folds an exited worker's files into one), and a
scrape sums them all, so the counts are the whole gateway's whichever worker
answers. Without that variable (``flask run``, Passenger, tests) the counts are
this process's own.
"""

from __future__ import annotations

import fcntl
import hmac
import os
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from ..errors import GatewayError
from .record import Record

__all__ = ["OTHER_MODEL", "Metrics", "init_app"]

bp = Blueprint("metrics", __name__)

# From a fast cached answer to a long LLM stream.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# The model label's value for every model past ``metrics.maxModelLabels``.
OTHER_MODEL = "other"


class Metrics:
    """The gateway's metrics, registered in ``registry``, fed from finished Records.

    Model names are the client's to choose: the ``model`` label holds the first
    ``max_models`` names this worker saw, and counts every later one as "other".
    """

    def __init__(self, registry: CollectorRegistry, max_models: int = 100) -> None:
        self.registry = registry
        self._children: dict[tuple, Any] = {}
        self._max_models = max_models
        self._models: set[str] = set()
        self.requests = Counter(
            "gateway_requests",
            "Answers sent, by client, target and status.",
            ["client", "target", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to the answer's last byte (a stream's end).",
            ["client", "target"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.upstream_ttfb = Histogram(
            "gateway_upstream_ttfb_seconds",
            "Time from sending a call upstream to the upstream's status line.",
            ["target"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_in_flight",
            "Calls sent upstream whose answer has not ended yet.",
            ["target"],
            registry=registry,
            multiprocess_mode="livesum",  # a worker that exits takes its calls with it
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens the upstream reported, by client, model and kind (input or output).",
            ["client", "model", "kind"],
            registry=registry,
        )
        self.refusals = Counter(
            "gateway_refusals",
            "Answers with a gateway error code (refused, or failed upstream), by client and code.",
            ["client", "code"],
            registry=registry,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() takes a lock and checks every value each
        # time; the children are few (clients x targets x statuses), so keep them.
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def forwarding(self, record: Record) -> None:
        """Count a call going upstream as in flight."""
        self._child(self.in_flight, record.target).inc()

    def finished(self, record: Record) -> None:
        """Count a request whose answer has ended."""
        client = record.client or ""
        target = record.target or ""
        self._child(self.requests, client, target, str(record.status or 0)).inc()
        self._child(self.duration, client, target).observe(record.duration or 0.0)
        if record.upstream_sent is not None:
            self._child(self.in_flight, target).dec()
        if record.upstream_ttfb is not None:
            self._child(self.upstream_ttfb, target).observe(record.upstream_ttfb)
        if record.error is not None:
            self._child(self.refusals, client, record.error).inc()
        if record.model is not None:
            model = self._model_label(record.model)
            for kind, count in (("input", record.input_tokens), ("output", record.output_tokens)):
                if count:
                    self._child(self.tokens, client, model, kind).inc(count)

    def _model_label(self, model: str) -> str:
        if model not in self._models:
            if len(self._models) >= self._max_models:
                return OTHER_MODEL
            self._models.add(model)
        return model


def _scrape(registry: CollectorRegistry) -> bytes:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return generate_latest(registry)
    # Shared lock on the folder: gunicorn's master takes it exclusively while it
    # folds an exited worker's files, so a scrape never counts them twice or not at all.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, folder)
        return generate_latest(merged)
    finally:
        os.close(fd)


@bp.get("/metrics")
def metrics():
    """Serve the metrics in Prometheus' text format to the holder of the metrics token."""
    token = current_app.extensions["gateway.config"].metrics_token
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    # Constant time: how much of a guess matched must not show in the answer's timing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        offered.strip().encode(), token.encode()
    ):
        raise GatewayError(
            "invalid_metrics_token",
            "Send the metrics token (metrics.tokenRef) as Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    body = _scrape(current_app.extensions["gateway.metrics"].registry)
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Feed the metrics from every request of ``app``; serve them if the config says so."""
    metrics = Metrics(CollectorRegistry(), app.extensions["gateway.config"].max_model_labels)
    app.extensions["gateway.metrics"] = metrics
    observers = app.extensions["gateway.observers"]
    observers.forwarding.append(metrics.forwarding)
    observers.finished.append(metrics.finished)
    if app.extensions["gateway.config"].metrics_token is not None:
        app.register_blueprint(bp)
