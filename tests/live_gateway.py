"""Run the real gateway under gunicorn with the shipped gunicorn.conf.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from .support import CANARIES

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CanaryRelay:
    """A TCP relay in front of the gateway that reads every byte it sends to clients.

    Tests talk to the relay, so every response of the whole session (SDK and
    browser calls included) is checked for the canary secrets, not only the
    responses a test looks at. It passes bytes as they come (streams stay
    streams), keeps back-pressure (a client that stops reading stalls the
    gateway's send), and passes a reset on as a reset.
    """

    def __init__(self, target_port: int, secrets: list[bytes], port: int = 0) -> None:
        self.target_port = target_port
        self.secrets = secrets
        self.leaks: list[str] = []
        self.closed = False
        self._listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _reset(client)
            return
        for sock in (client, server):  # pass each write on at once, as the gateway made it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.update((client, server))
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        self._pump(server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, scan: bool) -> None:
        longest = max((len(s) for s in self.secrets), default=1)
        tail = b""
        try:
            while data := source.recv(65536):
                if scan:
                    window = tail + data
                    self.leaks += [s.decode() for s in self.secrets if s in window]
                    tail = window[-(longest - 1) :] if longest > 1 else b""
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(sink)  # a reset (or a dead peer) on one side is a reset on the other
            _reset(source)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _reset(sock)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class LiveGateway:
    """gunicorn serving ``wsgi:app`` on a free loopback port, logs kept in a file.

    ``url`` and ``port`` are a CanaryRelay's: every answer is checked for secrets.
    With ``access_log_path``, stdout (the access log) goes there, apart from stderr.
    """

    def __init__(
        self,
        config_path: str,
        env: dict[str, str],
        log_path: Path,
        access_log_path: Path | None = None,
        **settings,
    ) -> None:
        self.gunicorn_port = free_port()
        self.relay = CanaryRelay(self.gunicorn_port, [v.encode() for v in CANARIES.values()])
        self.port = self.relay.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.access_log_path = access_log_path
        self.env = {
            **os.environ,
            **env,
            "GATEWAY_CONFIG": config_path,
            "GATEWAY_ENV_FILE": os.devnull,
            "GATEWAY_BIND": f"127.0.0.1:{self.gunicorn_port}",
            "GATEWAY_WORKERS": str(settings.get("workers", 2)),
            "GATEWAY_LOG_LEVEL": "info",
        }
        self.env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> LiveGateway:
        if self.relay.closed:  # started again after stop(): the same address as before
            self.relay = CanaryRelay(self.gunicorn_port, self.relay.secrets, self.port)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        out = open(self.access_log_path, "ab") if self.access_log_path else None  # noqa: SIM115
        self._out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=out or log,
            stderr=log if out else subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    # Every worker must have loaded the app, not just the first one.
                    if len(self.loaded_workers()) >= int(self.env["GATEWAY_WORKERS"]):
                        return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or a worker still booting on a busy machine
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up:\n{self.log_path.read_text()}")

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.process.pid)
        return [master, *master.children(recursive=True)]

    def loaded_workers(self) -> set[int]:
        """Return the live workers that have loaded the app (gunicorn.conf.py logs it)."""
        loaded = set(map(int, re.findall(r"gateway: worker (\d+) loaded the app", self.log_text())))
        return loaded & self.worker_pids()

    def worker_pids(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.process.pid).children()}

    def rss(self) -> int:
        """Return the resident memory of the master and all workers, in bytes."""
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def log_text(self) -> str:
        """Return everything gunicorn wrote: both logs, unless they are apart."""
        text = self.log_path.read_text(errors="replace")
        if self.access_log_path and self.access_log_path.exists():
            text += self.access_log_path.read_text(errors="replace")
        return text

    def access_lines(self) -> list[dict]:
        """Return the access log's lines, parsed (they all must be JSON objects)."""
        text = self.access_log_path.read_text() if self.access_log_path else self.log_text()
        lines = text.splitlines()
        if not self.access_log_path:  # mixed with the error log: take the JSON lines
            lines = [line for line in lines if line.startswith("{")]
        return [json.loads(line) for line in lines]

    def access_line(self, request_id: str, timeout: float = 10) -> dict:
        """Wait for the access line of ``request_id`` (written when its answer has ended)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.access_lines() if line["request_id"] == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} access lines for {request_id}"
                return found[0]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self._out:
            self._out.close()
        self.relay.close()
        assert not self.relay.leaks, f"a response carried a secret: {set(self.relay.leaks)}"
