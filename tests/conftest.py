"""Fixtures: ``app``, ``client`` and ``runner`` on a test config with canary secrets."""

from __future__ import annotations

import pytest

from gateway import create_app

from .support import CANARIES, base_config, write_config


@pytest.fixture
def config_dict() -> dict:
    return base_config()


@pytest.fixture
def app(tmp_path, config_dict):
    app = create_app(
        {
            "TESTING": True,
            "GATEWAY_CONFIG": write_config(tmp_path / "config.yaml", config_dict),
            "GATEWAY_ENVIRON": dict(CANARIES),
        }
    )
    yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()
