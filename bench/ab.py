"""Compare this checkout's gateway with another checkout's, interleaved, on one upstream.

    .venv/bin/python -m bench.ab OTHER_CHECKOUT [--runs 5] [--duration 8] [--random-timing 1000]

Envelope throughput at 32 connections (wrk), and the random-timing stream round
of ``python -m bench``, run by run, alternating the two gateways, so both see the
same load on a shared machine. Prints medians and the per-run throughput ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from .__main__ import Bench, System, free_port, wrk


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("other", type=Path, help="a checkout of the gateway to compare with")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--random-timing", type=int, default=1000)
    args = parser.parse_args()
    bench = Bench(args)
    bench.ports["other"] = free_port()
    names = {"gateway": "this checkout", "other": f"{args.other}"}
    systems = {
        name: System(label, f"http://127.0.0.1:{bench.ports[name]}/proxy", True)
        for name, label in names.items()
    }
    streams: dict[str, list[dict]] = {name: [] for name in names}
    bench.started = {}
    try:
        bench.started["upstream"] = bench.start(
            "upstream", [sys.executable, "-m", "bench.upstream", str(bench.ports["upstream"])]
        )
        bench.started["gateway"] = bench.gunicorn("gateway", "wsgi:app")
        bench.started["other"] = bench.gunicorn("other", "wsgi:app", cwd=args.other.resolve())
        for system in systems.values():
            wrk(system, 32, 2)  # warm-up
        for run in range(args.runs):
            # Alternate which gateway goes first, so a trend in the machine's load favours neither.
            for system in list(systems.values())[:: -1 if run % 2 else 1]:
                result = wrk(system, 32, args.duration)
                system.rps.append(result["rps"])
                system.errors += result["errors"]
            if args.random_timing:
                for name in names:
                    streams[name].append(bench.random_stream_run(args.random_timing, name))
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        bench.stop()
    mine, other = systems["gateway"], systems["other"]
    ratios = [a / b for a, b in zip(mine.rps, other.rps, strict=True)]
    print("| gateway | req/s at 32 conn, per run | median | wrk errors |")
    print("| --- | --- | ---: | ---: |")
    for system in (mine, other):
        runs = ", ".join(f"{rps:,.0f}" for rps in system.rps)
        print(
            f"| {system.name} | {runs} | {statistics.median(system.rps):,.0f} | {system.errors} |"
        )
    print(f"\nthis / other, per run: {', '.join(f'{r:.2f}' for r in ratios)}; ", end="")
    print(f"median {statistics.median(ratios):.2f}")
    if args.random_timing:
        print("\n| gateway | whole streams, per round | events delivered | sent again |")
        print("| --- | --- | --- | --- |")
        for name, label in names.items():
            rounds = streams[name]
            whole = ", ".join(f"{r['whole']}/{r['streams']}" for r in rounds)
            events = ", ".join(str(r["delivered"]) for r in rounds)
            again = ", ".join(str(r["retried"]) for r in rounds)
            print(f"| {label} | {whole} | {events} | {again} |")


if __name__ == "__main__":
    main()
