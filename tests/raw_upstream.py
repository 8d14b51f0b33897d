"""An upstream on 127.0.0.1 that writes its answers byte by byte, framing faults included.

http.server cannot send an interim answer before its real one, nor frame an answer
wrongly; this one does both. A request's path picks a script and names its caller:
``/<script>/<arg>/<caller>``. Every real answer is a 200 whose JSON body names that
caller, so a test can tell whose answer a client got; every stray byte a script
writes where no answer may follow is a whole answer naming ``smuggled``, so a
connection the gateway reuses out of step hands it to the next call. Connections
are kept alive, as a real server's, until a script closes them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass

PAUSE = 0.3  # how long a script waits before the bytes that follow an interim or stray head

# Interim heads by name: a number alone is a bare status line, "h" adds headers.
INTERIM = {
    "100": b"HTTP/1.1 100 Continue\r\n\r\n",
    "102": b"HTTP/1.1 102 Processing\r\n\r\n",
    "103": b"HTTP/1.1 103 Early Hints\r\n\r\n",
    "103h": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
    b"Link: </b.js>; rel=preload; as=script\r\n\r\n",
    "102h": b"HTTP/1.1 102 Processing\r\nX-Progress: 40\r\n\r\n",
}


def body_for(caller: str) -> bytes:
    return json.dumps({"caller": caller}).encode()


def answer(caller: str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """Return a whole 200 answer naming ``caller``, ``extra`` header lines included."""
    body = body_for(caller)
    head = b"%s 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
    return head % (version, len(body), extra) + body


SMUGGLED = answer("smuggled")


@dataclass
class Arrival:
    """One request as it arrived: its script, caller, and place on its connection."""

    method: str
    script: str
    caller: str
    on_connection: int


class RawUpstream:
    """The scripted upstream, serving each connection in its own thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()

    def start(self) -> RawUpstream:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def arrived(self, caller: str) -> list[int]:
        """Return, per arrival of ``caller``'s call, its place on its connection."""
        with self._lock:
            return [a.on_connection for a in self.arrivals if a.caller == caller]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        served = 0
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                served += 1
                path = target.split("?", 1)[0]
                # /<prefix>/<script>/<arg>/<caller>: the gateway's target path comes first.
                script, arg, caller = path.rsplit("/", 3)[1:]
                with self._lock:
                    self.arrivals.append(Arrival(method, script, caller, served))
                length = int(headers.get("content-length", 0))
                if script != "early":  # "early" answers before reading the body
                    reader.read(length)
                keep = getattr(self, "_script_" + script.replace("-", "_"))(
                    conn, method, arg, caller
                )
                if not keep:
                    return
        except (OSError, ValueError):
            return
        finally:
            reader.close()
            with contextlib.suppress(OSError):
                conn.close()

    # --- scripts: each writes one exchange's bytes; True keeps the connection open ---

    def _script_interim(self, conn, method, arg, caller) -> bool:
        """Interim answers (``arg``: names from INTERIM joined by "."), then the real one."""
        for name in arg.split("."):
            conn.sendall(INTERIM[name])
            time.sleep(PAUSE / 3)
        time.sleep(PAUSE)
        conn.sendall(answer(caller))
        return True

    def _script_interim_close(self, conn, method, arg, caller) -> bool:
        """Interim answers, then a close where the real answer should be."""
        for name in arg.split("."):
            conn.sendall(INTERIM[name])
        time.sleep(PAUSE)
        return False

    def _script_switch(self, conn, method, arg, caller) -> bool:
        """``101 Switching Protocols`` to a call that asked for no upgrade, then other bytes."""
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        )
        time.sleep(PAUSE)
        conn.sendall(SMUGGLED)
        return True

    def _script_ok(self, conn, method, arg, caller) -> bool:
        conn.sendall(answer(caller))
        return True

    def _script_bodiless(self, conn, method, arg, caller) -> bool:
        """A head that frames no body but announces one, whose bytes come late.

        ``arg`` is "<status>.<framing>": status 204 or 304, or 200 to a HEAD; framing
        "length" or "chunked". The late bytes are a whole other answer.
        """
        status, framing = arg.split(".")
        reason = {"200": b"OK", "204": b"No Content", "304": b"Not Modified"}[status]
        announced = {
            "length": b"Content-Length: %d\r\n" % len(SMUGGLED),
            "chunked": b"Transfer-Encoding: chunked\r\n",
        }[framing]
        head = b"HTTP/1.1 %s %s\r\nX-Caller: %s\r\n" % (status.encode(), reason, caller.encode())
        conn.sendall(head + announced + b"\r\n")
        time.sleep(PAUSE)
        conn.sendall(SMUGGLED)
        return True

    def _script_both_framings(self, conn, method, arg, caller) -> bool:
        """Content-Length and Transfer-Encoding both set (``arg``: the coding)."""
        body = body_for(caller)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: %s\r\n\r\n"
        conn.sendall(
            head % (len(body), arg.encode()) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        time.sleep(PAUSE)
        conn.sendall(SMUGGLED)
        return True

    def _script_lengths(self, conn, method, arg, caller) -> bool:
        """Two Content-Length values that disagree (``arg``: "lines" or "list")."""
        body = body_for(caller) + SMUGGLED
        first, second = len(body_for(caller)), len(body)
        if arg == "lines":
            framing = b"Content-Length: %d\r\nContent-Length: %d\r\n" % (first, second)
        else:
            framing = b"Content-Length: %d, %d\r\n" % (first, second)
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body)
        return True

    def _script_overlong(self, conn, method, arg, caller) -> bool:
        """More bytes than the framing says (``arg``: "length" or "chunked"), sent at once."""
        body = body_for(caller)
        if arg == "length":
            conn.sendall(answer(caller) + SMUGGLED)
        else:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            conn.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + SMUGGLED)
        return True

    def _script_closing(self, conn, method, arg, caller) -> bool:
        """An answer that says the connection ends (``arg``: "close" or "http10"), which
        stays open and writes more."""
        if arg == "close":
            conn.sendall(answer(caller, b"Connection: close\r\n"))
        else:
            conn.sendall(answer(caller, version=b"HTTP/1.0"))
        time.sleep(PAUSE)
        conn.sendall(SMUGGLED)
        time.sleep(PAUSE)
        return False

    def _script_early(self, conn, method, arg, caller) -> bool:
        """Answer before reading the request body, then close without reading it."""
        body = body_for(caller)
        conn.sendall(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(float(arg))
        return False
