"""Spend control at the speed of forwarding (issue 23): its whole table from one command.

    .venv/bin/python -m bench.spend [--runs 5] [--duration 5] [--random-timing 1000]
        [--baseline CHECKOUT ...] [--cpu-baseline CHECKOUT] [--cpu-only] [--calls 1000]

Starts the bench upstream, redis-server, the forwarding floor (``floor:forward``)
and three gateways on one upstream: no limits, limits in SQLite and limits in
Redis (request + concurrency + token limits, set high so none refuses); with
each ``--baseline``, also a gateway from that checkout with no limits. Every
gateway gets the LLM-shaped envelope (``model`` and ``max_tokens``); the one with
no limits also a transparent ``GET``. Run by run, in an order that alternates:

- wrk at 32 connections on every system, then at 1 connection (added latency over
  the direct upstream);
- ``--random-timing`` streams opened at random (``python -m bench``'s round),
  direct and through the gateway with no limits;
- the load average at each run's start, since the 2 cores are shared.

First, the steadier measure: in-process CPU time per call (``time.process_time``,
a gevent-patched process like a gunicorn worker, the Flask test client, the same
live upstream and stores), rounds of ``--calls`` calls, alternating with
``--cpu-baseline``'s checkout; then each store step beside its alternatives (no
thread hand-off, a batch, a pipeline). Prints the issue's table in Markdown, with
the medians of the per-run ratios, and keeps the raw figures in ``raw.json``.
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
import uuid
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
        name: create_app({"GATEWAY_CONFIG": configs[name], "GATEWAY_ENVIRON": dict(os.environ)})
        for name in VARIANTS
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
    job = json.loads(args.cpu_worker)
    sys.path.insert(0, job["root"])  # the checkout whose gateway is measured
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink  # the access lines
        try:
            if job.get("stores"):
                result = store_costs(job["folder"], job["redis"], args.calls, args.runs)
            else:
                result = cpu_rounds(job["configs"], args.calls, args.runs)
        finally:
            sys.stdout = stdout
    print(json.dumps(result))


# --- what each store-side direction would save ------------------------------------------


def store_costs(folder: str, redis_url: str, count: int, rounds: int) -> dict[str, list[float]]:
    """Return µs of CPU per operation, per round: the stores' steps and their alternatives.

    Gevent-patched, as a worker is. Times an SQLite transaction in place and handed
    to the worker's thread, usage rows recorded and written in batches, and Redis's
    round trips beside one pipeline.
    """
    from gevent.threadpool import ThreadPool

    from gateway.policy.limits import Ask, LimitSet, parse_rate
    from gateway.spend.store.base import UsageRow
    from gateway.spend.store.redis import RedisStore
    from gateway.spend.store.sqlite import SQLiteStore

    limits = LimitSet((parse_rate("100000000/day"),), 100000, (parse_rate("100000000000/day"),))
    ask = Ask((("client:bench", limits),), 100)
    row = UsageRow(time.time(), "bench", "bench-model", 10, 20, 200, None)
    sqlite = SQLiteStore(f"{folder}/costs.sqlite3")
    db, pool, quick = sqlite._connection()
    threaded = SQLiteStore(f"{folder}/costs.sqlite3")
    threaded._connection()
    threaded._local = (os.getpid(), db, pool, None)  # every transaction handed to the thread
    redis = RedisStore(redis_url)
    client = redis._redis()["client"]
    empty = ThreadPool(1)

    def limited(store) -> None:
        verdict = store.admit(ask)
        store.finish(verdict.ticket, 50, row)

    def pipelined() -> None:
        with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.ping()
            pipe.execute()

    steps = {
        "thread hand-off (an empty call)": (lambda: empty.apply(lambda: None), 1),
        "usage row: recorded (the request's share)": (lambda: sqlite.record(row), 1),
        "SQLite: usage rows written, per row in a batch of 100": (
            lambda: sqlite._write_usage([row] * 100, False, uuid.uuid4().hex),
            100,
        ),
        "Redis: usage rows written, per row in a batch of 100": (
            lambda: redis._write_usage([row] * 100, False, uuid.uuid4().hex),
            100,
        ),
        "SQLite: admit + settle, in place (lock free)": (lambda: limited(sqlite), 1),
        "SQLite: admit + settle, in the thread": (lambda: limited(threaded), 1),
        "Redis: admit + settle (2 round trips)": (lambda: limited(redis), 1),
        "Redis: one round trip (PING)": (client.ping, 1),
        "Redis: two commands in one pipeline": (pipelined, 1),
    }
    for step, _ in steps.values():  # warm-up
        step()
    out: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            step, per = steps[name]
            times = max(count // per, 1)
            started = time.process_time()
            for _ in range(times):
                step()
            out[name].append((time.process_time() - started) / (times * per) * 1e6)
    return out


# --- the run ---------------------------------------------------------------------------


def _stream_round(port: int, prefix: str, count: int, key: str) -> dict:
    through = bench.run_client("streams", port, prefix + bench.RANDOM_SSE, count, bench.SPREAD, key)
    delays = sorted(d * 1000 for stream in through for d in stream)
    return {
        "lost": sum(len(stream) != 20 for stream in through),
        "p99": bench._pct(delays, 99),
    }


def _worker(job: dict, args: argparse.Namespace, run: Bench, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as metrics:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.spend",
                "--cpu-worker",
                json.dumps(job),
                "--calls",
                str(args.calls),
                "--runs",
                str(rounds),
            ],
            cwd=ROOT,
            env={**run.env, "PROMETHEUS_MULTIPROC_DIR": metrics},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return json.loads(out)


def _cpu(args: argparse.Namespace, configs: dict[str, str], run: Bench, redis: str) -> dict:
    """Return CPU per call by round (alternating with ``--cpu-baseline``) and store step costs."""
    roots = {"this": ROOT}
    if args.cpu_baseline:
        roots["base"] = args.cpu_baseline.resolve()
    calls: dict[str, dict[str, list[float]]] = {name: {} for name in roots}
    for i in range(args.runs):
        for name in list(roots) if i % 2 == 0 else list(roots)[::-1]:
            job = {"root": str(roots[name]), "configs": configs}
            for case, rounds in _worker(job, args, run, 1).items():
                calls[name].setdefault(case, []).extend(rounds)
    job = {"root": str(ROOT), "stores": True, "folder": str(run.tmp), "redis": redis}
    return {**calls, "stores": _worker(job, args, run, args.runs)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spend", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--random-timing", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=1000, help="calls per CPU round")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="another checkout to run with no limits (repeatable)",
    )
    parser.add_argument(
        "--cpu-baseline", type=Path, help="another checkout to measure CPU per call against"
    )
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
        cpu = _cpu(args, configs, run, storages["redis"])
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
        for i, checkout in enumerate(args.baseline):
            name = f"base{i}"
            run.ports[name] = free_port()
            run.started[name] = run.gunicorn(
                name,
                "wsgi:app",
                {"GATEWAY_CONFIG": str(run.write_config(f"{name}.yaml", run.upstream))},
                cwd=checkout.resolve(),
            )
            url = f"http://127.0.0.1:{run.ports[name]}"
            label = f"{checkout.name} (no limits)"
            systems[name] = System(f"{label}, LLM envelope", url + "/proxy", True)
            systems[f"{name} GET"] = System(
                f"{label}, transparent GET", url + "/proxy/models", False
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
                streams["direct"].append(_stream_round(run.ports["upstream"], "/v1", count, "-"))
                streams["gateway"].append(
                    _stream_round(run.ports["off"], "/proxy", count, bench.KEY)
                )
            print(f"  run {i + 1}/{args.runs} done, load {load[-1][0]:.1f}", file=sys.stderr)
        load.append(os.getloadavg())
    finally:
        run.stop()
        redis.terminate()
    raw = run.tmp / "raw.json"
    raw.write_text(
        json.dumps(
            {
                "systems": {k: v.__dict__ for k, v in {"direct": direct, **systems}.items()},
                "streams": streams,
                "load": load,
                "cpu": cpu,
                "cpu_load": cpu_load,
            }
        )
    )
    print(f"raw figures: {raw}", file=sys.stderr)
    print("\n".join(_report(args, systems, direct, streams, load, cpu, cpu_load)))


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _added(a: list[float], b: list[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b, strict=True))


_CASES = (
    ("off LLM", "LLM call, no limits"),
    ("off GET", "transparent GET, no limits"),
    ("sqlite LLM", "LLM call, SQLite limits"),
    ("redis LLM", "LLM call, Redis limits"),
)


def _cpu_lines(args, measured: dict, cpu_load) -> list[str]:
    med = statistics.median
    cpu, base = measured["this"], measured.get("base")
    lines = [
        f"In-process CPU per call ({args.runs} rounds of {args.calls} calls"
        + (f", alternating with {args.cpu_baseline}" if base else "")
        + f"; load average {cpu_load[0][0]:.1f} before, {cpu_load[1][0]:.1f} after):",
        "",
        "| call | µs per call, per round | median | vs no limits |"
        + (" baseline µs | this / baseline |" if base else ""),
        "| --- | --- | ---: | ---: |" + (" ---: | ---: |" if base else ""),
    ]
    for case, label in _CASES:
        rounds = ", ".join(f"{v:,.0f}" for v in cpu[case])
        line = (
            f"| {label} | {rounds} | {med(cpu[case]):,.0f} | "
            f"{_ratio(cpu[case], cpu['off LLM']):.2f} |"
        )
        if base:
            line += f" {med(base[case]):,.0f} | {_ratio(cpu[case], base[case]):.2f} |"
        lines.append(line)
    lines += [
        "",
        "What the stores' steps cost, and their alternatives (one process, rounds interleaved):",
        "",
        "| step | µs of CPU per operation (per call for admit + settle), per round | median |",
        "| --- | --- | ---: |",
    ]
    for name, rounds in measured["stores"].items():
        per_round = ", ".join(f"{v:,.1f}" for v in rounds)
        lines.append(f"| {name} | {per_round} | {med(rounds):,.1f} |")
    return lines


def _report(args, systems, direct, streams, load, cpu, cpu_load) -> list[str]:
    med = statistics.median
    s = systems
    rows = [
        (
            "LLM call, no limits, vs the floor",
            f"**{_ratio(s['off'].rps, s['floor'].rps):.2f}×**",
            "≥ 0.8×",
        )
    ]
    for i, checkout in enumerate(args.baseline):
        base = f"base{i}"
        rows += [
            (
                f"LLM call, no limits, vs {checkout.name}",
                f"{_ratio(s['off'].rps, s[base].rps):.2f}×",
                "–",
            ),
            (
                f"plain `GET`, vs {checkout.name}",
                f"{_ratio(s['off GET'].rps, s[base + ' GET'].rps):.2f}×",
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
    added_off = _added(s["off"].p50_1, direct.p50_1)
    rows.append(("added latency at 1 connection, no limits", f"{added_off:.2f} ms", "≤ 1.1 ms"))
    for key, label in (("sqlite", "SQLite"), ("redis", "Redis")):
        added = _added(s[key].p50_1, direct.p50_1)
        rows.append(
            (
                f"added latency at 1 connection, {label} limits",
                f"{added:.2f} ms ({added - added_off:+.2f})",
                "≤ no limits + 0.3 ms",
            )
        )
    added_floor = _added(s["floor"].p50_1, direct.p50_1)
    rows.append(("added latency at 1 connection, floor:forward", f"{added_floor:.2f} ms", "–"))
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
    command = " ".join(["python -m bench.spend", *sys.argv[1:]])
    lines = [
        f"`{command}`; load average (1 min) at each run's start and at the end: "
        + ", ".join(f"{one:.1f}" for one, _, _ in load)
        + ".",
        "",
        "| call | today | goal |",
        "| --- | ---: | ---: |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "| system | req/s at 32 conn, per run | median | p99 ms at 32 | p50 ms at 1 | wrk errors |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def fig(values: list[float], form: str) -> str:
        return format(med(values), form) if values else "–"

    for system in [direct, *systems.values()]:
        per_run = ", ".join(f"{v:,.0f}" for v in system.rps) or "–"
        lines.append(
            f"| {system.name} | {per_run} | {fig(system.rps, ',.0f')} | "
            f"{fig(system.p99_32, '.1f')} | {fig(system.p50_1, '.2f')} | {system.errors} |"
        )
    if args.random_timing:
        lines += [
            "",
            "Random-timing streams, p99 ms per round: direct "
            + ", ".join(f"{r['p99']:.0f}" for r in streams["direct"])
            + "; through the gateway without limits "
            + ", ".join(f"{r['p99']:.0f}" for r in streams["gateway"])
            + ".",
        ]
    return [*lines, "", *_cpu_lines(args, cpu, cpu_load)]


if __name__ == "__main__":
    main()
