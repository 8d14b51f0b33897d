"""Fixtures of the spend tests."""

from __future__ import annotations

import pytest

from ..support import need_redis_server
from .test_live import RedisServer


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own, on a free port (to stop, restart, flush)."""
    need_redis_server()
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
