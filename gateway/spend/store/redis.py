"""The shared limit store: Redis, one Lua script per check, exact across gateway hosts."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from ...policy.limits import Ticket, Verdict
from .base import LEASE_SECONDS, Plan, Store, StoreUnavailable, UsageRow, plan_verdict

__all__ = ["RedisStore"]


# Every limit is read first; the first one reached refuses (and counts nothing).
_CHECKS = """
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
"""

_CHECK = _CHECKS + "return cjson.encode({used = used})\n"

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
for i, t in ipairs(a.tokens) do
  redis.call('HINCRBY', t[1], 'reserved', a.reservation)
  redis.call('EXPIREAT', t[1], t[3] + 86400)
end
return cjson.encode({used = used})
"""
)

# Counts travel as strings: a Lua number is a double, which Redis would write back
# in exponent form past 1e17, and HINCRBY refuses that halfway through the script.
_FINISH = """
local a = cjson.decode(ARGV[1])
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
                },
            )
        return self._client[1]

    def _call(self, name: str, keys: list[str], args: dict) -> Any:
        import redis

        try:
            return self._redis()[name](keys=keys, args=[json.dumps(args)])
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None

    def _admit(self, plan: Plan, ticket: str, now: float) -> Verdict:
        return self._script("admit", plan, ticket, now)

    def _check(self, plan: Plan, now: float) -> Verdict:
        return self._script("check", plan, "", now)

    def _script(self, script: str, plan: Plan, ticket: str, now: float) -> Verdict:
        keys = (
            [r[0] for r in plan.requests] + [s[0] for s in plan.slots] + [t[0] for t in plan.tokens]
        )
        answer = json.loads(
            self._call(
                script,
                keys,
                {
                    "now": now,
                    "lease": LEASE_SECONDS,
                    "ticket": ticket,
                    "reservation": plan.reservation,
                    "requests": [list(r[:3]) for r in plan.requests],
                    "slots": [list(s) for s in plan.slots],
                    "tokens": [list(t) for t in plan.tokens],
                },
            )
        )
        used = answer.get("used") or []
        if isinstance(used, dict):  # cjson writes an empty table as {}
            used = []
        return plan_verdict(plan, now, used, answer.get("failed"), answer.get("index", 0))

    def _finish(self, ticket: Ticket, tokens: int | None, usage: UsageRow | None) -> None:
        if usage is not None:
            self.record(usage)
        self._call(
            "finish",
            ticket.slots + [key for key, _ in ticket.reservations],
            {
                "ticket": ticket.id,
                "slots": ticket.slots,
                "reservations": [
                    [key, str(-reserved), str(reserved if tokens is None else tokens)]
                    for key, reserved in ticket.reservations
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
