# gunicorn settings for the gateway: `gunicorn -c gunicorn.conf.py wsgi:app`.
#
# Every value can be overridden from the environment (GATEWAY_*), or on the
# command line, which wins over this file.

import fcntl
import glob
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

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
#   accesslog - Off: the gateway writes its own access log, one JSON object
#       per request on stdout when the answer has ended (GATEWAY_LOG_FORMAT=text
#       for a readable line), with the client, the error code and the request id
#       that gunicorn's line cannot know.
#   errorlog - "-" is stderr, for systemd or a container.
#   _QuietRequestText - gunicorn echoes request text into its error log: the
#       header line that broke a request it cannot parse ("Authorization Bearer
#       <key>" without its colon), or a failed request's query string. Either
#       can hold a key: keep only what was wrong, and the path.
#

accesslog = None
errorlog = os.environ.get("GATEWAY_ERROR_LOG", "-")
loglevel = os.environ.get("GATEWAY_LOG_LEVEL", "info")


class _QuietRequestText(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        if message.startswith("Invalid request from "):
            # "Invalid request from ip=...: Invalid HTTP Header: '<the line>'"
            record.msg, record.args = ": ".join(message.split(": ")[:2]), ()
        elif message.startswith("Error handling request"):
            # "Error handling request GET /path?query"
            record.msg, record.args = message.split("?", 1)[0], ()
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
#   workers); tests/test_errors.py proves the two agree. The request is not
#   parsed, so the request id is a new one, never the client's X-Request-ID.
#

_GUNICORN_CODES = {
    400: "bad_request",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_implemented",
}


def _json_error(sock, status_int, reason, mesg):
    code = _GUNICORN_CODES.get(status_int, "bad_request" if status_int < 500 else "internal_error")
    request_id = os.urandom(8).hex()
    body = json.dumps({"error": code, "message": f"{reason}.", "request_id": request_id}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Gateway-Request-Id: {request_id}\r\n\r\n"
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
#       the master never imports the gateway (nor requests and urllib3) before
#       gevent patches the workers. Its summary goes to stderr: stdout is the
#       access log.
#   Reload (HUP) - The same check runs first. With a broken config the master
#       logs every problem, counts a failed reload and keeps the workers it has,
#       so the gateway goes on serving the config it had. gunicorn has no hook
#       before a reload (on_reload runs after the new config is read, and new
#       workers would boot on the broken file), so on_starting wraps the
#       master's reload.
#   Hand-over - Workers never read the config file. The check writes the text
#       it accepted and the environment values it resolved to an unlinked
#       temporary file; the master keeps it open and names its descriptor in
#       GATEWAY_CHECKED_CONFIG_FD, and every worker it forks builds from it.
#       So a worker that boots later (a crash, max_requests, a reload) serves
#       the config the master last accepted, whatever the file holds now:
#       edited, broken or deleted. A refused reload keeps the old one.
#   Metrics - prometheus_client's multiprocess mode: each worker writes its
#       counts to files in PROMETHEUS_MULTIPROC_DIR (a new temporary folder, or
#       the one named, emptied) and a scrape of /metrics sums them. child_exit
#       drops an exited worker's live gauges and folds its counters and
#       histograms into one file per kind, so the folder holds a few files per
#       live worker however often workers are replaced.
#   post_worker_init - Each worker's error log gets _QuietRequestText (the
#       workers are where requests are parsed); say when a worker has loaded
#       the app, not only forked.
#

_ROOT = os.path.dirname(os.path.abspath(__file__))
_CHECK = [sys.executable, "-m", "flask", "--app", "gateway", "check-config"]
_HANDED_OVER = "GATEWAY_CHECKED_CONFIG_FD"


def on_starting(server):
    server.gateway_checked_fd = None
    if _check(server, stdout=sys.stderr).returncode:
        print("gateway: not starting until the config is fixed", file=sys.stderr)
        sys.exit(1)
    _fresh_metrics_folder(server)
    reload = server.reload
    server.reload = lambda: _checked_reload(server, reload)


def _check(server, **run):
    """Check the config file as it is now; if it passes, hand what was checked to new workers."""
    fd, path = tempfile.mkstemp(prefix="gateway-config-")
    os.unlink(path)  # nobody can edit or delete it now; it lives while a process holds it open
    env = {k: v for k, v in os.environ.items() if k != _HANDED_OVER}  # the check reads the file
    accepted = False
    try:
        check = subprocess.run(
            [*_CHECK, "--hand-over", str(fd)], cwd=_ROOT, env=env, pass_fds=(fd,), **run
        )
        accepted = check.returncode == 0
    finally:
        if not accepted:
            os.close(fd)
    if accepted:
        if server.gateway_checked_fd is not None:
            os.close(server.gateway_checked_fd)  # workers built from it keep their own copy
        server.gateway_checked_fd = fd
        os.environ[_HANDED_OVER] = str(fd)  # forked workers inherit the variable and the file
    return check


def _checked_reload(server, reload):
    try:
        check = _check(server, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        check = subprocess.CompletedProcess(_CHECK, 1, "", "the config check took over 120 s\n")
    if check.returncode:
        server.log.error("gateway: reload refused, the workers keep the config they have:")
        for line in check.stderr.splitlines():
            server.log.error("gateway: %s", line)
        server.gateway_reloads.labels("failed").inc()
        return
    for line in check.stderr.splitlines():  # warnings
        server.log.warning("gateway: %s", line)
    server.log.info("gateway: the config is valid; reloading")
    server.gateway_reloads.labels("ok").inc()
    reload()


def _fresh_metrics_folder(server):
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    server.gateway_metrics_folder_made = not folder
    if folder:
        os.makedirs(folder, exist_ok=True)
        for path in glob.glob(os.path.join(folder, "*.db")):
            os.remove(path)
    else:
        folder = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # Imported only now: prometheus_client picks multiprocess mode at import,
    # from the variable, and the workers inherit the module as it is.
    from prometheus_client import Counter

    server.gateway_reloads = Counter(
        "gateway_config_reloads", "Config reloads on SIGHUP, by result.", ["result"], registry=None
    )
    for result in ("ok", "failed"):
        server.gateway_reloads.labels(result)


def post_worker_init(worker):
    worker.log.error_log.addFilter(_QuietRequestText())
    # After the app (and its config) loaded: the line says which workers serve
    # the config as it was when they booted, e.g. after a reload.
    worker.log.info("gateway: worker %s loaded the app", worker.pid)


def child_exit(server, worker):
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import mark_process_dead

    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    mark_process_dead(worker.pid, folder)
    # Exclusive lock on the folder: a scrape (shared lock) never sees the
    # worker's counts both folded and still in its own file, or in neither.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for kind in ("counter", "histogram"):
            own = os.path.join(folder, f"{kind}_{worker.pid}.db")
            if not os.path.exists(own):
                continue
            folded = os.path.join(folder, f"{kind}_exited.db")
            totals = defaultdict(float)
            for path in (folded, own):
                if os.path.exists(path):
                    for key, value, _, _ in MmapedDict.read_all_values_from_file(path):
                        totals[key] += value
            partial = os.path.join(folder, f"{kind}_exited.partial")
            if os.path.exists(partial):
                os.remove(partial)  # left by a master killed mid-fold: start it anew
            merged = MmapedDict(partial)
            for key, value in totals.items():
                merged.write_value(key, value, 0.0)
            merged.close()
            os.replace(partial, folded)
            os.remove(own)
    finally:
        os.close(fd)


def on_exit(server):
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if server.gateway_metrics_folder_made:
        shutil.rmtree(folder, ignore_errors=True)
