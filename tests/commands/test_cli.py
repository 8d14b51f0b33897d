"""``flask check-config`` on valid and broken configs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import create_app
from gateway.errors import ConfigError
from gateway.policy.keys import KEY_PATTERN, checksum_ok, key_item, new_key

from ..support import (
    CANARIES,
    CHAT_KEY,
    READONLY_KEY,
    assert_no_canary,
    base_config,
    named_client,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_check_config_prints_a_summary(runner):
    result = runner.invoke(args=["check-config"])
    assert result.exit_code == 0, result.output
    assert "targets (1):" in result.output
    assert "clients (3):" in result.output
    assert "openai" in result.output
    assert "not at their default):" in result.output
    assert_no_canary(result.output)


def test_check_config_shows_the_settings_a_config_changes(runner, tmp_path):
    raw = base_config()
    raw.update(maxRequestBytes=2048, egressGuard=False, limits={"storage": "redis://127.0.0.1"})
    result = runner.invoke(
        args=["check-config", "--config", write_config(tmp_path / "c.yaml", raw)]
    )
    assert result.exit_code == 0, result.output
    assert "settings (3 not at their default):" in result.output
    assert "  maxRequestBytes: 2048 (default 10485760)" in result.output
    assert "  egressGuard: false (default true)" in result.output
    assert "  limits.storage: redis://127.0.0.1 (default sqlite)" in result.output
    # The settings' own lines, before the clients' header: never read as a client.
    settings_at = result.output.index("settings (3 not")
    assert settings_at < result.output.index("clients (")


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
        # wsgi.py itself answers 503 config_invalid instead (tests/deploy/test_wsgi.py).
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


# --- the flask CLI on a fresh checkout: no config, or a broken one ---------------


@pytest.fixture(params=["missing", "broken"])
def checkout(request, tmp_path):
    """A copy of the project whose own config is missing or broken, as the CLI finds it."""
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__py*"))
    if request.param == "broken":
        (tmp_path / "instance").mkdir()
        (tmp_path / "instance" / "config.yaml").write_text("targets: {}\nclients: {}\nbogus: 1\n")
    return tmp_path


def _fresh(checkout: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``flask --app gateway ARGS`` in ``checkout``, with no GATEWAY_* variable set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "gateway", *args],
        cwd=checkout,
        env={**env, **CANARIES},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_the_gateway_commands_without_a_usable_config(checkout):
    result = _fresh(checkout, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("check-config", "explain", "keys", "usage"):
        assert re.search(rf"^  {command} ", result.stdout, re.MULTILINE), result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_keys_work_without_a_usable_config(checkout):
    made = _fresh(checkout, "keys", "new", "chat-app")
    assert made.returncode == 0, made.stderr
    key = re.search(KEY_PATTERN, made.stdout).group(0)
    hashed = _fresh(checkout, "keys", "hash", stdin=key + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == key_item(key)
    assert f"  - {key_item(key)}" in made.stdout


def test_check_config_checks_the_file_named_alone(checkout, tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    good = _fresh(
        checkout, "check-config", "--config", write_config(folder / "ok.yaml", base_config())
    )
    assert good.returncode == 0, good.stderr
    assert "ok.yaml: OK" in good.stdout
    assert "instance" not in good.stdout + good.stderr  # nothing about the default file
    (folder / "bad.yaml").write_text("targets: {}\nclients: {k: {target: x}}\n")
    bad = _fresh(checkout, "check-config", "--config", str(folder / "bad.yaml"))
    assert bad.returncode == 1
    assert "bad.yaml: clients.client#1.target: unknown target 'x'" in bad.stderr
    assert "instance" not in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def test_check_config_without_config_checks_the_default_file(checkout):
    result = _fresh(checkout, "check-config")
    assert result.returncode == 1
    default = checkout / "instance" / "config.yaml"
    assert f"{default}: " in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("explain", "GET", "/proxy/models"), "flask explain"),
        (("usage",), "flask usage"),
    ],
)
def test_commands_that_need_the_config_say_which_file_and_why(checkout, args, command):
    result = _fresh(checkout, *args)
    assert result.returncode == 1
    default = checkout / "instance" / "config.yaml"
    said = result.stderr
    assert f"Error: {command} needs the gateway config, and {default} could not be loaded" in said
    if default.exists():
        assert f"{default}: bogus: unknown field" in said
    else:
        assert f"{default}: file not found" in said
    assert "Traceback" not in result.stdout + said


def test_flask_run_still_refuses_without_a_usable_config(checkout):
    result = _fresh(checkout, "run", "--port", "0")
    assert result.returncode == 1
    assert f"{checkout / 'instance' / 'config.yaml'}: " in result.stderr
    assert "Running on" not in result.stdout + result.stderr


# --- flask keys, and what check-config says about keys ----------------------------


def test_keys_new_prints_a_key_once_and_the_item_that_stands_for_it(runner):
    result = runner.invoke(args=["keys", "new", "chat-app"])
    assert result.exit_code == 0, result.output
    (key,) = re.findall(KEY_PATTERN, result.output)
    assert checksum_ok(key)
    assert result.output.count(key) == 1
    assert f"  - {key_item(key)}" in result.output.splitlines()
    assert "clients.chat-app.keys" in result.output
    second = runner.invoke(args=["keys", "new", "chat-app"]).output
    assert key not in second


@pytest.mark.parametrize("name", ["Chat", "-x", "a b", "a" * 65])
def test_keys_new_refuses_a_name_that_breaks_the_rule(runner, name):
    result = runner.invoke(args=["keys", "new", "--", name])
    assert result.exit_code == 2
    assert "must be lowercase letters" in result.output


def test_keys_hash_reads_stdin_and_never_echoes_the_key(runner):
    key = new_key()
    result = runner.invoke(args=["keys", "hash"], input=key + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == key_item(key) + "\n"
    assert key not in result.output


def test_keys_hash_names_the_plaintext_client_it_migrates(runner):
    result = runner.invoke(args=["keys", "hash"], input=CHAT_KEY)
    assert result.exit_code == 0
    assert result.stdout == key_item(CHAT_KEY) + "\n"
    assert "plaintext key of clients.client#1" in result.stderr
    assert CHAT_KEY not in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "give exactly one client key"),
        ("a\nb\n", "give exactly one client key"),
        ("key with space", "printable ASCII with no spaces"),
        (key_item("x"), "already a key hash"),
    ],
)
def test_keys_hash_refuses_what_is_not_one_key(runner, text, message):
    result = runner.invoke(args=["keys", "hash"], input=text)
    assert result.exit_code == 1
    assert message in result.output
    assert result.stdout == ""


def test_keys_hash_warns_about_a_cut_gk_key(runner):
    key = new_key()[:-1]
    result = runner.invoke(args=["keys", "hash"], input=key)
    assert result.exit_code == 0
    assert "checksum does not match" in result.stderr
    assert key not in result.output


def test_check_config_warns_about_plaintext_and_counts_active_keys(runner, tmp_path):
    now = datetime.now(UTC)
    raw = base_config()
    raw["clients"][CHAT_KEY]["name"] = "legacy-chat"
    raw["clients"]["chat-app"] = {
        **named_client(),
        "keys": [
            key_item("a"),
            {"sha256": key_item("b")[7:], "expires": (now + timedelta(days=3)).isoformat()},
            {"sha256": key_item("c")[7:], "expires": "2021-01-01"},
        ],
    }
    raw["clients"]["retired"] = {
        **named_client(),
        "keys": [{"sha256": key_item("d")[7:], "expires": "2021-01-01"}],
    }
    path = write_config(tmp_path / "c.yaml", raw)
    result = runner.invoke(args=["check-config", "--config", path])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(
        line.startswith("  chat-app -> api:") and line.endswith("keys: 2 of 3 active")
        for line in lines
    )
    plaintext = [line for line in lines if "plaintext in the config;" in line]
    assert [line.split(":")[0].strip() for line in plaintext] == [
        "clients.legacy-chat",
        "clients.client#2",
        "clients.client#3",
    ]
    assert all("flask --app gateway keys hash" in line for line in plaintext)
    (soon,) = [line for line in lines if line.startswith("  clients.chat-app.keys[1]: expires at")]
    assert (
        "(in 2 days); give the client a new key (`flask --app gateway keys new chat-app`)" in soon
    )
    assert "  clients.chat-app.keys[2]: expired at 2021-01-01T00:00:00Z; remove it" in lines
    assert "  clients.retired: no key is active now, so every call is refused" in lines
    for key in (CHAT_KEY, READONLY_KEY):
        assert key not in result.output


def test_usage_tables_escape_control_characters(app, runner):
    # A row stored before model names were bounded must not forge rows in the table.
    from gateway.spend.store.base import UsageRow

    forged = "gpt\r\nforged-client            1   999999\x1b[2K"
    app.extensions["gateway.limits"].record(UsageRow(time.time(), "c", forged, 1, 2, 200))
    result = runner.invoke(args=["usage", "--by", "model"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and "\x1b" not in result.output
    assert lines[1].startswith("gpt\\r\\nforged-client")
