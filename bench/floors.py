"""The two floors, served by gunicorn with the gateway's own gunicorn.conf.py.

``framework_app``: a no-op Flask endpoint that parses the same JSON envelope and returns
a small response. ``forward_app``: parses the envelope and forwards it with a plain
urllib3 pool, no checks at all: the least any Flask gateway on this stack can cost.
Over HTTPS, the pool trusts the CA file named by ``BENCH_CA``, as the gateway does.
"""

from __future__ import annotations

import os

import urllib3
from flask import Flask, Response, request

framework_app = Flask("framework_floor")
forward_app = Flask("forwarding_floor")
_pool: dict[int, urllib3.PoolManager] = {}


@framework_app.post("/proxy")
def noop():
    envelope = request.get_json()
    return {"ok": True, "path": envelope["path"]}


@forward_app.post("/proxy")
def forward():
    envelope = request.get_json()
    pool = _pool.get(os.getpid())
    if pool is None:  # one pool per worker process, built after fork
        pool = _pool[os.getpid()] = urllib3.PoolManager(
            maxsize=1000, ca_certs=os.environ.get("BENCH_CA")
        )
    upstream = pool.request(
        envelope.get("method", "GET"),
        os.environ["BENCH_UPSTREAM"] + envelope["path"],
        headers={"Authorization": os.environ["BENCH_SECRET"]},
        preload_content=False,
        redirect=False,
    )
    return Response(
        upstream.stream(65536, decode_content=False),
        status=upstream.status,
        content_type=upstream.headers.get("Content-Type"),
    )
