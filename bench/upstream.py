"""A fast upstream for the benchmark: raw asyncio, keep-alive, three routes.

``/models`` (small JSON), ``/sse?events=N&interval=S`` (events stamped with their send
time; ``jitter=1``: each gap random between 0 and twice S; ``close=1``: close the
connection after the stream without having said so, as a keep-alive timeout does),
``/big?bytes=N`` (a large body, flow-controlled). Run: ``python -m bench.upstream PORT``,
or ``python -m bench.upstream PORT CERT KEY`` to serve HTTPS with that certificate.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import sys
import time
from urllib.parse import parse_qs

BODY = b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'
SMALL = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: bench\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
PIECE = bytes(range(256)) * 256


class Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.can_write = asyncio.Event()
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            path, _, query = head.split(" ", 2)[1].partition("?")
            args = {k: v[-1] for k, v in parse_qs(query).items()}
            if path.endswith("/sse"):
                asyncio.ensure_future(
                    self.sse(
                        int(args.get("events", 20)),
                        float(args.get("interval", 0.1)),
                        jitter=args.get("jitter") == "1",
                        close=args.get("close") == "1",
                    )
                )
            elif path.endswith("/big"):
                asyncio.ensure_future(self.big(int(args.get("bytes", 1 << 20))))
            else:
                self.transport.write(SMALL)

    async def sse(self, events: int, interval: float, jitter: bool, close: bool) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(events):
            event = f"data: {json.dumps({'i': i, 't': time.time()})}\n\n".encode()
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(random.uniform(0, 2 * interval) if jitter else interval)
        self.transport.write(b"0\r\n\r\n")
        if close:
            self.transport.close()

    async def big(self, size: int) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        left = size
        while left and not self.transport.is_closing():
            await self.can_write.wait()
            piece = PIECE[: min(left, len(PIECE))]
            self.transport.write(piece)
            left -= len(piece)


async def main(port: int, tls: ssl.SSLContext | None) -> None:
    server = await asyncio.get_running_loop().create_server(
        Upstream, "127.0.0.1", port, backlog=4096, ssl=tls
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    context = None
    if len(sys.argv) > 2:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
    asyncio.run(main(int(sys.argv[1]), context))
