"""Fixtures: ``app``, ``client`` and ``runner`` on a test config with canary secrets."""

from __future__ import annotations

import os
import shutil

import pytest
import responses
from flask.testing import FlaskClient

from gateway import create_app

from .support import CANARIES, assert_no_canary, base_config, write_config


@pytest.fixture
def config_dict() -> dict:
    return base_config()


class CanaryCheckingClient(FlaskClient):
    """A test client that fails the test if any answer carries a canary secret."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        assert_no_canary(response.get_data() + str(response.headers).encode())
        return response


@pytest.fixture
def app(tmp_path, config_dict):
    app = create_app(
        {
            "TESTING": True,
            "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", config_dict),
            "GATEWAY_ENVIRON": dict(CANARIES),
        }
    )
    app.test_client_class = CanaryCheckingClient
    yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def mocked_upstream():
    """A mocked upstream for unit tests: every registered call must happen."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture(scope="session")
def fake_upstream():
    from .fake_upstream import FakeUpstream

    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_fake_upstream():
    """A fake upstream of the module's own, for tests that start their own gateway or server."""
    from .fake_upstream import FakeUpstream

    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def page_origin():
    """The origin the browser test serves its page from (the gateway allows it)."""
    from .live_gateway import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def live_gateway(fake_upstream, tmp_path_factory, page_origin):
    """The real app under gunicorn (shipped gunicorn.conf.py) against the fake upstream."""
    from gateway.policy.keys import key_item

    from .live_gateway import LiveGateway, free_port
    from .support import BROWSER_KEY, DOCS_KEY, LIVE_KEYS, live_config

    folder = tmp_path_factory.mktemp("gateway")
    config = live_config(fake_upstream.url, f"http://127.0.0.1:{free_port()}", page_origin)
    # Proxy variables point at a closed port: a gateway that read them would fail every call.
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {**CANARIES, "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy}
    path = folder / "config.yaml"
    live = LiveGateway(str(path), env, folder / "gunicorn.log")
    # The /docs page calls from the gateway's own origin: one client allows it.
    config["clients"]["docs-try"] = {**config["clients"][BROWSER_KEY], "keys": [key_item(DOCS_KEY)]}
    config["clients"]["docs-try"]["allowedOrigins"] = [live.url]
    write_config(path, config)
    live.start()
    yield live
    live.stop()
    # Secret egress: no canary in anything the gateway logged during the whole session,
    # and no client key either (clients are named in logs, never by key).
    log = live.log_text()
    for value in CANARIES.values():
        assert value not in log, "a secret reached the gateway's log"
    for key in [k for k in config["clients"] if "keys" not in config["clients"][k]] + LIVE_KEYS:
        assert key not in log, "a client key reached the gateway's log"
    assert [line["request_id"] for line in live.access_lines()], "no access lines were written"


@pytest.fixture(scope="module")
def live_workers(live_gateway):
    """The live gateway's worker pids; the module fails if a worker died or was restarted."""
    before = live_gateway.worker_pids()
    yield before
    assert live_gateway.worker_pids() == before, "a worker died or was restarted"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the workplace's closed network and root user need (see README, Tests).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
