"""Where limit counters live: one small interface, an embedded SQLite store and Redis.

Each check is one atomic step (an SQLite ``BEGIN IMMEDIATE`` transaction, or one
Redis Lua script): every limit is read, and either all are counted or none, so
N+k calls at once against a limit of N admit exactly N, whatever the number of
workers, processes or hosts. No rule here knows which store it talks to.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .limits import Ask, Quota, Ticket, Verdict, counter_key

__all__ = ["LEASE_SECONDS", "StoreUnavailable", "UsageRow", "init_app", "open_store"]

log = logging.getLogger(__name__)

# A concurrency slot is a lease: its holder renews it while the call goes on, so a
# slot held by a worker that was killed frees itself within the worker timeout
# (gunicorn.conf.py reads the same variable).
LEASE_SECONDS = float(os.environ.get("GATEWAY_WORKER_TIMEOUT", 30))


class StoreUnavailable(Exception):
    """The limit store cannot be reached or used right now."""


@dataclass(frozen=True)
class UsageRow:
    """One LLM call's usage, for ``flask usage``."""

    time: float
    client: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    status: int


@dataclass(frozen=True)
class _Plan:
    """An Ask turned into store keys for ``now``."""

    requests: list[tuple[str, int, int, bool]]  # key, limit, window end, client scope?
    slots: list[tuple[str, int]]  # key, limit
    tokens: list[tuple[str, int, int]]  # key, budget, window end
    reservation: int
    dry: bool = False  # check only


def _plan(ask: Ask, now: float, dry: bool = False) -> _Plan:
    requests, slots, tokens = [], [], []
    for scope, limits in ask.scopes:
        for rate in limits.requests:
            key, end = counter_key("req", scope, rate, now)
            requests.append((key, rate.count, end, scope.startswith("client:")))
        if limits.concurrent:
            slots.append((f"conc:{scope}", limits.concurrent))
        for rate in limits.tokens:
            key, end = counter_key("tok", scope, rate, now)
            tokens.append((key, rate.count, end))
    return _Plan(requests, slots, tokens, ask.reservation, dry)


def _verdict(plan: _Plan, now: float, used: list[int], failed: str | None, index: int) -> Verdict:
    """Build the answer from the request counters' values before this call."""
    quotas = []
    for (_, limit, end, client), count in zip(plan.requests, used, strict=False):
        if client:
            after = count if failed else count + 1
            quotas.append(Quota(limit, limit - after, end - now))
    if failed is None:
        return Verdict(True, quotas=quotas)
    if failed == "rate_limited":
        retry = plan.requests[index][2] - now
    elif failed == "quota_exhausted":
        retry = plan.tokens[index][2] - now
    else:
        retry = 1.0
    return Verdict(False, code=failed, retry_after=retry, quotas=quotas)


class _Leases:
    """Renews the concurrency slots this process holds, in a background thread."""

    def __init__(self, renew: Callable[[list[tuple[str, str]]], None]) -> None:
        self._renew = renew
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def hold(self, ticket: Ticket) -> None:
        with self._lock:
            self._held[ticket.id] = ticket.slots
            if self._pid != os.getpid():  # a thread of its own in each worker, after fork
                self._pid = os.getpid()
                threading.Thread(target=self._run, daemon=True, name="gateway-leases").start()

    def drop(self, ticket: Ticket) -> None:
        with self._lock:
            self._held.pop(ticket.id, None)

    def _run(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 3)
            with self._lock:
                held = [(key, tid) for tid, keys in self._held.items() for key in keys]
            if held:
                try:
                    self._renew(held)
                except StoreUnavailable:
                    log.warning("could not renew %d concurrency slots", len(held))


