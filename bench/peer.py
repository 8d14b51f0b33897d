"""The seed's design as a peer: FastAPI + httpx, the same envelope contract.

As the seed did it: a new HTTP client per call (no pooling), one timeout for all
phases, the whole upstream response buffered, only status and Content-Type returned.
Run under uvicorn with the gateway's worker count.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response

app = FastAPI()
CLIENT_KEY = os.environ.get("BENCH_KEY", "")
ALLOWED_METHODS = {"GET", "POST"}
ALLOWED_PATHS = {"/models", "/chat/completions"}


@app.post("/proxy")
async def proxy(request: Request, authorization: str | None = Header(default=None)):
    if not authorization or not authorization.startswith("Bearer "):
        return JSONResponse({"error": "missing_client_key"}, status_code=401)
    if authorization[7:] != CLIENT_KEY:
        return JSONResponse({"error": "invalid_client_key"}, status_code=401)
    envelope = await request.json()
    method = str(envelope.get("method", "GET")).upper()
    path = envelope.get("path", "")
    if not path.startswith("/"):
        return JSONResponse({"error": "path_must_start_with_slash"}, status_code=400)
    if method not in ALLOWED_METHODS:
        return JSONResponse({"error": "method_not_allowed"}, status_code=403)
    if path not in ALLOWED_PATHS:
        return JSONResponse({"error": "path_not_allowed"}, status_code=403)
    headers = {"Authorization": os.environ["BENCH_SECRET"], **envelope.get("headers", {})}
    async with httpx.AsyncClient(timeout=30) as client:
        upstream = await client.request(
            method,
            os.environ["BENCH_UPSTREAM"] + path,
            params=envelope.get("query"),
            headers=headers,
            json=envelope.get("body"),
        )
    return Response(
        upstream.content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
    )
