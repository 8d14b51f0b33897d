"""Tests of gateway/edge: routes, bodies, the pipeline, CORS, OpenAPI; live under gunicorn."""
