"""The README's deployments: Apache + Passenger, nginx, systemd, wsgi.py, stream headers."""
