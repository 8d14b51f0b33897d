"""Spend control at the speed of forwarding (issue 23): its whole table from one command.

    .venv/bin/python -m bench.spend [--runs 5] [--duration 5] [--random-timing 1000]
                                    [--baseline CHECKOUT] [--cpu-only] [--calls 1000]

Starts the bench upstream, redis-server, the forwarding floor (``floor:forward``)
and three gateways on one upstream: no limits, limits in SQLite and limits in
Redis (request + concurrency + token limits, set high so none refuses); with
``--baseline``, also a gateway from another checkout with no limits. Every
gateway gets the LLM-shaped envelope (``model`` and ``max_tokens``); the one with
no limits also a transparent ``GET``. Run by run, in an order that alternates:

- wrk at 32 connections on every system, then at 1 connection (added latency over
  the direct upstream);
- ``--random-timing`` streams opened at random (``python -m bench``'s round),
  direct and through the gateway with no limits;
- the load average at each run's start, since the 2 cores are shared.

First, the steadier measure: in-process CPU time per call (``time.process_time``,
a gevent-patched process like a gunicorn worker, the Flask test client, the same
live upstream and stores), rounds of ``--calls`` calls, interleaved. Prints the
issue's table in Markdown, with the medians of the per-run ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import __main__ as bench
from .__main__ import ROOT, Bench, System, free_port, wait_for, wrk
from .limits import LIMITS, LLM_ENVELOPE

LLM_BODY = {"model": "bench-model", "max_tokens": 16, "messages": []}
VARIANTS = ("off", "sqlite", "redis")


def _gateway_config(run: Bench, name: str, storage: str, limited: bool) -> Path:
    path = run.tmp / f"config-{name}.yaml"
    text = run.write_config(f"base-{name}.yaml", run.upstream).read_text()
    if limited:
        text += LIMITS
    path.write_text(text + f"limits: {{storage: '{storage}'}}\n")
    return path


# --- in-process CPU per call -----------------------------------------------------------


def cpu_rounds(configs: dict[str, str], calls: int, rounds: int) -> dict[str, list[float]]:
    """Return µs of CPU per call, per round, for each gateway config (and the plain GET).

    Runs in a process of its own, gevent-patched as a gunicorn worker is, so the
    SQLite store hands its work to a thread exactly as it does when served.
    """
    from gateway import create_app

    apps = {
        name: create_app({"GATEWAY_CONFIG": path, "GATEWAY_ENVIRON": dict(os.environ)})
        for name, path in configs.items()
    }
    auth = {"Authorization": f"Bearer {bench.KEY}"}
    envelope = {"method": "POST", "path": "/chat/completions", "body": LLM_BODY}

    def llm(client) -> None:
        response = client.post("/proxy", json=envelope, headers=auth)
        assert response.status_code == 200, response.get_data()
        response.close()

    def get(client) -> None:
        response = client.get("/proxy/models", headers=auth)
        assert response.status_code == 200, response.get_data()
        response.close()

    cases = {f"{name} LLM": (app, llm) for name, app in apps.items()}
    cases["off GET"] = (apps["off"], get)
    clients = {case: app.test_client() for case, (app, _) in cases.items()}
    for case, (_, call) in cases.items():  # warm-up: pools, connections, caches
        for _ in range(100):
            call(clients[case])
    out: dict[str, list[float]] = {case: [] for case in cases}
    for i in range(rounds):
        order = list(cases) if i % 2 == 0 else list(cases)[::-1]
        for case in order:
            call, client = cases[case][1], clients[case]
            started = time.process_time()
            for _ in range(calls):
                call(client)
            out[case].append((time.process_time() - started) / calls * 1e6)
    return out


def _cpu_main(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    configs = json.loads(args.cpu_worker)
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink  # the access lines
        try:
            result = cpu_rounds(configs, args.calls, args.runs)
        finally:
            sys.stdout = stdout
    print(json.dumps(result))


# --- the run ---------------------------------------------------------------------------


def _stream_round(run: Bench, port: int, prefix: str, count: int, key: str) -> dict:
    through = bench.run_client("streams", port, prefix + bench.RANDOM_SSE, count, bench.SPREAD, key)
    delays = sorted(d * 1000 for stream in through for d in stream)
    return {
        "lost": sum(len(stream) != 20 for stream in through),
        "p99": bench._pct(delays, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spend", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--random-timing", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=1000, help="calls per CPU round")
    parser.add_argument("--baseline", type=Path, help="another checkout, with no limits")
    parser.add_argument("--cpu-only", action="store_true", help="only the in-process CPU")
    parser.add_argument("--cpu-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_worker:
        _cpu_main(args)
        return
    if not (shutil.which("wrk") and shutil.which("redis-server")):
        sys.exit("needs wrk and redis-server")

    run = Bench(args)
    run.started = {}
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    storages = {
        "off": f"sqlite:///{run.tmp}/off.sqlite3",  # usage rows only
        "sqlite": f"sqlite:///{run.tmp}/limits.sqlite3",
        "redis": f"redis://127.0.0.1:{redis_port}/0",
    }
    configs = {
        name: str(_gateway_config(run, name, storages[name], name != "off")) for name in VARIANTS
    }
    bench.ENVELOPE = LLM_ENVELOPE  # what wrk posts
    load: list[tuple[float, float, float]] = []
    try:
        wait_for(redis_port)
        run.started["upstream"] = run.start(
            "upstream", [sys.executable, "-m", "bench.upstream", str(run.ports["upstream"])]
        )
        print("in-process CPU per call...", file=sys.stderr)
        cpu_load = os.getloadavg()
        with tempfile.TemporaryDirectory() as metrics:
            cpu = json.loads(
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.spend",
                        "--cpu-worker",
                        json.dumps(configs),
                        "--calls",
                        str(args.calls),
                        "--runs",
                        str(args.runs),
                    ],
                    cwd=ROOT,
                    env={**run.env, "PROMETHEUS_MULTIPROC_DIR": metrics},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        cpu_load = (cpu_load, os.getloadavg())
        if args.cpu_only:
            print("\n".join(_cpu_lines(args, cpu, cpu_load)))
            return
        run.started["forward"] = run.gunicorn("forward", "bench.floors:forward_app")
        for name in VARIANTS:
            run.ports[name] = free_port()
            run.started[name] = run.gunicorn(name, "wsgi:app", {"GATEWAY_CONFIG": configs[name]})
        up = f"http://127.0.0.1:{run.ports['upstream']}"
        gw = {name: f"http://127.0.0.1:{run.ports[name]}" for name in VARIANTS}
        systems = {
            "floor": System(
                "floor:forward, LLM envelope",
                f"http://127.0.0.1:{run.ports['forward']}/proxy",
                True,
            ),
            "off": System("gateway, no limits, LLM envelope", gw["off"] + "/proxy", True),
            "off GET": System(
                "gateway, no limits, transparent GET", gw["off"] + "/proxy/models", False
            ),
            "sqlite": System("gateway, SQLite limits, LLM envelope", gw["sqlite"] + "/proxy", True),
            "redis": System("gateway, Redis limits, LLM envelope", gw["redis"] + "/proxy", True),
        }
        if args.baseline:
            run.ports["baseline"] = free_port()
            run.started["baseline"] = run.gunicorn(
                "baseline",
                "wsgi:app",
                {"GATEWAY_CONFIG": str(run.write_config("baseline.yaml", run.upstream))},
                cwd=args.baseline.resolve(),
            )
            base = f"http://127.0.0.1:{run.ports['baseline']}"
            systems["base"] = System(
                f"{args.baseline.name}, no limits, LLM envelope", base + "/proxy", True
            )
            systems["base GET"] = System(
                f"{args.baseline.name}, transparent GET", base + "/proxy/models", False
            )
        direct = System("upstream, direct", up + "/v1/models", False)
        at_one = [direct, *(s for k, s in systems.items() if "GET" not in k)]
        for system in systems.values():
            wrk(system, 32, 2)  # warm-up
        streams: dict[str, list[dict]] = {"direct": [], "gateway": []}
        for i in range(args.runs):
            load.append(os.getloadavg())
            flip = slice(None, None, -1 if i % 2 else 1)
            for system in list(systems.values())[flip]:
                result = wrk(system, 32, args.duration)
                system.rps.append(result["rps"])
                system.p99_32.append(result["p99"])
                system.errors += result["errors"]
            for system in at_one[flip]:
                result = wrk(system, 1, args.duration)
                system.p50_1.append(result["p50"])
                system.errors += result["errors"]
            if args.random_timing:
                count = args.random_timing
                streams["direct"].append(
                    _stream_round(run, run.ports["upstream"], "/v1", count, "-")
                )
                streams["gateway"].append(
                    _stream_round(run, run.ports["off"], "/proxy", count, bench.KEY)
                )
            print(f"  run {i + 1}/{args.runs} done, load {load[-1][0]:.1f}", file=sys.stderr)
        load.append(os.getloadavg())
    finally:
        run.stop()
        redis.terminate()
    print("\n".join(_report(args, systems, direct, streams, load, cpu, cpu_load)))


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _added(a: list[float], b: list[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b, strict=True))


def _cpu_lines(args, cpu: dict[str, list[float]], cpu_load) -> list[str]:
    med = statistics.median
    off = cpu["off LLM"]
    lines = [
        f"In-process CPU per call ({args.runs} rounds of {args.calls} calls, interleaved; "
        f"load average {cpu_load[0][0]:.1f} before, {cpu_load[1][0]:.1f} after):",
        "",
        "| call | µs per call, per round | median | vs no limits |",
        "| --- | --- | ---: | ---: |",
    ]
    for case, label in (
        ("off LLM", "LLM call, no limits"),
        ("off GET", "transparent GET, no limits"),
        ("sqlite LLM", "LLM call, SQLite limits"),
        ("redis LLM", "LLM call, Redis limits"),
    ):
        rounds = ", ".join(f"{v:,.0f}" for v in cpu[case])
        lines.append(
            f"| {label} | {rounds} | {med(cpu[case]):,.0f} | {_ratio(cpu[case], off):.2f} |"
        )
    return lines


def _report(args, systems, direct, streams, load, cpu, cpu_load) -> list[str]:
    med = statistics.median
    s = systems
    rows = [
        (
            "LLM call, no limits, vs the floor",
            f"**{_ratio(s['off'].rps, s['floor'].rps):.2f}×**",
            "≥ 0.8×",
        ),
    ]
    if "base" in s:
        rows += [
            (
                f"LLM call, no limits, vs {args.baseline.name}",
                f"{_ratio(s['off'].rps, s['base'].rps):.2f}×",
                "–",
            ),
            (
                f"plain `GET`, vs {args.baseline.name}",
                f"{_ratio(s['off GET'].rps, s['base GET'].rps):.2f}×",
                "–",
            ),
        ]
    rows += [
        ("plain `GET`, vs the floor", f"{_ratio(s['off GET'].rps, s['floor'].rps):.2f}×", "–"),
        (
            "LLM call, SQLite limits, vs no limits",
            f"**{_ratio(s['sqlite'].rps, s['off'].rps):.2f}×** (wrk errors {s['sqlite'].errors})",
            "≥ 0.85×, no timeouts",
        ),
        (
            "LLM call, Redis limits, vs no limits",
            f"**{_ratio(s['redis'].rps, s['off'].rps):.2f}×** (wrk errors {s['redis'].errors})",
            "≥ 0.9×",
        ),
    ]
    for key, label, goal in (
        ("floor", "floor:forward", "–"),
        ("off", "no limits", "≤ 1.1 ms"),
        ("sqlite", "SQLite limits", "≤ no limits + 0.3 ms"),
        ("redis", "Redis limits", "≤ no limits + 0.3 ms"),
    ):
        rows.append(
            (
                f"added latency at 1 connection, {label}",
                f"{_added(s[key].p50_1, direct.p50_1):.2f} ms",
                goal,
            )
        )
    if args.random_timing:
        lost = [r["lost"] for r in streams["gateway"]]
        added = _added(
            [r["p99"] for r in streams["gateway"]], [r["p99"] for r in streams["direct"]]
        )
        rows.append(
            (
                f"{args.random_timing} random-timing streams: lost per round; added p99",
                f"{', '.join(map(str, lost))}; {added:.0f} ms",
                "0 lost, ≤ 50 ms",
            )
        )
    lines = [
        f"`python -m bench.spend --runs {args.runs} --duration {args.duration}"
        f"{f' --baseline {args.baseline}' if args.baseline else ''}`; load average (1 min) at "
        "each run's start and at the end: " + ", ".join(f"{one:.1f}" for one, _, _ in load) + ".",
        "",
        "| call | today | goal |",
        "| --- | ---: | ---: |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "| system | req/s at 32 conn, per run | median | p99 ms at 32 | p50 ms at 1 | wrk errors |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for system in [direct, *systems.values()]:
        per_run = ", ".join(f"{v:,.0f}" for v in system.rps) or "–"
        lines.append(
            f"| {system.name} | {per_run} | {med(system.rps) if system.rps else 0:,.0f} | "
            f"{med(system.p99_32) if system.p99_32 else 0:.1f} | {med(system.p50_1):.2f} | "
            f"{system.errors} |"
        )
    if args.random_timing:
        lines += [
            "",
            "Random-timing streams, per round: p99 ms direct "
            + ", ".join(f"{r['p99']:.0f}" for r in streams["direct"])
            + "; through the gateway "
            + ", ".join(f"{r['p99']:.0f}" for r in streams["gateway"])
            + ".",
        ]
    return [*lines, "", *_cpu_lines(args, cpu, cpu_load)]


if __name__ == "__main__":
    main()
