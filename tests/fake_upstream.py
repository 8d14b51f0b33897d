"""A real HTTP upstream on 127.0.0.1 that records what it receives.

Routes (under any prefix, e.g. /v1): ``/echo``, ``/sse``, ``/sse-lockstep``,
``/slow``, ``/gzip``, ``/big``, ``/status/<code>``, the fault routes, and the
``/leak-*`` routes that hand the secret they received back, as a careless or
hostile upstream would (the egress guard must stop every one of them).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

GZIP_TEXT = ("The quick brown fox jumps over the lazy dog. " * 2000).encode()
PATTERN = bytes(range(256)) * 256  # 64 KiB of every byte value


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    on_connection: int = 1  # 1 for the first request on its connection, 2 for the next...
    closed: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeUpstream

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        # Marks answers that came from the upstream, so tests can tell the gateway's own.
        self.send_header("X-Fake-Upstream", "1")

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(length) if length else b""
        self.served = getattr(self, "served", 0) + 1  # one handler per connection
        seen = Seen(
            self.command, parts.path, parts.query, dict(self.headers.items()), body, self.served
        )
        self.server.record(seen)
        self.seen = seen
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        name = parts.path.rsplit("/", 1)[-1]
        if parts.path.split("/")[-2:-1] == ["status"]:
            name = "status"
        if ":" in name:  # Gemini's /models/{model}:generateContent
            name = name.rsplit(":", 1)[1]
        builtin = getattr(type(self), f"route_{name}".replace("-", "_"), None)
        handler = builtin
        try:
            if handler is None:
                self.send_json(404, {"error": "no such route", "path": parts.path})
            else:
                handler(self)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            seen.closed.set()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    # --- helpers -----------------------------------------------------------

    def send_json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_chunked(self, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- routes ------------------------------------------------------------

    def route_echo(self) -> None:
        self.send_json(
            200,
            {
                "method": self.command,
                "path": self.seen.path,
                "query": self.seen.query,
                "header_names": sorted(self.seen.headers),
                "body_sha256": hashlib.sha256(self.seen.body).hexdigest(),
                "body_length": len(self.seen.body),
            },
            headers={
                "X-RateLimit-Remaining": "41",
                "X-Request-Id": "req-echo",
                "Set-Cookie": "upstream=1",
            },
        )

    # --- upstreams that reflect the secret they received -----------------

    def _received_secret(self) -> bytes:
        """The secret this request carried (the raw key, without "Bearer ")."""
        value = self.headers.get("Authorization") or self.headers.get("X-RapidAPI-Key") or ""
        return value.removeprefix("Bearer ").encode()

    def route_leak_header(self) -> None:
        value = self.headers.get("Authorization", "")
        self.send_json(200, {"ok": True}, headers={"X-Echo-Authorization": value, "X-Safe": "1"})

    def route_leak_body(self) -> None:
        self.send_json(200, {"error": "bad key", "received": self.headers.get("Authorization")})

    def route_leak_json_escaped(self) -> None:
        # A JSON encoder that escapes "/" (as PHP's does) writes the key with "\/".
        data = b'{"key": "' + self._received_secret().replace(b"/", b"\\/") + b'"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route_leak_encoded(self) -> None:
        """The secret written back URL-encoded (in a redirect URL) or as JSON \\u escapes."""
        secret = self._received_secret().decode()
        form = self.query.get("form", "url")
        if form == "json-u":
            value = "".join(f"\\u{ord(char):04x}" for char in secret)
        else:
            value = "https://app.test/cb?token=" + quote(secret, safe="")
            value = value.lower() if form == "url-lower" else value
        data = ('{"next": "' + value + '"}').encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route_leak_split(self) -> None:
        """SSE: two clean events, then the secret split over two chunks 200 ms apart."""
        secret = self._received_secret()
        cut = int(self.query.get("at", len(secret) // 2))
        self.start_chunked("text/event-stream")
        self.chunk(b"data: one\n\n")
        self.chunk(b"data: two\n\n")
        self.chunk(b"data: leaked " + secret[:cut])
        time.sleep(0.2)
        self.chunk(secret[cut:] + b"\n\n")
        self.chunk(b"data: after\n\n")
        self.end_chunked()

    def route_leak_gzip(self) -> None:
        data = gzip.compress(GZIP_TEXT + b"key=" + self._received_secret())
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Encoding", self.query.get("coding", "gzip"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route_leak_late(self) -> None:
        """A large body (several chunks) with the secret near its end."""
        self.send_response(200)
        body = PATTERN * 8 + b"key=" + self._received_secret()
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_sse(self) -> None:
        events = int(self.query.get("events", 5))
        interval = float(self.query.get("interval", 0.05))
        self.start_chunked("text/event-stream")
        for i in range(events):
            self.chunk(f"data: {json.dumps({'i': i, 't': time.time()})}\n\n".encode())
            time.sleep(interval)
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def route_sse_lockstep(self) -> None:
        """Send one event, then wait for the test to say it arrived before sending the next."""
        events = int(self.query.get("events", 3))
        self.start_chunked("text/event-stream")
        for i in range(events):
            self.chunk(f"data: {i}\n\n".encode())
            if not self._step(lockstep=True):
                return  # the event never reached the test: stop without a clean end
        self.end_chunked()

    def route_slow(self) -> None:
        time.sleep(float(self.query.get("delay", 2)))
        self.send_json(200, {"slow": True})

    def route_gzip(self) -> None:
        accepts = "gzip" in self.headers.get("Accept-Encoding", "")
        data = gzip.compress(GZIP_TEXT) if accepts else GZIP_TEXT
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if accepts:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route_big(self) -> None:
        total = int(self.query.get("bytes", 1024 * 1024))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        left = total
        while left:
            piece = PATTERN[: min(left, len(PATTERN))]
            self.wfile.write(piece)
            left -= len(piece)

    # --- OpenAI and Anthropic wire formats -----------------------------------

    def _json_body(self) -> dict:
        try:
            return json.loads(self.seen.body or b"{}")
        except ValueError:
            return {}

    def _step(self, lockstep: bool) -> bool:
        """In lockstep, wait until the test has consumed the last piece; False on timeout."""
        return self.server.release.acquire(timeout=10) if lockstep else True

    def route_completions(self) -> None:
        """OpenAI ``POST /chat/completions``; model "lockstep" streams one chunk per release."""
        request = self._json_body()
        words = ["Hello", " from", " the", " fake", " upstream"]
        base = {"id": "chatcmpl-1", "created": 1700000000, "model": request.get("model", "m")}
        # Usage as OpenAI reports it: this stand-in always writes max_tokens tokens
        # (5 without one) for each of n (or best_of) answers to a 10-token prompt, so a
        # budget test gets real figures. ?usage=<JSON> reports that usage instead.
        completion = request.get("max_tokens") or request.get("max_completion_tokens") or 5
        completion *= max(request.get("n") or 1, request.get("best_of") or 1)
        usage = {"prompt_tokens": 10, "completion_tokens": completion}
        usage["total_tokens"] = 10 + completion
        if "usage" in self.query:
            usage = json.loads(self.query["usage"])
        if not request.get("stream"):
            self.send_json(
                200,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "".join(words)},
                        }
                    ],
                    "usage": usage,
                },
                headers={"x-request-id": "req-openai"},
            )
            return
        lockstep = request.get("model") == "lockstep"
        self.start_chunked("text/event-stream")
        for word in words:
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            if (request.get("stream_options") or {}).get("include_usage"):
                chunk["usage"] = None  # OpenAI sends null until the last chunk
            self.chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            if not self._step(lockstep):
                return
        if (request.get("stream_options") or {}).get("include_usage"):
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            self.chunk(f"data: {json.dumps(final)}\n\n".encode())
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def route_generateContent(self) -> None:  # noqa: N802 - Gemini's method name
        """Gemini ``POST /models/{model}:generateContent``: maxOutputTokens per candidate."""
        config = self._json_body().get("generationConfig") or {}
        output = (config.get("maxOutputTokens") or 5) * (config.get("candidateCount") or 1)
        usage = {"promptTokenCount": 6, "candidatesTokenCount": output}
        usage["totalTokenCount"] = 6 + output
        self.send_json(
            200,
            {
                "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
                "usageMetadata": usage,
            },
        )

    def route_models(self) -> None:
        self.send_json(
            200,
            {
                "object": "list",
                "data": [
                    {"id": "gpt-test", "object": "model", "created": 1700000000, "owned_by": "test"}
                ],
            },
        )

    def route_messages(self) -> None:
        """Anthropic ``POST /v1/messages``, plain or as its event stream."""
        request = self._json_body()
        words = ["Hello", " from", " Claude's", " stand-in"]
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": request.get("model", "m"),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 0},
        }
        if not request.get("stream"):
            self.send_json(
                200,
                {
                    **message,
                    "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": "".join(words)}],
                    "usage": {"input_tokens": 3, "output_tokens": 4},
                },
            )
            return
        lockstep = request.get("model") == "lockstep"

        def event(name: str, data: dict) -> None:
            self.chunk(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode())

        self.start_chunked("text/event-stream")
        event("message_start", {"message": {**message, "content": []}})
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for word in words:
            event(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}}
            )
            if not self._step(lockstep):
                return
        event("content_block_stop", {"index": 0})
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 4},
            },
        )
        event("message_stop", {})
        self.end_chunked()

    # --- faults: what real upstreams do on a bad day ---------------------------

    def _reset(self) -> None:
        """Close with RST instead of FIN: what a crashed or killed upstream looks like."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def route_silence(self) -> None:
        """Read the request, then close without answering (``delay=0``: at once)."""
        time.sleep(float(self.query.get("delay", 3)))
        self.close_connection = True

    def route_rude(self) -> None:
        """Answer, then close the connection without having said so (no ``Connection: close``).

        What a server's keep-alive timeout does. ``linger`` (seconds, random up to it)
        is how long the connection stays open first: a request the gateway writes
        in that time is never read, and the close answers it with a reset.
        """
        self.send_json(200, {"method": self.command, "on_connection": self.served})
        self.wfile.flush()
        time.sleep(random.uniform(0, float(self.query.get("linger", 0))))
        self.close_connection = True

    def route_stale_drip(self) -> None:
        """Drop a reused connection unanswered after ``delay``; on a new one, answer as /drip."""
        if self.served > 1:
            time.sleep(float(self.query.get("delay", 0)))
            self.close_connection = True
            return
        self.route_drip()

    def route_reset_mid_status(self) -> None:
        """Send the start of a status line, then reset: an answer that began and broke."""
        self.wfile.write(b"HTTP/1.1 2")
        self.wfile.flush()
        time.sleep(0.05)  # let the bytes be read before the reset arrives
        self._reset()

    def route_reset_before_headers(self) -> None:
        self._reset()

    def route_reset_mid_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"x" * 10000)
        self.wfile.flush()
        self._reset()

    def route_cut_mid_event(self) -> None:
        self.start_chunked("text/event-stream")
        self.chunk(b'data: {"complete": true}\n\n')
        self.chunk(b'data: {"cut": ')
        self.close_connection = True

    def route_drip(self) -> None:
        """Many small pieces with gaps shorter than the read timeout: must pass whole."""
        pieces, gap = int(self.query.get("pieces", 15)), float(self.query.get("gap", 0.2))
        self.start_chunked("text/event-stream")
        for i in range(pieces):
            self.chunk(f"data: {i}\n\n".encode())
            time.sleep(gap)
        self.end_chunked()

    def route_bad_status(self) -> None:
        self.wfile.write(b"HTTP/1.1 two hundred OK\r\nContent-Length: 0\r\n\r\n")
        self.close_connection = True

    def route_huge_headers(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(150):  # more header lines than any sane client accepts
            self.wfile.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000))
        self.wfile.write(b"X-Long: " + b"z" * 70000 + b"\r\nContent-Length: 0\r\n\r\n")
        self.close_connection = True

    def route_short_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "5000")
        self.end_headers()
        self.wfile.write(b"only this much")
        self.close_connection = True

    def route_status(self) -> None:
        code = int(self.seen.path.rsplit("/", 1)[-1])
        self.send_json(code, {"status": code}, headers={"Retry-After": "3"})


class FakeUpstream(ThreadingHTTPServer):
    """The upstream server, run in a background thread of the test process."""

    daemon_threads = True
    # socketserver's default of 5 overflows when a test opens dozens of connections at
    # once, and a connection the kernel dropped from the queue looks like an upstream fault.
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[Seen] = []
        self.release = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def last(self, path_suffix: str) -> Seen:
        """Return the latest request whose path ends with ``path_suffix``."""
        with self._lock:
            for seen in reversed(self.seen):
                if seen.path.endswith(path_suffix):
                    return seen
        raise AssertionError(f"the upstream never saw {path_suffix}")

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
