"""What spend control costs: the gateway with request, concurrency, token and cost limits.

    .venv/bin/python -m bench.limits [--runs 5] [--duration 5]

Starts the bench upstream and four gateways on it: no limits, limits in SQLite
(the embedded default), limits in Redis (if redis-server is installed), and a
cost budget alone in SQLite (prices looked up, money reserved and settled). wrk
sends LLM-shaped envelope calls (a ``model`` and ``max_tokens``, so every limit
applies), interleaved run by run. Then four processes hammer one SQLite store
directly to find the longest a single check waited. Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time

from . import __main__ as bench
from .__main__ import Bench, System, free_port, wait_for, wrk

LLM_ENVELOPE = (
    '{"method":"POST","path":"/chat/completions",'
    '"body":{"model":"bench-model","max_tokens":16,"messages":[]}}'
)
LIMITS = "    limits: {requests: [100000000/day], concurrent: 100000, tokens: [100000000000/day]}\n"
COST = (
    "    limits: {cost: [999999999/day]}\n"
    'prices: {"bench-*": {input: 0.15, output: 0.60}, "*": {input: 3, output: 15}}\n'
)


def _config(bench_run: Bench, name: str, storage: str | None, limited: bool) -> str:
    path = bench_run.tmp / f"config-{name}.yaml"
    text = bench_run.write_config(f"base-{name}.yaml", bench_run.upstream).read_text()
    if limited:
        text += COST if name == "cost" else LIMITS
    if storage:
        text += f"limits: {{storage: '{storage}'}}\n"
    path.write_text(text)
    return str(path)


def _hammer(path: str, count: int, out) -> None:
    from gateway.policy.limits import Ask, LimitSet, parse_rate
    from gateway.spend.store.sqlite import SQLiteStore

    store = SQLiteStore(path)
    limits = LimitSet((parse_rate("100000000/day"),), 100000, (parse_rate("100000000000/day"),))
    ask = Ask((("client:bench", limits),), 100)
    waits = []
    for _ in range(count):
        started = time.perf_counter()
        verdict = store.admit(ask)
        store.finish(verdict.ticket, 50)
        waits.append(time.perf_counter() - started)
    out.put(waits)


def check_waits(folder, processes: int = 4, count: int = 2000) -> list[float]:
    """Return every admit+settle time (s) while ``processes`` share one SQLite file."""
    path = str(folder / "hammer.sqlite3")
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_hammer, args=(path, count, out)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    waits = [w for _ in workers for w in out.get()]
    for worker in workers:
        worker.join()
    return sorted(waits)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()

    run = Bench(args)
    names = ["off", "sqlite", "cost"]
    redis = None
    if shutil.which("redis-server"):
        names.append("redis")
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        wait_for(redis_port)
    storages = {
        "off": f"sqlite:///{run.tmp}/limits-off.sqlite3",  # usage records only
        "sqlite": f"sqlite:///{run.tmp}/limits.sqlite3",
        "cost": f"sqlite:///{run.tmp}/limits-cost.sqlite3",
        "redis": f"redis://127.0.0.1:{redis_port}/0" if redis else None,
    }
    systems: dict[str, System] = {}
    bench.ENVELOPE = LLM_ENVELOPE  # wrk posts this envelope
    try:
        run.start("upstream", [sys.executable, "-m", "bench.upstream", str(run.ports["upstream"])])
        for name in names:
            run.ports[f"gw-{name}"] = free_port()
            config = _config(run, name, storages[name], name != "off")
            run.gunicorn(f"gw-{name}", "wsgi:app", env={"GATEWAY_CONFIG": config})
            url = f"http://127.0.0.1:{run.ports[f'gw-{name}']}/proxy"
            systems[name] = System(f"limits {name}", url, True)
        for system in systems.values():
            wrk(system, 32, 2)  # warm-up
        for i in range(args.runs):
            for system in systems.values():
                result = wrk(system, 32, args.duration)
                system.rps.append(result["rps"])
                system.p99_32.append(result["p99"])
                system.errors += result["errors"]
            print(f"  run {i + 1}/{args.runs} done", file=sys.stderr)
    finally:
        run.stop()
        if redis is not None:
            redis.terminate()
    waits = check_waits(run.tmp)

    med = statistics.median
    off = systems["off"]
    lines = [
        "## Spend control cost (issues 10 and 20)",
        "",
        f"`python -m bench.limits --runs {args.runs} --duration {args.duration}`: LLM-shaped "
        "envelope calls with request, concurrency and token limits all applying (set high, so "
        "none refuses), and with a cost budget alone (`limits cost`: a price looked up, money "
        "reserved and settled), against the same gateway with no limits; wrk at 32 connections, "
        "interleaved run by run; medians.",
        "",
        "| gateway | req/s | p99 ms | errors | vs no limits (median of per-run ratios) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for system in systems.values():
        ratio = med(a / b for a, b in zip(system.rps, off.rps, strict=True))
        lines.append(
            f"| {system.name} | {med(system.rps):,.0f} | {med(system.p99_32):.1f} | "
            f"{system.errors} | {ratio:.2f} |"
        )
    lines += [
        "",
        f"One check (admit, then settle) while 4 processes share one SQLite file, "
        f"{len(waits):,} checks: median **{waits[len(waits) // 2] * 1000:.2f} ms**, p99 "
        f"**{waits[int(len(waits) * 0.99)] * 1000:.2f} ms**, "
        f"longest **{waits[-1] * 1000:.1f} ms**. "
        "Under gevent that wait is spent in a thread of the worker's own: the worker's other "
        "requests go on meanwhile.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
