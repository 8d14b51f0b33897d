"""The shared limit store: Redis, one Lua script per check, exact across gateway hosts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

from ...policy.limits import Budget, Ticket, Verdict
from .base import LEASE_SECONDS, Plan, Store, StoreUnavailable, UsageRow, plan_verdict

__all__ = ["RedisStore"]


# Every limit is read first; the first one reached refuses (and counts nothing).
_CHECKS = """
local a = cjson.decode(ARGV[1])
local used = {}
local held = {}
for i, r in ipairs(a.requests) do
  used[i] = tonumber(redis.call('GET', r[1]) or '0')
  if used[i] + 1 > r[2] then
    return cjson.encode({failed = 'rate_limited', index = i - 1, used = used, held = held})
  end
end
for i, s in ipairs(a.slots) do
  redis.call('ZREMRANGEBYSCORE', s[1], '-inf', a.now)
  if redis.call('ZCARD', s[1]) >= s[2] then
    return cjson.encode({failed = 'too_many_concurrent', index = i - 1, used = used, held = held})
  end
end
for i, b in ipairs(a.budgets) do
  local spent = tonumber(redis.call('HGET', b[1], 'used') or '0')
  held[i] = spent + tonumber(redis.call('HGET', b[1], 'reserved') or '0')
  if held[i] + b[4] > b[2] then
    return cjson.encode({failed = 'quota_exhausted', index = i - 1, used = used, held = held})
  end
end
"""

_CHECK = _CHECKS + "return cjson.encode({used = used, held = held})\n"

_ADMIT = (
    _CHECKS
    + """for i, r in ipairs(a.requests) do
  redis.call('INCR', r[1])
  redis.call('EXPIREAT', r[1], r[3] + 60)
end
for i, s in ipairs(a.slots) do
  redis.call('ZADD', s[1], a.now + a.lease, a.ticket)
  redis.call('EXPIRE', s[1], math.ceil(a.lease) * 2)
end
for i, b in ipairs(a.budgets) do
  redis.call('HINCRBY', b[1], 'reserved', b[5])
  redis.call('EXPIREAT', b[1], b[3] + 86400)
end
return cjson.encode({used = used, held = held})
"""
)

# Counts travel as strings: a Lua number is a double, which Redis would write back
# in exponent form past 1e17, and HINCRBY refuses that halfway through the script.
# A settling is done once: run again (its reply lost with its connection, then
# sent again) it changes nothing.
_FINISH = """
local a = cjson.decode(ARGV[1])
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', 60) then return 0 end
for i, key in ipairs(a.slots) do redis.call('ZREM', key, a.ticket) end
for i, r in ipairs(a.reservations) do
  if redis.call('EXISTS', r[1]) == 1 then
    redis.call('HINCRBY', r[1], 'reserved', r[2])
    redis.call('HINCRBY', r[1], 'used', r[3])
  end
end
return 1
"""

# A renewal renews the slot and the set holding it: a set's expiry outlives every
# slot in it, however long its calls run.
_RENEW = """
local a = cjson.decode(ARGV[1])
for i, h in ipairs(a.held) do
  redis.call('ZADD', h[1], 'XX', a.expires, h[2])
  redis.call('EXPIRE', h[1], a.ttl)
end
return 1
"""


# A batch of usage rows is written whole, and once: tried again (its reply lost,
# or redis-py sending it again) it adds nothing. An id is kept for an hour, far
# longer than a batch waits for another try while its store can be reached.
_USAGE = """
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', 3600) then return 0 end
for i, row in ipairs(ARGV) do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1000000, '*', 'row', row)
end
return 1
"""

# A request counter is a string, a budget a hash whose reservations stay held.
_RESET = """
for i, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'hash' then
    redis.call('HSET', key, 'used', 0)
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('SET', key, 0, 'KEEPTTL')
  end
