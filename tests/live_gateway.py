"""Run the real gateway under gunicorn with the shipped gunicorn.conf.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveGateway:
    """gunicorn serving ``wsgi:app`` on a free loopback port, logs kept in a file."""

    def __init__(self, config_path: str, env: dict[str, str], log_path: Path, **settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            **env,
            "GATEWAY_CONFIG": config_path,
            "GATEWAY_ENV_FILE": os.devnull,
            "GATEWAY_BIND": f"127.0.0.1:{self.port}",
            "GATEWAY_WORKERS": str(settings.get("workers", 2)),
            "GATEWAY_LOG_LEVEL": "info",
        }
        self.env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> LiveGateway:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    # Every worker must be up, not just the first one.
                    if len(self.worker_pids()) >= int(self.env["GATEWAY_WORKERS"]):
                        return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or a worker still booting on a busy machine
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up:\n{self.log_path.read_text()}")

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.process.pid)
        return [master, *master.children(recursive=True)]

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
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
