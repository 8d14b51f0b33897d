"""``wsgi.py`` under a loader that imports it on the first request (Passenger, mod_wsgi)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..support import CANARIES, CHAT_KEY, base_config, write_config

ROOT = Path(__file__).resolve().parents[2]

# Import wsgi.py as Passenger's loader does, call it once, print status, headers and body.
_LOAD_AND_CALL = """
import json, sys
from werkzeug.test import Client
import wsgi
answer = Client(wsgi.application).get("/health")
print(json.dumps([answer.status_code, dict(answer.headers), answer.get_data(as_text=True)]))
"""


def _load(config_path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _LOAD_AND_CALL],
        cwd=ROOT,
        env={**CANARIES, "GATEWAY_CONFIG": config_path, "GATEWAY_ENV_FILE": "/dev/null"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_broken_config_answers_in_the_json_error_shape(tmp_path):
    raw = base_config()
    raw["clients"][CHAT_KEY]["allowedPaths"] = []
    raw["secrets"]["extra"] = "${NOT_SET_FOR_THIS_TEST}"
    done = _load(write_config(tmp_path / "bad.yaml", raw))
    assert done.returncode == 0, done.stderr
    status, headers, body = json.loads(done.stdout)
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "error": "config_invalid",
        "message": "The gateway's config is invalid; its error log lists the problems.",
        "request_id": headers["X-Gateway-Request-Id"],
    }
    # Every problem goes to the server's error log (stderr), and no secret with them.
    assert "the config has 2 problem(s)" in done.stderr
    assert 'allowedPaths: must not be empty; write ["/**"]' in done.stderr
    assert "environment variable NOT_SET_FOR_THIS_TEST is not set" in done.stderr
    assert "Traceback" not in done.stderr
    for value in CANARIES.values():
        assert value not in done.stderr + body


def test_a_good_config_serves_the_gateway(tmp_path):
    done = _load(write_config(tmp_path / "good.yaml", base_config()))
    assert done.returncode == 0, done.stderr
    status, _, body = json.loads(done.stdout)
    assert (status, json.loads(body)) == (200, {"ok": True})
