"""What the egress guard costs: the gateway with it on and off, side by side.

    .venv/bin/python -m bench.guard [--runs 5] [--duration 5] [--big-mb 100]
    .venv/bin/python -m bench.guard --baseline REF [--cpu-only] [--runs 9]

Starts the bench upstream and two gateways (``egressGuard`` on, the default, and
off), measures them interleaved with wrk (both modes) and with one 100 MB body
each, and prints a Markdown section for BENCHMARKS.md.

``--baseline REF`` also times the guard's own CPU work per answer against the
guard as it was at git ``REF`` (its egress module loaded from that commit), run
by run interleaved, on a small JSON answer, 1 MB bodies and a stream of small
chunks; ``--cpu-only`` skips the gateways and wrk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable

from gateway.policy import egress
from gateway.policy.egress import guard_headers, guarded_variants, scan_body

from .__main__ import MB, Bench, System, free_port, run_client, wrk

KEY = "ck-bench-client-key"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--baseline", metavar="REF", help="compare the guard's CPU time with REF")
    parser.add_argument("--cpu-only", action="store_true", help="skip the gateways and wrk")
    args = parser.parse_args()

    if args.baseline:
        print(compare(baseline_egress(args.baseline), args.baseline, args.runs))
    if args.cpu_only:
        return
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


SECRETS = ["Bearer bench-upstream-secret-placeholder", "bench-upstream-secret-placeholder"]


def baseline_egress(ref: str) -> types.ModuleType:
    """Return the egress module as it was at git ``ref`` (it imports only the stdlib and,
    since the secret forms moved beside it, ``secret_forms``)."""
    package = f"egress_at_{ref}"
    sys.modules[package] = types.ModuleType(package)
    sys.modules[package].__path__ = []
    for path in ("gateway/policy/secret_forms.py", "gateway/policy/egress.py", "gateway/egress.py"):
        shown = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True)
        if shown.returncode != 0:
            continue
        name = path.rsplit("/", 1)[1].removesuffix(".py")
        module = types.ModuleType(f"{package}.{name}")
        module.__package__ = package
        sys.modules[module.__name__] = module
        exec(compile(shown.stdout, f"{ref}:{path}", "exec"), module.__dict__)
        if name == "egress":
            return module
    raise SystemExit(f"{ref}: no gateway/policy/egress.py or gateway/egress.py there")


def answers(guard: types.ModuleType) -> dict[str, tuple[Callable[[], object], int]]:
    """Return the guard's whole work on one answer of each kind, and how often to repeat it."""
    secrets = guard.guarded_variants(SECRETS)
    headers = [("Content-Type", "application/json"), ("X-Request-Id", "req-1")] * 5
    small = b'{"object": "list", "data": [{"id": "model-1"}]}'
    binary = [bytes(range(256)) * 256] * 16  # every byte value: % and \\ each 1 in 256
    text = 'Line one\nline two with "quotes", a path /a/b and 50%25 off. ' * 1200
    escaped = json.dumps({"content": text}).encode()  # a \\ every 25 bytes
    escaped = [escaped[i : i + 65536] for i in range(0, MB, 65536)]
    prose = [(b"The quick brown fox jumps over the lazy dog. " * 1500)[:65536]] * 16
    event = b'data: {"choices":[{"delta":{"content":"hello wor"}}]}\n\n'
    stream = [event] * 1000

    def answer(chunks: list[bytes]) -> Callable[[], object]:
        def work() -> None:
            guard.guard_headers(headers, secrets)
            for _piece in guard.scan_body(iter(chunks), secrets, None):
                pass

        return work

    return {
        "small JSON answer (10 headers, 47-byte body)": (answer([small]), 20_000),
        "1 MB text without % or \\, 64 KiB chunks": (answer(prose), 20),
        "1 MB binary body, 64 KiB chunks": (answer(binary), 20),
        "1 MB JSON text with escapes, 64 KiB chunks": (answer(escaped), 20),
        "stream of 1,000 SSE chunks (58 bytes each)": (answer(stream), 20),
    }


def compare(baseline: types.ModuleType, ref: str, runs: int) -> str:
    """Time each answer with the baseline guard and this one, interleaved; a Markdown table."""
    before, after = answers(baseline), answers(egress)
    times: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name in after}
    for _ in range(runs):
        for name in after:
            for label, guard in (("before", before), ("after", after)):
                work, repeat = guard[name]
                started = time.process_time()
                for _ in range(repeat):
                    work()
                times[name][label].append((time.process_time() - started) / repeat * 1e6)
    med = statistics.median
    lines = [
        f"The guard's CPU time per answer, at `{ref}` (before) and now (after): "
        f"`python -m bench.guard --baseline {ref} --cpu-only --runs {runs}`, "
        "interleaved run by run; medians.",
        "",
        "| answer | before µs | after µs | after / before (median of per-run ratios) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, spent in times.items():
        ratio = med(a / b for a, b in zip(spent["after"], spent["before"], strict=True))
        lines.append(
            f"| {name} | {med(spent['before']):,.1f} | {med(spent['after']):,.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
