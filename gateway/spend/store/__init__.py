"""Where limit counters and usage rows live: one interface (``base``), two stores.

``sqlite`` (one file shared by every worker and process that opens it) and
``redis`` (shared across hosts); which one is chosen once, at start, by the
config's ``limits.storage``. Imports ``policy`` (the limit rules) and nothing
above it; no Flask.
"""

from __future__ import annotations

import os

from .base import Store

__all__ = ["Store", "init_app", "open_store"]


def open_store(url: str, instance_path: str) -> Store:
    """Return the store ``url`` names: ``sqlite`` (the instance folder), ``sqlite:///path``, ``redis://``."""
    from .redis import RedisStore
    from .sqlite import SQLiteStore

    if url == "sqlite":
        return SQLiteStore(os.path.join(instance_path, "limits.sqlite3"))
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    return RedisStore(url)


def init_app(app) -> None:
    """Give ``app`` its limit store, opened per process on first use (after fork)."""
    config = app.extensions["gateway.config"]
    app.extensions["gateway.limits"] = open_store(config.limit_storage, app.instance_path)
