"""Run the whole benchmark on loopback and print (or write) the Markdown report.

    .venv/bin/python -m bench [--runs 3] [--duration 8] [--random-timing 1000] [--write]

Starts the fast upstream, the two floors, the gateway, the seed-design peer and nginx
(if installed), all with the gateway's worker count; then the same upstream over HTTPS
(a certificate from a bench CA) with the forwarding floor and the gateway trusting that
CA; measures; stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil
import requests
import trustme

ROOT = Path(__file__).resolve().parent.parent
KEY = "ck-bench-client-key"
SECRET = "Bearer bench-upstream-secret-placeholder"
ENVELOPE = '{"method":"GET","path":"/models"}'
MB = 1024 * 1024
# The random-timing round: gaps random around 100 ms, the connection closed after each stream.
RANDOM_SSE = "/sse?events=20&interval=0.1&jitter=1&close=1"
SPREAD = 4.0  # seconds over which its streams open


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class System:
    name: str
    url: str
    post: bool  # POST the envelope (else GET)
    rps: list[float] = field(default_factory=list)
    p50_32: list[float] = field(default_factory=list)
    p99_32: list[float] = field(default_factory=list)
    p50_1: list[float] = field(default_factory=list)
    p99_1: list[float] = field(default_factory=list)
    errors: int = 0


def run_client(*args: object) -> object:
    """Run a bench client in its own process and return what it measured."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.clients", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def rss(process: subprocess.Popen) -> int:
    root = psutil.Process(process.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(system: System, connections: int, seconds: float) -> dict:
    command = [
        "wrk",
        "-t",
        "2" if connections > 1 else "1",
        "-c",
        str(connections),
        "-d",
        f"{int(seconds)}s",
        "--latency",
        system.url,
    ]
    env = {**os.environ, "BENCH_BODY": ENVELOPE, "BENCH_KEY": KEY}
    if system.post:
        command += ["-s", str(ROOT / "bench" / "post.lua")]
    else:
        command += ["-H", f"Authorization: Bearer {KEY}"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if not {"50", "99"} <= set(latency):
        raise RuntimeError(f"wrk gave no latency for {system.name}:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": _ms(latency["50"]),
        "p99": _ms(latency["99"]),
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        self.processes: list[subprocess.Popen] = []
        self.ports = {
            name: free_port()
            for name in (
                "upstream",
                "framework",
                "forward",
                "gateway",
                "peer",
                "nginx",
                "upstream_tls",
                "forward_tls",
                "gateway_tls",
            )
        }
        self.upstream = f"http://127.0.0.1:{self.ports['upstream']}/v1"
        self.upstream_tls = f"https://127.0.0.1:{self.ports['upstream_tls']}/v1"
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.tmp / "ca.pem"))
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(self.tmp / "upstream.pem"))
        leaf.private_key_pem.write_to_path(str(self.tmp / "upstream.key"))
        self.env = {
            **os.environ,
            "BENCH_UPSTREAM": self.upstream,
            "BENCH_SECRET": SECRET,
            "BENCH_KEY": KEY,
            "BENCH_UPSTREAM_KEY": "bench-upstream-secret-placeholder",
            "GATEWAY_CONFIG": str(self.write_config("config.yaml", self.upstream)),
            "GATEWAY_ENV_FILE": os.devnull,
            "GATEWAY_LOG_LEVEL": "warning",
        }

    def write_config(self, name: str, upstream: str, tls: str = "") -> Path:
        path = self.tmp / name
        path.write_text(
            f"targets:\n  bench: {{baseUrl: '{upstream}'{tls}}}\n"
            "secrets:\n  bench: Bearer ${BENCH_UPSTREAM_KEY}\n"
            f"clients:\n  {KEY}:\n    target: bench\n    authHeaderRef: bench\n"
            "    allowedMethods: [GET, POST]\n"
            "    allowedPaths: [/models, /chat/completions, /sse, /big]\n"
            "    timeoutMs: 60000\n"
        )
        return path

    def start(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            command, cwd=cwd, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        wait_for(self.ports[name])
        return process

    def gunicorn(
        self, name: str, app: str, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen:
        return self.start(
            name,
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{self.ports[name]}",
                app,
            ],
            env,
            cwd,
        )

    def nginx(self) -> subprocess.Popen | None:
        if not shutil.which("nginx"):
            return None
        conf = self.tmp / "nginx.conf"
        conf.write_text(f"""
worker_processes {psutil.cpu_count()};
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {self.tmp}/body;
  proxy_temp_path {self.tmp}/proxy;
  upstream up {{ server 127.0.0.1:{self.ports["upstream"]}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{self.ports["nginx"]};
    location /proxy/ {{
      proxy_pass http://up/v1/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{SECRET}";
      proxy_buffering off;
    }}
  }}
}}
""")
        return self.start(
            "nginx", ["nginx", "-p", str(self.tmp), "-c", str(conf), "-g", "daemon off;"]
        )

    def start_tls(self) -> None:
        """Start the upstream over HTTPS, and a floor and a gateway that trust its CA."""
        ca = str(self.tmp / "ca.pem")
        self.started["upstream_tls"] = self.start(
            "upstream_tls",
            [
                sys.executable,
                "-m",
                "bench.upstream",
                str(self.ports["upstream_tls"]),
                str(self.tmp / "upstream.pem"),
                str(self.tmp / "upstream.key"),
            ],
        )
        self.started["forward_tls"] = self.gunicorn(
            "forward_tls",
            "bench.floors:forward_app",
            {"BENCH_UPSTREAM": self.upstream_tls, "BENCH_CA": ca},
        )
        config = self.write_config("config-tls.yaml", self.upstream_tls, f", caBundle: '{ca}'")
        self.started["gateway_tls"] = self.gunicorn(
            "gateway_tls", "wsgi:app", {"GATEWAY_CONFIG": str(config)}
        )

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    # --- measurements ------------------------------------------------------------

    def systems(self) -> list[System]:
        p = self.ports
        systems = [
            System("upstream, direct", f"http://127.0.0.1:{p['upstream']}/v1/models", False),
            System(
                "framework floor (Flask no-op)", f"http://127.0.0.1:{p['framework']}/proxy", True
            ),
            System(
                "forwarding floor (Flask + urllib3)", f"http://127.0.0.1:{p['forward']}/proxy", True
            ),
            System("gateway, envelope", f"http://127.0.0.1:{p['gateway']}/proxy", True),
            System("gateway, transparent", f"http://127.0.0.1:{p['gateway']}/proxy/models", False),
            System("seed design (FastAPI + httpx)", f"http://127.0.0.1:{p['peer']}/proxy", True),
        ]
        if "nginx" in self.started:
            systems.append(
                System("nginx proxy_pass", f"http://127.0.0.1:{p['nginx']}/proxy/models", False)
            )
        return systems + [
            System("TLS: upstream, direct", f"{self.upstream_tls}/models", False),
            System("TLS: forwarding floor", f"http://127.0.0.1:{p['forward_tls']}/proxy", True),
            System("TLS: gateway, envelope", f"http://127.0.0.1:{p['gateway_tls']}/proxy", True),
            System(
                "TLS: gateway, transparent",
                f"http://127.0.0.1:{p['gateway_tls']}/proxy/models",
                False,
            ),
        ]

    def throughput(self, systems: list[System]) -> None:
        for system in systems:  # warm-up: pools, imports, JIT-free but cache-warm
            wrk(system, 32, 2)
        for run in range(self.args.runs):
            for system in systems:
                result = wrk(system, 32, self.args.duration)
                system.rps.append(result["rps"])
                system.p50_32.append(result["p50"])
                system.p99_32.append(result["p99"])
                system.errors += result["errors"]
            for system in systems:
                result = wrk(system, 1, self.args.duration)
                system.p50_1.append(result["p50"])
                system.p99_1.append(result["p99"])
                system.errors += result["errors"]
            print(f"  run {run + 1}/{self.args.runs} done", file=sys.stderr)

    def peak_rss(self, process: subprocess.Popen, work) -> tuple[object, int, int]:
        """Run ``work()`` while sampling the RSS of ``process`` and its children."""
        baseline = rss(process)
        peak = [baseline]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss(process))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = work()
        finally:
            done.set()
            sampler.join()
        return result, baseline, peak[0]

    def stream_run(self, count: int) -> dict:
        """One round of ``count`` concurrent streams: direct, then through the gateway."""
        target = "/sse?events=20&interval=0.1"
        direct = run_client("streams", self.ports["upstream"], "/v1" + target, count, "-")
        through, _, peak = self.peak_rss(
            self.started["gateway"],
            lambda: run_client("streams", self.ports["gateway"], "/proxy" + target, count, KEY),
        )
        delays = sorted(d * 1000 for stream in through for d in stream)
        # Past each stream's first two events: the gateway is no longer opening
        # ``count`` client and upstream connections at once.
        steady = sorted(d * 1000 for stream in through for d in stream[2:])
        base = sorted(d * 1000 for stream in direct for d in stream)
        return {
            "streams": count,
            "delivered": len(delays),
            "expected": count * 20,
            "p50": _pct(delays, 50),
            "p99": _pct(delays, 99),
            "steady_p99": _pct(steady, 99),
            "direct_p50": _pct(base, 50),
            "direct_p99": _pct(base, 99),
            "rss": peak / MB,
        }

    def streaming(self) -> list[dict]:
        """Return, per stream count, the median of each figure over the runs."""
        rows = []
        for count in self.args.streams:
            runs = [self.stream_run(count) for _ in range(self.args.runs)]
            row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            # Counts stay whole numbers: a median of an even number of runs averages two.
            row["streams"], row["expected"] = count, runs[0]["expected"]
            row["delivered"] = min(run["delivered"] for run in runs)  # all, every time
            rows.append(row)
        return rows

    def random_stream_run(self, count: int, gateway: str = "gateway") -> dict:
        """One round of ``count`` streams opened at random times, events at random gaps.

        The upstream closes each connection after its stream without saying so, so a
        connection the gateway pools may be closed when the next stream reuses it.
        """
        log = self.tmp / f"{gateway}.log"
        before = log.read_text(errors="replace")
        through = run_client(
            "streams", self.ports[gateway], "/proxy" + RANDOM_SSE, count, SPREAD, KEY
        )
        after = log.read_text(errors="replace")[len(before) :]
        delays = sorted(d * 1000 for stream in through for d in stream)
        return {
            "streams": count,
            "whole": sum(len(stream) == 20 for stream in through),
            "delivered": len(delays),
            "expected": count * 20,
            "p50": _pct(delays, 50),
            "p99": _pct(delays, 99),
            "retried": after.count("retried on a new connection"),
        }

    def random_streaming(self) -> dict:
        """Return the median figures of the random-timing rounds; the fewest whole streams."""
        runs = [self.random_stream_run(self.args.random_timing) for _ in range(self.args.runs)]
        row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        row["streams"], row["expected"] = runs[0]["streams"], runs[0]["expected"]
        row["whole"] = min(run["whole"] for run in runs)
        row["delivered"] = min(run["delivered"] for run in runs)
        row["retried"] = [run["retried"] for run in runs]
        return row

    def large_body(self) -> dict:
        size = self.args.big_mb * MB
        direct = run_client("big", self.ports["upstream"], f"/v1/big?bytes={size}", "-")
        through, baseline, peak = self.peak_rss(
            self.started["gateway"],
            lambda: run_client("big", self.ports["gateway"], f"/proxy/big?bytes={size}", KEY),
        )
        return {
            "size": size,
            "bytes": through[0],
            "mbps": through[0] / MB / through[1],
            "direct_mbps": direct[0] / MB / direct[1],
            "growth": (peak - baseline) / MB,
        }

    def run_tls(self) -> str:
        """Measure only the forwarding floor and the gateway, over plain http and over TLS."""
        self.started = {}
        try:
            self.started["upstream"] = self.start(
                "upstream", [sys.executable, "-m", "bench.upstream", str(self.ports["upstream"])]
            )
            self.started["forward"] = self.gunicorn("forward", "bench.floors:forward_app")
            self.started["gateway"] = self.gunicorn("gateway", "wsgi:app")
            self.start_tls()
            self.check("forward", "gateway", "forward_tls", "gateway_tls")
            names = ("upstream", "forwarding floor", "gateway, envelope", "TLS:")
            systems = [s for s in self.systems() if any(n in s.name for n in names)]
            print("throughput and latency...", file=sys.stderr)
            self.throughput(systems)
        finally:
            self.stop()
        return tls_report(self.args, systems)

    def check(self, *names: str) -> None:
        """Fail early unless each named server forwards one envelope call."""
        for name in names:
            check = requests.post(
                f"http://127.0.0.1:{self.ports[name]}/proxy",
                data=ENVELOPE,
                timeout=10,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            check.raise_for_status()

    def run(self) -> str:
        self.started = {}
        try:
            self.started["upstream"] = self.start(
                "upstream", [sys.executable, "-m", "bench.upstream", str(self.ports["upstream"])]
            )
            self.started["framework"] = self.gunicorn("framework", "bench.floors:framework_app")
            self.started["forward"] = self.gunicorn("forward", "bench.floors:forward_app")
            self.started["gateway"] = self.gunicorn("gateway", "wsgi:app")
            self.started["peer"] = self.start(
                "peer",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.peer:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.ports["peer"]),
                    "--workers",
                    str(psutil.cpu_count()),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
            )
            nginx = self.nginx()
            if nginx is not None:
                self.started["nginx"] = nginx
            self.start_tls()
            self.check("gateway", "gateway_tls", "forward_tls")
            systems = self.systems()
            print("throughput and latency...", file=sys.stderr)
            self.throughput(systems)
            print("streams...", file=sys.stderr)
            streams = self.streaming()
            random_streams = None
            if self.args.random_timing:
                print("streams with random timing...", file=sys.stderr)
                random_streams = self.random_streaming()
            print("large body...", file=sys.stderr)
            big = self.large_body()
        finally:
            self.stop()
        return report(self.args, systems, streams, random_streams, big)


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _throughput_table(systems: list[System]) -> list[str]:
    med = statistics.median
    lines = [
        "| system | req/s at 32 conn | p50 / p99 ms at 32 | p50 / p99 ms at 1 | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in systems:
        lines.append(
            f"| {s.name} | {med(s.rps):,.0f} | {med(s.p50_32):.2f} / {med(s.p99_32):.2f}"
            f" | {med(s.p50_1):.2f} / {med(s.p99_1):.2f} | {s.errors} |"
        )
    return lines


def _tls_ratios(by_name: dict[str, System]) -> list[str]:
    floor = by_name["forwarding floor (Flask + urllib3)"]
    gateway = by_name["gateway, envelope"]
    tls_floor = by_name["TLS: forwarding floor"]
    tls_gateway = by_name["TLS: gateway, envelope"]
    tls_direct = by_name["TLS: upstream, direct"]
    added_p50 = statistics.median(
        a - b for a, b in zip(tls_gateway.p50_1, tls_direct.p50_1, strict=True)
    )
    return [
        "Over TLS (the upstream on HTTPS with a bench CA's certificate; the floor and the",
        "gateway trust that CA and keep their upstream connections pooled):",
        "",
        f"- gateway envelope / forwarding floor, both over TLS: "
        f"**{_median_ratio(tls_gateway.rps, tls_floor.rps):.2f}x**",
        f"- gateway transparent / forwarding floor, both over TLS: "
        f"{_median_ratio(by_name['TLS: gateway, transparent'].rps, tls_floor.rps):.2f}x",
        f"- over TLS / over plain http: gateway envelope "
        f"{_median_ratio(tls_gateway.rps, gateway.rps):.2f}x, forwarding floor "
        f"{_median_ratio(tls_floor.rps, floor.rps):.2f}x",
        f"- added p50 latency at 1 connection over the direct TLS upstream: envelope "
        f"**{added_p50:.2f} ms**",
    ]


def tls_report(args, systems: list[System]) -> str:
    """Return the TLS comparison alone (``--tls-only``), plain http beside it."""
    by_name = {s.name: s for s in systems}
    gateway = by_name["gateway, envelope"]
    floor = by_name["forwarding floor (Flask + urllib3)"]
    return "\n".join(
        [
            f"wrk, {args.runs} runs of {args.duration} s per figure, interleaved; medians.",
            "",
            *_throughput_table(systems),
            "",
            *_tls_ratios(by_name),
            f"- beside it, over plain http: gateway envelope / forwarding floor "
            f"{_median_ratio(gateway.rps, floor.rps):.2f}x",
        ]
    )


def report(
    args, systems: list[System], streams: list[dict], random_streams: dict | None, big: dict
) -> str:
    by_name = {s.name: s for s in systems}
    gateway = by_name["gateway, envelope"]
    med = statistics.median
    lines = [
        "## Machine",
        "",
        f"- {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GiB RAM, "
        f"{platform.platform()}",
        f"- Python {platform.python_version()}; "
        + ", ".join(
            f"{p} {version(p)}"
            for p in (
                "flask",
                "werkzeug",
                "gunicorn",
                "gevent",
                "requests",
                "urllib3",
                "fastapi",
                "uvicorn",
                "httpx",
            )
        ),
        f"- load: wrk, {args.runs} runs of {args.duration} s per figure, interleaved; medians "
        f"(streams: the median of {args.runs} rounds, the fewest events delivered)",
        "- every server on the same machine as wrk and the upstream (2 cores shared)",
        "",
        "## Throughput and latency",
        "",
        *_throughput_table(systems),
    ]
    floor = by_name["forwarding floor (Flask + urllib3)"]
    peer = by_name["seed design (FastAPI + httpx)"]
    transparent = by_name["gateway, transparent"]
    direct = by_name["upstream, direct"]
    vs_peer = _median_ratio(gateway.rps, peer.rps)
    vs_floor = _median_ratio(gateway.rps, floor.rps)
    vs_floor_tls = _median_ratio(
        by_name["TLS: gateway, envelope"].rps, by_name["TLS: forwarding floor"].rps
    )
    added_p50 = med(a - b for a, b in zip(gateway.p50_1, direct.p50_1, strict=True))
    added_p50_transparent = med(a - b for a, b in zip(transparent.p50_1, direct.p50_1, strict=True))
    lines += [
        "",
        "Ratios, run by run (median of the per-run ratios):",
        "",
        f"- gateway envelope / seed design: **{vs_peer:.2f}x**",
        f"- gateway envelope / forwarding floor: **{vs_floor:.2f}x**",
        f"- gateway transparent / forwarding floor: "
        f"{_median_ratio(transparent.rps, floor.rps):.2f}x",
        f"- forwarding floor / framework floor: "
        f"{_median_ratio(floor.rps, by_name['framework floor (Flask no-op)'].rps):.2f}x",
        f"- added p50 latency at 1 connection over the direct upstream: envelope "
        f"**{added_p50:.2f} ms**, transparent {added_p50_transparent:.2f} ms",
        "",
        *_tls_ratios(by_name),
        "",
        "## Streams (20 events 100 ms apart each, through the gateway)",
        "",
        "| streams | events delivered | delay p50 / p99 ms | p99 past first 2 events "
        "| direct p50 / p99 ms | gateway RSS peak |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in streams:
        lines.append(
            f"| {row['streams']} | {row['delivered']} / {row['expected']} | "
            f"{row['p50']:.1f} / {row['p99']:.1f} | {row['steady_p99']:.1f} | "
            f"{row['direct_p50']:.1f} / "
            f"{row['direct_p99']:.1f} | {row['rss']:.0f} MB |"
        )
    top = streams[-1]
    added_stream_p99 = top["p99"] - top["direct_p99"]
    if random_streams is not None:
        row = random_streams
        lines += [
            "",
            f"## Streams with random timing ({row['streams']} streams opened at random over "
            f"{SPREAD:g} s, 20 events each at random gaps of 0 to 200 ms)",
            "",
            "The upstream closes each connection after its stream without saying so (no "
            "`Connection: close`), as a server does when its keep-alive timeout fires, so "
            "a pooled connection may be closed just as the next stream reuses it.",
            "",
            "| streams | whole streams | events delivered | delay p50 / p99 ms "
            "| calls sent again, per round |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {row['streams']} | {row['whole']} / {row['streams']} | "
            f"{row['delivered']} / {row['expected']} | {row['p50']:.1f} / {row['p99']:.1f} | "
            f"{', '.join(map(str, row['retried']))} |",
        ]
    lines += [
        "",
        "## Large body",
        "",
        f"- {big['size'] // MB} MB through the gateway: {big['bytes'] // MB} MB received, "
        f"**{big['mbps']:.0f} MB/s** (direct: {big['direct_mbps']:.0f} MB/s), "
        f"gateway RSS growth **{big['growth']:.1f} MB**",
        "",
        "## Against the targets",
        "",
        "| target | goal | measured | ratio to goal | met |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    # (target, measured, goal, higher is better, also required)
    targets = [
        ("throughput vs seed design", vs_peer, 4.0, True, True),
        ("throughput vs forwarding floor", vs_floor, 0.9, True, True),
        ("throughput vs forwarding floor, over TLS", vs_floor_tls, 0.9, True, True),
        ("added p50 latency at 1 connection (ms)", added_p50, 0.8, False, True),
        (
            f"added p99 stream delay at {top['streams']} streams (ms)",
            added_stream_p99,
            20.0,
            False,
            top["delivered"] == top["expected"],
        ),
        ("RSS growth for a 100 MB body (MB)", big["growth"], 20.0, False, True),
    ]
    for name, value, goal, higher, required in targets:
        met = required and (value >= goal if higher else value <= goal)
        lines.append(
            f"| {name} | {'>=' if higher else '<='} {goal:g} | {value:.2f} | "
            f"{value / goal:.2f} | {'yes' if met else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[100, 500, 1000]
    )
    parser.add_argument(
        "--random-timing",
        type=int,
        default=1000,
        help="streams in the random-timing round (0 skips it)",
    )
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument(
        "--tls-only",
        action="store_true",
        help="measure only the floor and the gateway over http and TLS, and print it",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (and nginx for the ceiling)")
    if args.tls_only:
        print(Bench(args).run_tls())
        return
    table = Bench(args).run()
    print(table)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        notes = ""
        if path.exists() and "<!-- notes -->" in path.read_text():
            notes = path.read_text().split("<!-- notes -->", 1)[1]
        command = "python -m bench " + " ".join(sys.argv[1:])
        path.write_text(
            f"# Benchmarks\n\nCommand: `{command}` (from the project root, "
            f"{time.strftime('%Y-%m-%d')}).\n\n{table}\n<!-- notes -->{notes}"
        )


if __name__ == "__main__":
    main()