class Store:
    """The interface both stores implement."""

    def __init__(self) -> None:
        self.leases = _Leases(self._renew)

    def admit(self, ask: Ask, now: float | None = None, *, dry: bool = False) -> Verdict:
        """Check and count ``ask`` atomically; the Verdict carries a ticket if admitted.

        ``dry`` answers whether it would be admitted now, counting nothing.
        """
        now = time.time() if now is None else now
        plan = _plan(ask, now, dry)
        ticket = Ticket(uuid.uuid4().hex)
        verdict = self._admit(plan, ticket.id, now)
        if verdict.admitted and not dry:
            ticket.slots = [key for key, _ in plan.slots]
            ticket.reservations = [(key, plan.reservation) for key, _, _ in plan.tokens]
            verdict.ticket = ticket
            if ticket.slots:
                self.leases.hold(ticket)
        return verdict

    def finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None = None) -> None:
        """Free the ticket's slots; replace its reservations by ``tokens`` (None: spent).

        ``usage``, if given, is recorded in the same step.
        """
        if ticket.done:
            return
        ticket.done = True
        self.leases.drop(ticket)
        if ticket.slots or ticket.reservations:
            self._finish(ticket, tokens, usage)
        elif usage is not None:
            self.record(usage)

    def record(self, row: UsageRow) -> None:
        raise NotImplementedError

    def usage(self, since: float) -> list[UsageRow]:
        raise NotImplementedError

    def _admit(self, plan: _Plan, ticket: str, now: float) -> Verdict:
        raise NotImplementedError

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        raise NotImplementedError

    def _renew(self, held: list[tuple[str, str]]) -> None:
        raise NotImplementedError


