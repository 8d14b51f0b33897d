"""Another process holding an SQLite file's write lock, so a store's calls must wait.

``hold(path, seconds)`` starts one and returns once the lock is taken; run as
``python -m tests.spend.lock_holder PATH SECONDS`` it is that process.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hold(path: str | Path, seconds: float) -> subprocess.Popen:
    """Start a process that holds ``path``'s write lock for ``seconds``; return it once held."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.spend.lock_holder", str(path), str(seconds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


if __name__ == "__main__":
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
