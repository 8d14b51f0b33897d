"""WSGI entry point for gunicorn (``wsgi:app``), Passenger and mod_wsgi (``application``)."""

from gateway import create_app
from gateway.edge.errors import config_invalid_app
from gateway.errors import ConfigError

try:
    app = application = create_app()
except ConfigError as exc:
    # Passenger and mod_wsgi would show their own HTML error page for an import
    # error: answer in the gateway's JSON shape instead. gunicorn's workers build
    # from the config their master checked and handed over (gunicorn.conf.py).
    app = application = config_invalid_app(exc.problems)
