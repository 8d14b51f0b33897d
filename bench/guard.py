"""What the egress guard costs: the gateway with it on and off, side by side.

    .venv/bin/python -m bench.guard [--runs 5] [--duration 5] [--big-mb 100]

Starts the bench upstream and two gateways (``egressGuard`` on, the default, and
off), measures them interleaved with wrk (both modes) and with one 100 MB body
each, and prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time

from gateway.policy.egress import guard_headers, guarded_variants, scan_body

from .__main__ import MB, Bench, System, free_port, run_client, wrk

KEY = "ck-bench-client-key"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=100)
    args = parser.parse_args()

    cpu = scan_cost(args.big_mb)
    bench = Bench(args)
    on_config = bench.write_config("config-on.yaml", bench.upstream)
    off_config = bench.tmp / "config-off.yaml"
    off_config.write_text(on_config.read_text() + "egressGuard: false\n")
    bench.ports["gateway_off"] = free_port()
    try:
        bench.start(
            "upstream", [sys.executable, "-m", "bench.upstream", str(bench.ports["upstream"])]
        )
        bench.gunicorn("gateway", "wsgi:app")
        bench.env["GATEWAY_CONFIG"] = str(off_config)
        bench.gunicorn("gateway_off", "wsgi:app")
        systems = {}
        for label, port in (("on", bench.ports["gateway"]), ("off", bench.ports["gateway_off"])):
            url = f"http://127.0.0.1:{port}"
            systems[label] = [
                System(f"envelope, guard {label}", url + "/proxy", True),
                System(f"transparent, guard {label}", url + "/proxy/models", False),
            ]
        for system in [*systems["on"], *systems["off"]]:
            wrk(system, 32, 2)  # warm-up
        big = {"on": [], "off": []}
        for run in range(args.runs):
            for on, off in zip(systems["on"], systems["off"], strict=True):
                for system in (on, off):
                    system.rps.append(wrk(system, 32, args.duration)["rps"])
            for label in ("on", "off"):
                port = bench.ports["gateway" if label == "on" else "gateway_off"]
                size = args.big_mb * MB
                received, seconds = run_client("big", port, f"/proxy/big?bytes={size}", KEY)
                assert received == size, (label, received)
                big[label].append(received / MB / seconds)
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        bench.stop()

    med = statistics.median
    lines = [
        "## Egress guard cost",
        "",
        f"`python -m bench.guard --runs {args.runs} --duration {args.duration}`: the same "
        "gateway with `egressGuard` on (the default) and off, interleaved run by run; "
        "wrk at 32 connections; medians.",
        "",
        "| mode | guard on req/s | guard off req/s | on / off (median of per-run ratios) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for on, off in zip(systems["on"], systems["off"], strict=True):
        ratio = med(a / b for a, b in zip(on.rps, off.rps, strict=True))
        mode = on.name.split(",")[0]
        lines.append(f"| {mode} | {med(on.rps):,.0f} | {med(off.rps):,.0f} | {ratio:.2f} |")
    ratio = med(a / b for a, b in zip(big["on"], big["off"], strict=True))
    lines += [
        f"| {args.big_mb} MB body (MB/s) | {med(big['on']):.0f} | {med(big['off']):.0f} "
        f"| {ratio:.2f} |",
    ]
    lines += [
        "",
        "CPU time of the guard alone, in this process (steadier than wrk on a shared machine): "
        f"scanning {args.big_mb} MB in 64 KiB chunks takes **{cpu['plain_ms']:.0f} ms** "
        f"({args.big_mb / cpu['plain_ms'] * 1000:.0f} MB/s on one core), a gzip body of the "
        f"same size **{cpu['gzip_ms']:.0f} ms** (decoding is most of it); checking one "
        f"response's headers and a small JSON body costs **{cpu['small_us']:.1f} µs**.",
    ]
    print("\n".join(lines))


def scan_cost(megabytes: int) -> dict[str, float]:
    """Return the guard's own CPU time (medians of 5) with the bench config's secrets."""
    secrets = guarded_variants(
        ["Bearer bench-upstream-secret-placeholder", "bench-upstream-secret-placeholder"]
    )
    chunk = bytes(range(256)) * 256
    count = megabytes * MB // len(chunk)
    whole = gzip.compress(chunk * count, compresslevel=1)
    encoded = [whole[i : i + len(chunk)] for i in range(0, len(whole), len(chunk))]
    headers = [("Content-Type", "application/json"), ("X-Request-Id", "req-1")] * 5
    small = b'{"object": "list", "data": [{"id": "model-1"}]}'

    def timed(work) -> float:
        runs = []
        for _ in range(5):
            started = time.process_time()
            work()
            runs.append(time.process_time() - started)
        return statistics.median(runs)

    plain = timed(lambda: sum(map(len, scan_body(iter([chunk] * count), secrets, None))))
    gz = timed(lambda: sum(map(len, scan_body(iter(encoded), secrets, "gzip"))))

    def many_small() -> None:
        for _ in range(10_000):
            guard_headers(headers, secrets)
            for _piece in scan_body(iter([small]), secrets, None):
                pass

    return {"plain_ms": plain * 1000, "gzip_ms": gz * 1000, "small_us": timed(many_small) * 100}


if __name__ == "__main__":
    main()
