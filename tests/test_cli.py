"""``flask check-config`` on valid and broken configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import create_app
from gateway.config import ConfigError

from .support import CANARIES, assert_no_canary, base_config, write_config

ROOT = Path(__file__).resolve().parent.parent


def test_check_config_prints_a_summary(runner):
    result = runner.invoke(args=["check-config"])
    assert result.exit_code == 0, result.output
    assert "targets (1):" in result.output
    assert "clients (3):" in result.output
    assert "openai" in result.output
    assert_no_canary(result.output)


def test_check_config_lists_every_problem(runner, tmp_path):
    raw = base_config()
    raw["clients"]["ck-test-chat-0123456789"]["allowedMethods"] = []
    raw["clients"]["ck-test-chat-0123456789"]["allowedPath"] = ["/x"]
    path = write_config(tmp_path / "bad.yaml", raw)
    result = runner.invoke(args=["check-config", "--config", path])
    assert result.exit_code == 1
    assert "The config has 2 problem(s):" in result.output
    assert "allowedPath: unknown field; did you mean allowedPaths?" in result.output
    assert "Traceback" not in result.output


def _flask_cli(config_path: str, *args: str) -> subprocess.CompletedProcess:
    return _run(config_path, "-m", "flask", "--app", "gateway", *(args or ["check-config"]))


def _run(config_path: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **CANARIES, "GATEWAY_CONFIG": config_path}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_reports_a_broken_config_without_a_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("targets: {}\nclients: {k: {target: x}}\n")
    result = _flask_cli(str(path))
    assert result.returncode == 1
    assert "clients.client#1.target: unknown target 'x'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_flask_cli_accepts_a_valid_config(tmp_path):
    result = _flask_cli(write_config(tmp_path / "ok.yaml", base_config()))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert_no_canary(result.stdout + result.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("-m", "flask", "--app", "gateway", "run", "--port", "0"),
        ("-m", "flask", "--app", "gateway", "routes"),
        # wsgi.py itself answers 503 config_invalid instead (tests/test_deploy_wsgi.py).
        ("-c", "from gateway import create_app; create_app()"),
    ],
)
def test_every_loader_refuses_a_broken_config_with_the_problem_list(tmp_path, args):
    path = tmp_path / "broken.yaml"
    path.write_text("targets: {api: {baseURL: http://x}}\nclients: {}\n")
    result = _run(str(path), *args)
    assert result.returncode != 0
    assert "targets.api.baseURL: unknown field; did you mean baseUrl?" in result.stderr
    assert "Running on" not in result.stdout + result.stderr


def test_create_app_raises_the_problems(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("targets: {}\nclients: {}\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        create_app({"GATEWAY_CONFIG": str(path), "GATEWAY_ENVIRON": {}})
    assert info.value.problems == [f"{path}: bogus: unknown field"]
