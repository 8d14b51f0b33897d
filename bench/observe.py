"""What the access log and the metrics cost: the gateway with them on and off, side by side.

    .venv/bin/python -m bench.observe [--runs 5] [--duration 5]

Starts the bench upstream and two gateways: the shipped one (JSON access log on
stdout, to a file here; metrics in multiprocess mode) and the same app with its
log and metrics observers removed (``bench.observe:quiet_app``). Measures them
interleaved with wrk, then the CPU time of one access line and one metrics
update in a process of its own, and prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .__main__ import ROOT, Bench, System, free_port, wrk


def quiet_app():
    """Return the gateway app with no access log and no metrics (the Record stays)."""
    from gateway import create_app

    app = create_app()
    observers = app.extensions["gateway.observers"]
    observers.forwarding.clear()
    observers.finished.clear()
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.observe", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu:
        print(json.dumps(cpu_cost()))
        return

    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "bench.observe", "--cpu"],
            cwd=ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    cpu = json.loads(out)
    bench = Bench(args)
    bench.ports["gateway_off"] = free_port()
    try:
        bench.start(
            "upstream", [sys.executable, "-m", "bench.upstream", str(bench.ports["upstream"])]
        )
        bench.gunicorn("gateway", "wsgi:app")
        bench.gunicorn("gateway_off", "bench.observe:quiet_app()")
        systems = {}
        for label, port in (("on", bench.ports["gateway"]), ("off", bench.ports["gateway_off"])):
            url = f"http://127.0.0.1:{port}"
            systems[label] = [
                System(f"envelope, {label}", url + "/proxy", True),
                System(f"transparent, {label}", url + "/proxy/models", False),
            ]
        for system in [*systems["on"], *systems["off"]]:
            wrk(system, 32, 2)  # warm-up
        for run in range(args.runs):
            for on, off in zip(systems["on"], systems["off"], strict=True):
                # Alternate which goes first, so neither always meets a warmer machine.
                for system in (on, off) if run % 2 == 0 else (off, on):
                    system.rps.append(wrk(system, 32, args.duration)["rps"])
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr)
        lines_written = sum(1 for _ in open(bench.tmp / "gateway.log", errors="replace"))
    finally:
        bench.stop()

    med = statistics.median
    lines = [
        "## Access log and metrics cost",
        "",
        f"`python -m bench.observe --runs {args.runs} --duration {args.duration}`: the shipped "
        "gateway (a JSON access line per request on stdout, here a file; metrics in "
        "multiprocess mode) against the same app with its access log and metrics observers "
        "removed, interleaved run by run; wrk at 32 connections; medians "
        f"({lines_written:,} access lines written).",
        "",
        "| mode | log + metrics on req/s | both off req/s | on / off (median of per-run ratios) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for on, off in zip(systems["on"], systems["off"], strict=True):
        ratio = med(a / b for a, b in zip(on.rps, off.rps, strict=True))
        mode = on.name.split(",")[0]
        lines.append(f"| {mode} | {med(on.rps):,.0f} | {med(off.rps):,.0f} | {ratio:.2f} |")
    lines += [
        "",
        "CPU time in one process, medians of 5 rounds of 20,000 requests (steadier than wrk "
        "on a shared machine): the access line (built and written) and the metrics update "
        f"(multiprocess files) cost **{cpu['observers_us']:.1f} µs** per request, of which "
        f"the JSON line is {cpu['log_us']:.1f} µs and the metrics {cpu['metrics_us']:.1f} µs; "
        f"opening and closing the record with its request id costs {cpu['record_us']:.1f} µs.",
    ]
    print("\n".join(lines))


def cpu_cost() -> dict[str, float]:
    """Return the per-request CPU time of the record, the access line and the metrics."""
    from prometheus_client import CollectorRegistry

    from gateway.observe import access_log
    from gateway.observe.metrics import Metrics
    from gateway.observe.record import Observers, Record, request_id

    metrics = Metrics(CollectorRegistry())
    count = 20_000

    def run(observers: Observers) -> float:
        rounds = []
        for _ in range(5):
            started = time.process_time()
            for _ in range(count):
                record = Record(request_id(None), "127.0.0.1", "GET", observers)
                record.client, record.path, record.status = "client#1", "/models", 200
                record.forwarding("bench")
                record.upstream_answered(200, "req-123")
                record.bytes_out = 1234
                record.finish()
            rounds.append((time.process_time() - started) / count * 1e6)
        return statistics.median(rounds)

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        bare = run(Observers())
        log = run(Observers(finished=[access_log._write_json]))
        both = run(
            Observers(
                forwarding=[metrics.forwarding],
                finished=[access_log._write_json, metrics.finished],
            )
        )
    return {
        "record_us": bare,
        "log_us": log - bare,
        "metrics_us": both - log,
        "observers_us": both - bare,
    }


if __name__ == "__main__":
    main()
