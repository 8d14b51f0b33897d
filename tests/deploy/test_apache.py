"""Apache + mod_passenger serving the gateway from the README's vhost, as a web host would.

Debian's apache2 and libapache2-mod-passenger (.ci/run installs them), started on
free loopback ports from a config written here: Apache's workers run as www-data,
the app as the account that owns it, with its .env at mode 600, and output
compression on for everything ("compress all content").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest
import requests
import yaml

from ..deploy_support import (
    give_to,
    install_app,
    need,
    readme_block,
    stop,
    substitute,
    user_group,
    wait_for,
)
from ..fake_upstream import FakeUpstream
from ..live_gateway import free_port
from ..support import CANARIES, CHAT_KEY, assert_no_canary, base_config

MODULES = Path("/usr/lib/apache2/modules")
WEB_USER = "www-data"  # Apache's own workers
APP_USER = "nobody"  # owns the app and its .env; Passenger runs the app as this account
# Debian 12's Passenger (6.0.17) loads apps with `import imp`: it needs Python 3.11 or older.
SYSTEM_PYTHON = "/usr/bin/python3"

SERVER_CONFIG = """\
ServerName localhost
Listen 127.0.0.1:{port}
Listen 127.0.0.1:{site_port}
PidFile {run}/apache2.pid
ErrorLog {run}/error.log
DefaultRuntimeDir {run}
Mutex file:{run} default
User {web_user}
Group {web_group}

LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule env_module {modules}/mod_env.so
LoadModule filter_module {modules}/mod_filter.so
LoadModule deflate_module {modules}/mod_deflate.so
LoadModule passenger_module {modules}/mod_passenger.so

# Debian's mods-available/passenger.conf, plus what a closed test network needs.
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir {run}
PassengerDisableSecurityUpdateCheck on
PassengerDisableAnonymousTelemetry on
# See tmp/restart.txt at once rather than within 10 s.
PassengerStatThrottleRate 0

# Debian's apache2.conf: nothing is served unless a vhost allows it.
<Directory />
    AllowOverride None
    Require all denied
</Directory>

# "Compress all content", as hosting panels turn it on.
SetOutputFilter DEFLATE

Include {run}/gateway.conf

