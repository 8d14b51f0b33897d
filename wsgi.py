"""WSGI entry point for gunicorn (``wsgi:app``), Passenger and mod_wsgi (``application``)."""

from gateway import create_app

app = application = create_app()
