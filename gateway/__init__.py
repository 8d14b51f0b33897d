"""An API-key gateway: client keys in, secret upstream keys added, answers streamed back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from . import commands, config, edge, observe, spend, upstream

__all__ = ["create_app"]


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the gateway app: defaults, then the environment (or ``test_config``)."""
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    app.config.from_mapping(
        GATEWAY_CONFIG=os.path.join(app.instance_path, "config.yaml"),
        GATEWAY_CHECKED_CONFIG_FD=None,  # set by gunicorn.conf.py: what its master accepted
        GATEWAY_ENV_FILE=Path(app.instance_path).parent / ".env",
        GATEWAY_ENVIRON=None,
        GATEWAY_LOG_FORMAT="json",
        UPSTREAM_POOL_SIZE=100,
    )
    if test_config is None:
        for key in (
            "GATEWAY_CONFIG",
            "GATEWAY_CHECKED_CONFIG_FD",
            "GATEWAY_ENV_FILE",
            "GATEWAY_LOG_FORMAT",
        ):
            if key in os.environ:
                app.config[key] = os.environ[key]
        if "GATEWAY_POOL_SIZE" in os.environ:
            app.config["UPSTREAM_POOL_SIZE"] = int(os.environ["GATEWAY_POOL_SIZE"])
    else:
        app.config.update(test_config)

    edge.errors.init_app(app)  # first: a config that cannot load is still logged
    commands.init_app(app)
    if not config.init_app(app):
        return app  # a flask command with no usable config: the commands, nothing to serve
    observe.init_app(app)
    upstream.init_app(app)
    spend.init_app(app)
    edge.init_app(app)
    return app