# An existing site, with the gateway mounted under /gateway.
<VirtualHost 127.0.0.1:{site_port}>
    DocumentRoot {site}
    <Directory {site}>
        Require all granted
    </Directory>
{subpath}
</VirtualHost>
"""


@dataclass
class Site:
    url: str  # the README's vhost
    site_url: str  # an existing site with the gateway under /gateway
    subpath_app: Path
    run: Path

    def error_log(self) -> str:
        return (self.run / "error.log").read_text(errors="replace")


def _app(folder: Path, upstream: FakeUpstream) -> Path:
    """Install a copy of the gateway as a host holds it: its own venv, config and .env."""
    install_app(folder, SYSTEM_PYTHON)
    (folder / "public").mkdir()
    (folder / "tmp").mkdir()
    _write_config(folder, base_config(upstream.url + "/v1"))
    env_file = folder / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in CANARIES.items()))
    env_file.chmod(0o600)
    give_to(folder, APP_USER)
    return folder


def _write_config(folder: Path, config: dict) -> None:
    path = folder / "instance/config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.chown(path, APP_USER, user_group(APP_USER))


def _restart(app: Path, when: float) -> None:
    """Touch tmp/restart.txt, with an mtime Passenger has not seen before."""
    restart = app / "tmp/restart.txt"
    restart.touch()
    os.utime(restart, (when, when))


@pytest.fixture(scope="module")
def site(module_fake_upstream):
    apache = need("apache2", "apache2")
    need(str(MODULES / "mod_passenger.so"), "libapache2-mod-passenger")
    need(SYSTEM_PYTHON, "python3")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Apache test runs Apache as root, as CI does")
        pytest.skip("Apache switches users only when started as root")

    # Not under pytest's tmp_path: www-data and the app's account must reach the files.
    root = Path(tempfile.mkdtemp(prefix="gateway-apache-"))
    root.chmod(0o755)
    run, site_root = root / "run", root / "site"
    run.mkdir()
    site_root.mkdir()
    (site_root / "page.txt").write_text("An existing page of the site. " * 50)
    app = _app(root / "gateway", module_fake_upstream)
    subpath_app = _app(root / "gateway-subpath", module_fake_upstream)
    port, site_port = free_port(), free_port()

    users = {"PassengerUser gateway": f"PassengerUser {APP_USER}"}
    users["PassengerGroup gateway"] = f"PassengerGroup {user_group(APP_USER)}"
    vhost = substitute(
        readme_block("# Apache vhost:"),
        {"<VirtualHost *:80>": f"<VirtualHost 127.0.0.1:{port}>", "/srv/gateway": str(app)} | users,
    )
    subpath = substitute(
        readme_block("# Apache sub-path mount:"), {"/srv/gateway": str(subpath_app)} | users
    )
    (run / "gateway.conf").write_text(vhost)
    config = run / "apache2.conf"
    config.write_text(
        SERVER_CONFIG.format(
            port=port,
            site_port=site_port,
            run=run,
            site=site_root,
            subpath=subpath,
            modules=MODULES,
            web_user=WEB_USER,
            web_group=user_group(WEB_USER),
        )
    )
    log = run / "apache2.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [apache, "-f", str(config), "-DFOREGROUND"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/health", 30, "Apache", log)
        yield Site(url, f"http://127.0.0.1:{site_port}", subpath_app, run)
    finally:
        stop(process)
        for value in CANARIES.values():
            assert value not in (run / "error.log").read_text(errors="replace")
        shutil.rmtree(root, ignore_errors=True)


def test_health_and_an_envelope_call(site, module_fake_upstream):
    assert requests.get(site.url + "/health", timeout=30).json() == {"ok": True}
    answer = requests.post(
        site.url + "/proxy",
        json={"method": "POST", "path": "/chat/completions", "body": {"model": "m"}},
        headers={"Authorization": f"Bearer {CHAT_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream"
    # The secret came from the app's .env (mode 600): readable only as its owner.
    seen = module_fake_upstream.last("/v1/chat/completions")
    assert seen.headers["Authorization"] == "Bearer " + CANARIES["CANARY_OPENAI"]
    assert_no_canary(answer.content + str(answer.headers).encode())


def test_the_app_runs_as_its_owner_not_as_apache(site):
    owners = {
        proc.info["username"]
        for proc in psutil.process_iter(["cmdline", "username"])
        if any("wsgi-loader.py" in part for part in proc.info["cmdline"] or [])
        and any(str(site.run.parent) in part for part in proc.info["cmdline"] or [])
    }
    assert owners == {APP_USER}


def test_streams_arrive_event_by_event_with_compression_on(site, module_fake_upstream):
    # The server compresses what it may: a plain page of the other site comes gzipped.
    page = requests.get(site.site_url + "/page.txt", timeout=10)
    assert page.headers.get("Content-Encoding") == "gzip"
    # "lockstep": the upstream sends each chunk only after the SDK yielded the last one,
    # so a server that holds chunks back never gets the next one (a read timeout).
    client = openai.OpenAI(
        base_url=site.url + "/proxy", api_key=CHAT_KEY, max_retries=0, timeout=10
    )
    stream = client.chat.completions.create(
        model="lockstep", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    words, gaps, last = [], [], time.monotonic()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
            module_fake_upstream.release.release()
    assert words == ["Hello", " from", " the", " fake", " upstream"]
    assert stream.response.headers.get("Content-Encoding") is None
    assert max(gaps) < 5, gaps


def test_the_sub_path_mount(site, module_fake_upstream):
    assert requests.get(site.site_url + "/gateway/health", timeout=30).json() == {"ok": True}
    auth = {"Authorization": f"Bearer {CHAT_KEY}"}
    answer = requests.get(site.site_url + "/gateway/proxy/files/echo?x=1", headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    assert module_fake_upstream.last("/v1/files/echo").query == "x=1"
    # Apache resolves "%2e%2e" before the app sees the path: the policy judges the
    # resolved path (/admin, outside this key's /files/**) and nothing is forwarded.
    before = len(module_fake_upstream.seen)
    refused = requests.get(
        site.site_url + "/gateway/proxy/files/%2e%2e/admin", headers=auth, timeout=10
    )
    assert (refused.status_code, refused.json()["error"]) == (403, "path_not_allowed")
    assert len(module_fake_upstream.seen) == before


def test_a_broken_config_answers_json_not_an_html_page(site):
    config = site.subpath_app / "instance/config.yaml"
    good = yaml.safe_load(config.read_text())
    broken = yaml.safe_load(config.read_text())
    broken["clients"][CHAT_KEY]["allowedPaths"] = []
    _write_config(site.subpath_app, broken)
    _restart(site.subpath_app, time.time() + 1)
    for path in ("/gateway/health", "/gateway/proxy/models"):
        answer = requests.get(site.site_url + path, timeout=30)
        assert answer.status_code == 503
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json()["error"] == "config_invalid"
    assert 'allowedPaths: must not be empty; write ["/**"]' in site.error_log()

    # Fixed and restarted again, it serves again.
    _write_config(site.subpath_app, good)
    _restart(site.subpath_app, time.time() + 2)
    assert requests.get(site.site_url + "/gateway/health", timeout=30).json() == {"ok": True}