# --- SQLite: the embedded default --------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, ends REAL NOT NULL, used INTEGER NOT NULL, reserved INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    key TEXT NOT NULL, ticket TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, ticket)
);
CREATE TABLE IF NOT EXISTS usage (
    time REAL NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER, output_tokens INTEGER, status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_time ON usage (time);
"""


class SQLiteStore(Store):
    """Counters in one SQLite file, shared by every worker and process that opens it.

    Under gevent, each call runs in a thread of its own (one per worker), so a
    worker waiting for the file lock goes on serving its other requests.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._local: tuple[int, sqlite3.Connection, Any] | None = None
        self._lock = threading.Lock()
        self._calls = 0

    def _connection(self) -> tuple[sqlite3.Connection, Any]:
        if self._local is None or self._local[0] != os.getpid():
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._local = (os.getpid(), db, _worker_thread())
        return self._local[1], self._local[2]

    def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            db, pool = self._connection()
            if pool is not None:
                return pool.apply(work, (db,))
            with self._lock:
                return work(db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {type(exc).__name__}") from None

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` holding the file's write lock: every process waits its turn."""

        def locked(db: sqlite3.Connection) -> Any:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return self._run(locked)

    def _admit(self, plan: _Plan, ticket: str, now: float) -> Verdict:
        self._calls += 1
        if self._calls % 1000 == 0:  # forget windows that ended a day ago
            self._run(lambda db: db.execute("DELETE FROM counters WHERE ends < ?", (now - 86400,)))
        return self._transaction(lambda db: self._admit_locked(db, plan, ticket, now))

    @staticmethod
    def _admit_locked(db: sqlite3.Connection, plan: _Plan, ticket: str, now: float) -> Verdict:
        def counter(key: str) -> tuple[int, int]:
            row = db.execute("SELECT used, reserved FROM counters WHERE key = ?", (key,)).fetchone()
            return row or (0, 0)

        used = [counter(key)[0] for key, _, _, _ in plan.requests]
        for i, ((_, limit, _, _), count) in enumerate(zip(plan.requests, used, strict=True)):
            if count + 1 > limit:
                return _verdict(plan, now, used, "rate_limited", i)
        for i, (key, limit) in enumerate(plan.slots):
            db.execute("DELETE FROM slots WHERE key = ? AND expires <= ?", (key, now))
            (held,) = db.execute("SELECT COUNT(*) FROM slots WHERE key = ?", (key,)).fetchone()
            if held >= limit:
                return _verdict(plan, now, used, "too_many_concurrent", i)
        for i, (key, budget, _) in enumerate(plan.tokens):
            spent, reserved = counter(key)
            if spent + reserved + plan.reservation > budget:
                return _verdict(plan, now, used, "quota_exhausted", i)
        if plan.dry:
            return _verdict(plan, now, used, None, 0)
        for key, _, end, _ in plan.requests:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 1, 0) "
                "ON CONFLICT (key) DO UPDATE SET used = used + 1",
                (key, end),
            )
        for key, _ in plan.slots:
            db.execute("INSERT INTO slots VALUES (?, ?, ?)", (key, ticket, now + LEASE_SECONDS))
        for key, _, end in plan.tokens:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, 0, ?) "
                "ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved",
                (key, end, plan.reservation),
            )
        return _verdict(plan, now, used, None, 0)

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        def work(db: sqlite3.Connection) -> None:
            if usage is not None:
                _insert_usage(db, usage)
            for key in ticket.slots:
                db.execute("DELETE FROM slots WHERE key = ? AND ticket = ?", (key, ticket.id))
            for key, reserved in ticket.reservations:
                db.execute(
                    "UPDATE counters SET reserved = MAX(0, reserved - ?), used = used + ? "
                    "WHERE key = ?",
                    (reserved, reserved if tokens is None else tokens, key),
                )

        self._transaction(work)

    def _renew(self, held: list[tuple[str, str]]) -> None:
        expires = time.time() + LEASE_SECONDS
        self._run(
            lambda db: db.executemany(
                "UPDATE slots SET expires = ? WHERE key = ? AND ticket = ?",
                [(expires, key, tid) for key, tid in held],
            )
        )

    def record(self, row: UsageRow) -> None:
        self._run(lambda db: _insert_usage(db, row))

    def usage(self, since: float) -> list[UsageRow]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT * FROM usage WHERE time >= ? ORDER BY time", (since,)
            ).fetchall()
        )
        return [UsageRow(*row) for row in rows]


def _insert_usage(db: sqlite3.Connection, row: UsageRow) -> None:
    db.execute(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?)",
        (row.time, row.client, row.model, row.input_tokens, row.output_tokens, row.status),
    )


def _worker_thread():
    """Return a one-thread pool under gevent (SQLite waits block a whole thread), else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return None
    from gevent.threadpool import ThreadPool

    return ThreadPool(1)


# --- Redis: shared by several gateway hosts -------------------------------------------

_ADMIT = """
local a = cjson.decode(ARGV[1])
local used = {}
for i, r in ipairs(a.requests) do
  used[i] = tonumber(redis.call('GET', r[1]) or '0')
  if used[i] + 1 > r[2] then
    return cjson.encode({failed = 'rate_limited', index = i - 1, used = used})
  end
end
for i, s in ipairs(a.slots) do
  redis.call('ZREMRANGEBYSCORE', s[1], '-inf', a.now)
  if redis.call('ZCARD', s[1]) >= s[2] then
    return cjson.encode({failed = 'too_many_concurrent', index = i - 1, used = used})
  end
end
for i, t in ipairs(a.tokens) do
  local spent = tonumber(redis.call('HGET', t[1], 'used') or '0')
  local reserved = tonumber(redis.call('HGET', t[1], 'reserved') or '0')
  if spent + reserved + a.reservation > t[2] then
    return cjson.encode({failed = 'quota_exhausted', index = i - 1, used = used})
  end
end
if a.dry then return cjson.encode({used = used}) end
for i, r in ipairs(a.requests) do
  redis.call('INCR', r[1])
  redis.call('EXPIREAT', r[1], r[3] + 60)
end
for i, s in ipairs(a.slots) do
  redis.call('ZADD', s[1], a.now + a.lease, a.ticket)
  redis.call('EXPIRE', s[1], math.ceil(a.lease) * 2)
end
for i, t in ipairs(a.tokens) do
  redis.call('HINCRBY', t[1], 'reserved', a.reservation)
  redis.call('EXPIREAT', t[1], t[3] + 86400)
end
return cjson.encode({used = used})
"""

_FINISH = """
local a = cjson.decode(ARGV[1])
for i, key in ipairs(a.slots) do redis.call('ZREM', key, a.ticket) end
for i, r in ipairs(a.reservations) do
  if redis.call('EXISTS', r[1]) == 1 then
    redis.call('HINCRBY', r[1], 'reserved', -r[2])
    local spent = r[2]
    if a.tokens >= 0 then spent = a.tokens end
    redis.call('HINCRBY', r[1], 'used', spent)
  end
end
return 1
"""

_RENEW = """
local a = cjson.decode(ARGV[1])
for i, h in ipairs(a.held) do redis.call('ZADD', h[1], 'XX', a.expires, h[2]) end
return 1
"""


class RedisStore(Store):
    """Counters in Redis: one Lua script per check, exact across hosts."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._client: tuple[int, Any] | None = None

    def _redis(self):
        if self._client is None or self._client[0] != os.getpid():
            import redis

            client = redis.Redis.from_url(
                self.url, socket_timeout=2, socket_connect_timeout=2, retry_on_timeout=False
            )
            self._client = (
                os.getpid(),
                {
                    "client": client,
                    "admit": client.register_script(_ADMIT),
                    "finish": client.register_script(_FINISH),
                    "renew": client.register_script(_RENEW),
                },
            )
        return self._client[1]

    def _call(self, name: str, keys: list[str], args: dict) -> Any:
        import redis

        try:
            return self._redis()[name](keys=keys, args=[json.dumps(args)])
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None

    def _admit(self, plan: _Plan, ticket: str, now: float) -> Verdict:
        keys = (
            [r[0] for r in plan.requests] + [s[0] for s in plan.slots] + [t[0] for t in plan.tokens]
        )
        answer = json.loads(
            self._call(
                "admit",
                keys,
                {
                    "now": now,
                    "lease": LEASE_SECONDS,
                    "ticket": ticket,
                    "reservation": plan.reservation,
                    "dry": plan.dry,
                    "requests": [list(r[:3]) for r in plan.requests],
                    "slots": [list(s) for s in plan.slots],
                    "tokens": [list(t) for t in plan.tokens],
                },
            )
        )
        used = answer.get("used") or []
        if isinstance(used, dict):  # cjson writes an empty table as {}
            used = []
        return _verdict(plan, now, used, answer.get("failed"), answer.get("index", 0))

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        if usage is not None:
            self.record(usage)
        self._call(
            "finish",
            ticket.slots + [key for key, _ in ticket.reservations],
            {
                "ticket": ticket.id,
                "slots": ticket.slots,
                "reservations": [list(r) for r in ticket.reservations],
                "tokens": -1 if tokens is None else tokens,
            },
        )

    def _renew(self, held: list[tuple[str, str]]) -> None:
        self._call(
            "renew",
            [key for key, _ in held],
            {"expires": time.time() + LEASE_SECONDS, "held": [list(h) for h in held]},
        )

    def record(self, row: UsageRow) -> None:
        import redis

        try:
            self._redis()["client"].xadd(
                "gateway:usage",
                {"row": json.dumps(row.__dict__)},
                maxlen=1_000_000,
                approximate=True,
            )
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None

    def usage(self, since: float) -> list[UsageRow]:
        import redis

        try:
            entries = self._redis()["client"].xrange("gateway:usage", min=int(since * 1000))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None
        return [UsageRow(**json.loads(fields[b"row"])) for _, fields in entries]


def open_store(url: str, instance_path: str) -> Store:
    """Return the store ``url`` names: ``sqlite`` (the instance folder), ``sqlite:///path``, ``redis://``."""
    if url == "sqlite":
        return SQLiteStore(os.path.join(instance_path, "limits.sqlite3"))
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    return RedisStore(url)


def init_app(app) -> None:
    """Give ``app`` its limit store, opened per process on first use (after fork)."""
    config = app.extensions["gateway.config"]
    app.extensions["gateway.limits"] = open_store(config.limit_storage, app.instance_path)
