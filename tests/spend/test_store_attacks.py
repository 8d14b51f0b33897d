"""The stores attacked: killed connections and processes, lost replies, timeouts, forks.

Limit counts must stay exact (or, when a reply is lost, conservative: counted
more, never less); usage rows may be lost with a killed process, never written twice.
"""

from __future__ import annotations

import os
import shutil

import pytest

from gateway.policy.limits import Ask, LimitSet, parse_rate
from gateway.spend.store import open_store

from .test_live import RedisServer

LIMITED = Ask(
    (("client:c", LimitSet((parse_rate("100/day"),), 10, (parse_rate("10000/day"),))),), 100
)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def _remaining(store, ask=LIMITED) -> dict[str, int]:
    return {quota.kind: quota.remaining for quota in store.check(ask).quotas}


# --- Redis: connections killed, replies lost ----------------------------------------------


def test_every_connection_killed_at_once_refuses_no_call(own_redis):
    # After a burst a worker holds several idle connections; a Redis restart or a
    # CLIENT KILL closes them all. The next call must not be refused for it.
    import redis

    store = open_store(f"redis://127.0.0.1:{own_redis.port}/0", "")
    store.finish(store.admit(LIMITED).ticket, 10)
    wire = store._redis()["wire"]
    held = [wire._take()[0] for _ in range(4)]  # as a burst of 4 leaves them
    for conn in held:
        conn.connect()
        wire._give(conn)
    redis.Redis(port=own_redis.port).client_kill_filter(_type="normal", skipme=True)
    for _ in range(4):
        verdict = store.admit(LIMITED)
        assert verdict.admitted
        store.finish(verdict.ticket, 10)
    assert _remaining(store) == {"requests": 100 - 5 - 1, "tokens": 10000 - 5 * 10 - 100}
