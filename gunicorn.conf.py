# gunicorn settings for the gateway: `gunicorn -c gunicorn.conf.py wsgi:app`.
#
# Every value can be overridden from the environment (GATEWAY_*), or on the
# command line, which wins over this file.

import json
import logging
import multiprocessing
import os
import subprocess
import sys

import gunicorn.util

#
# Server socket
#
#   bind - Loopback by default: put nginx (or another TLS proxy) in front.
#   backlog - Connections the kernel queues while every worker is busy.
#

bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8787")
backlog = 2048

#
# Worker processes
#
#   worker_class - gevent: each request is a greenlet, so one worker holds
#       hundreds of slow upstream calls and open streams. A sync worker would
#       block on one LLM call and be killed by `timeout`; gevent's heartbeat
#       keeps running while a request waits.
#   workers - One per core: the work is I/O, concurrency comes from greenlets.
#   worker_connections - Greenlets (open requests, streams included) per worker.
#   timeout - Seconds without a heartbeat before a worker is restarted. With
#       gevent this catches a stuck worker only; it never cuts a long stream.
#   graceful_timeout - On restart or reload, how long in-flight calls (a long
#       LLM stream) may go on before they are cut.
#   keepalive - Seconds to hold an idle client connection (nginx reuses them).
#   max_requests - Off: the gateway holds no per-request state to leak.
#

worker_class = os.environ.get("GATEWAY_WORKER_CLASS", "gevent")
workers = int(os.environ.get("GATEWAY_WORKERS", multiprocessing.cpu_count()))
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", 1000))
threads = int(os.environ.get("GATEWAY_THREADS", 1))  # used only by GATEWAY_WORKER_CLASS=gthread
timeout = int(os.environ.get("GATEWAY_WORKER_TIMEOUT", 30))
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", 120))
keepalive = int(os.environ.get("GATEWAY_KEEPALIVE", 5))

# The upstream connection pool of each worker is as large as its concurrency.
raw_env = [f"GATEWAY_POOL_SIZE={max(worker_connections, threads)}"]

#
# Control
#
#   control_socket_disable - Off by default: gunicorn 25+ opens a socket in
#       $HOME that two gateways on one host (or shared hosting) would share.
#       Set GATEWAY_CONTROL_SOCKET to a path to use `gunicornc`.
#

if os.environ.get("GATEWAY_CONTROL_SOCKET"):
    control_socket = os.environ["GATEWAY_CONTROL_SOCKET"]
else:
    control_socket_disable = True

#
# Logging
#
#   accesslog / errorlog - "-" is stdout / stderr, for systemd or a container.
#   access_log_format - No headers, so no key reaches the access log.
#   _QuietInvalidRequest - gunicorn's warning about a request it cannot parse
#       quotes the offending header line, which can hold a client key
#       ("Authorization Bearer <key>" without its colon): keep only what was wrong.
#

accesslog = os.environ.get("GATEWAY_ACCESS_LOG", "-")
errorlog = os.environ.get("GATEWAY_ERROR_LOG", "-")
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms'


class _QuietInvalidRequest(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        if message.startswith("Invalid request from "):
            # "Invalid request from ip=...: Invalid HTTP Header: '<the line>'"
            record.msg, record.args = ": ".join(message.split(": ")[:2]), ()
        return True


#
# Errors gunicorn answers itself
#
#   A request line or header gunicorn cannot parse never reaches the app, and
#   gunicorn answers it with an HTML page. Answer in the gateway's one JSON
#   error shape instead, and leave out gunicorn's message: it can echo what the
#   client sent.
#   The codes are a copy of gateway/errors.py's CODES (this file cannot import
#   the gateway: the master must not import ssl before gevent patches the
#   workers); tests/test_errors.py proves the two agree.
#

_GUNICORN_CODES = {
    400: "bad_request",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_implemented",
}


def _json_error(sock, status_int, reason, mesg):
    code = _GUNICORN_CODES.get(status_int, "bad_request" if status_int < 500 else "internal_error")
    body = json.dumps({"error": code, "message": f"{reason}."}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = _json_error

#
# Server hooks
#
#   on_starting - Check the config once, before any worker forks, by running
#       `flask --app gateway check-config` (the same check users run): a broken
#       config stops gunicorn with the problem list and exit status 1 instead
#       of a worker-boot traceback per worker. It runs in a child process so
#       the master imports no ssl before gevent patches the workers.
#   post_worker_init - Each worker's error log gets _QuietInvalidRequest (the
#       workers are where requests are parsed).
#


def post_worker_init(worker):
    worker.log.error_log.addFilter(_QuietInvalidRequest())


def on_starting(server):
    check = [sys.executable, "-m", "flask", "--app", "gateway", "check-config"]
    if subprocess.run(check, cwd=os.path.dirname(os.path.abspath(__file__))).returncode:
        print("gateway: not starting until the config is fixed", file=sys.stderr)
        sys.exit(1)
