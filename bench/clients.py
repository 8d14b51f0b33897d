"""Asyncio clients for the streaming and large-body figures."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time


async def _open(port: int, target: str, headers: dict[str, str]):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Accept-Encoding: identity"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head.decode("latin-1")


async def _sse(port: int, target: str, headers: dict[str, str], start: float = 0) -> list[float]:
    """Read one chunked SSE stream, opened after ``start`` s; return each event's delay."""
    await asyncio.sleep(start)
    delays: list[float] = []
    reader, writer, head = await _open(port, target, headers)
    if " 200 " not in head.split("\r\n", 1)[0]:
        writer.close()
        return delays
    buffer = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        now = time.time()
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            delays.append(now - json.loads(event[6:])["t"])
    writer.close()
    return delays


def streams(
    port: int, target: str, headers: dict[str, str], count: int, spread: float = 0
) -> list[list[float]]:
    """Open ``count`` SSE streams, each at a random time within ``spread`` s; return the delays."""

    async def run():
        starts = [random.uniform(0, spread) for _ in range(count)]
        results = await asyncio.gather(
            *(_sse(port, target, headers, start) for start in starts), return_exceptions=True
        )
        return [r if isinstance(r, list) else [] for r in results]

    return asyncio.run(run())


def big_body(port: int, target: str, headers: dict[str, str]) -> tuple[int, float]:
    """Read one large body as fast as possible; return (bytes, seconds)."""

    async def run():
        started = time.perf_counter()
        reader, writer, head = await _open(port, target, headers)
        length = int(
            next(
                line.split(":", 1)[1]
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            )
        )
        received = 0
        while received < length:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        writer.close()
        return received, time.perf_counter() - started

    return asyncio.run(run())


def main() -> None:
    """``bench.clients streams PORT TARGET COUNT [SPREAD] KEY`` or ``big PORT TARGET KEY``.

    Runs in its own process, so the parent's memory sampling cannot slow the client.
    """
    mode, port, target, *rest = sys.argv[1:]
    headers = {"Authorization": f"Bearer {rest[-1]}"} if rest[-1] != "-" else {}
    if mode == "streams":
        spread = float(rest[1]) if len(rest) > 2 else 0
        result = streams(int(port), target, headers, int(rest[0]), spread)
    else:
        result = big_body(int(port), target, headers)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
