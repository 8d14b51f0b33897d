"""Tests of gateway/observe: request ids, the access log, metrics; live under gunicorn, HUP."""