end
return 1
"""


def _list(value: Any) -> list[int]:
    # cjson writes an empty table as {}, and a number past 14 digits in exponent form.
    return [int(v) for v in value] if isinstance(value, list) else []


def _packed(*args: bytes) -> bytes:
    """Return one command in Redis's protocol (RESP)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class _Wire:
    """The limit scripts (admit, check, settle, renew, reset), on the store's own connections.

    redis-py's pool checks a connection for stray bytes and counts it for its
    metrics on every command: ~40 µs of CPU, a third of a round trip. Here a
    connection carries one command and its whole reply at a time, and one that
    fails is closed, so none goes back with a reply unread; one idle for over a
    second is checked first (the server may have closed it). A command that finds
    its reused connection closed is sent once more on a new one: admitting again
    can only count more, and settling again changes nothing.
    """

    def __init__(self, client: Any) -> None:
        pool = client.connection_pool
        self._make = lambda: pool.connection_class(**pool.connection_kwargs)
        self._idle: list[tuple[Any, float]] = []

    def run(self, script: Any, keys: list[str], arg: str) -> Any:
        import redis

        command = _packed(
            b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *map(str.encode, keys), arg.encode()
        )
        load = b""
        reconnected = False
        while True:
            # Sent again after a closed connection: on a new one (the others idle may
            # be closed too, as when the server restarted).
            conn, reused = (self._make(), False) if reconnected else self._take()
            try:
                conn.send_packed_command([load + command], check_health=False)
                if load:
                    conn.read_response()
                reply = conn.read_response()
            except redis.exceptions.NoScriptError:  # the server restarted, or flushed its scripts
                self._give(conn)
                if load:
                    raise
                # Loaded on this connection, just before: every call waiting at once
                # would take one of the pool's (100 at most) and be refused past them.
                load = _packed(b"SCRIPT", b"LOAD", script.script.encode())
            except redis.ConnectionError:
                conn.disconnect()
                if reconnected or not reused:
                    raise
                reconnected = True
            except BaseException:
                conn.disconnect()
                raise
            else:
                self._give(conn)
                return reply

    def _take(self) -> tuple[Any, bool]:
        import redis

        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < 1.0:
                return conn, True
            with contextlib.suppress(redis.RedisError, OSError):  # closed under it: a new one
                if not conn.can_read():
                    return conn, True
            conn.disconnect()
        return self._make(), False

    def _give(self, conn: Any) -> None:
        self._idle.append((conn, time.monotonic()))


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
                    "check": client.register_script(_CHECK),
                    "finish": client.register_script(_FINISH),
                    "renew": client.register_script(_RENEW),
                    "reset": client.register_script(_RESET),
                    "usage": client.register_script(_USAGE),
                    "wire": _Wire(client),
                },
            )
        return self._client[1]

    def _call(self, name: str, keys: list[str], args: dict) -> Any:
        import redis

        try:
            scripts = self._redis()
            return scripts["wire"].run(scripts[name], keys, json.dumps(args))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        return self._script("admit", plan, ticket, now)

    def _check(self, plan: Plan, now: float) -> Verdict:
        return self._script("check", plan, "", now)

    def _script(self, script: str, plan: Plan, ticket: str, now: float) -> Verdict:
        keys = (
            [r.key for r in plan.requests]
            + [s[0] for s in plan.slots]
            + [b.key for b, _ in plan.budgets]
        )
        answer = json.loads(
            self._call(
                script,
                keys,
                {
                    "now": now,
                    "lease": LEASE_SECONDS,
                    "ticket": ticket,
                    "requests": [[r.key, r.rate.count, r.end] for r in plan.requests],
                    "slots": [list(s) for s in plan.slots],
                    # The amount twice: as a number to compare, as a string for HINCRBY.
                    "budgets": [
                        [b.key, b.rate.count, b.end, amount, str(amount)]
                        for b, amount in plan.budgets
                    ],
                },
            )
        )
        used, held = (_list(answer.get(name)) for name in ("used", "held"))
        return plan_verdict(plan, now, used, held, answer.get("failed"), answer.get("index", 0))

    def _finish(self, ticket: Ticket, settled: list[tuple[str, int, int]]) -> None:
        self._call(
            "finish",
            [f"settled:{ticket.id}", *ticket.slots, *(key for key, _, _ in settled)],
            {
                "ticket": ticket.id,
                "slots": ticket.slots,
                "reservations": [
                    [key, str(-reserved), str(spent)] for key, reserved, spent in settled
                ],
            },
        )

    def _renew(self, held: list[tuple[str, str]]) -> None:
        self._call(
            "renew",
            [key for key, _ in held],
            {
                "expires": time.time() + LEASE_SECONDS,
                "ttl": math.ceil(LEASE_SECONDS) * 2,
                "held": [list(h) for h in held],
            },
        )

    def counts(self, limits: list[Budget]) -> list[int]:
        import redis

        try:
            pipe = self._redis()["client"].pipeline(transaction=False)
            for limit in limits:
                if limit.kind == "requests":
                    pipe.get(limit.key)
                else:
                    pipe.hmget(limit.key, "used", "reserved")
            values = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None
        return [
            sum(int(v or 0) for v in value) if isinstance(value, list) else int(value or 0)
            for value in values
        ]

    def reset(self, limits: list[Budget]) -> None:
        self._call("reset", [limit.key for limit in limits], {})

    def _write_usage(self, rows: list[UsageRow], exiting: bool, batch: str) -> None:
        """Add ``rows`` to the usage stream in one script, unless ``batch`` was written."""
        import redis

        try:
            self._redis()["usage"](
                keys=["gateway:usage", f"usage-batch:{batch}"],
                args=[json.dumps(row.__dict__) for row in rows],
            )
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None

    def _read_usage(self, since: float) -> list[UsageRow]:
        import redis

        try:
            entries = self._redis()["client"].xrange("gateway:usage", min=int(since * 1000))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None
        # An entry is added after its call (in the next batch): its id can be later than its time.
        rows = [UsageRow(**json.loads(fields[b"row"])) for _, fields in entries]
        return [row for row in rows if row.time >= since]
