"""nginx in front of gunicorn, with exactly the README's server block.

The http level turns gzip on for event streams, as many real nginx.conf files do.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from ..deploy_support import need, read_lockstep, readme_block, stop, substitute, wait_for
from ..live_gateway import LiveGateway, free_port
from ..support import CANARIES, CHAT_KEY, base_config, write_config

NGINX_CONFIG = """\
daemon off;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log;

events {{}}

http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;

    # What many nginx.conf files hold: compress text, event streams included.
    gzip on;
    gzip_min_length 1;
    gzip_types text/plain application/json text/event-stream;

    include {run}/gateway.conf;
    include {run}/buffering.conf;
}}
"""

AUTH = {"Authorization": f"Bearer {CHAT_KEY}"}


@pytest.fixture(scope="module")
def gateway_behind_nginx(module_fake_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nginx-gateway")
    # nginx is the one proxy in front: believe the hop it adds to X-Forwarded-For.
    raw = {**base_config(module_fake_upstream.url + "/v1"), "trustedProxies": 1}
    config = write_config(folder / "config.yaml", raw)
    # One worker: enough behind nginx, and up as soon as it answers.
    live = LiveGateway(config, CANARIES, folder / "gunicorn.log", workers=1).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def nginx(gateway_behind_nginx):
    binary = need("nginx", "nginx")
    # nginx's workers run as nobody when started as root: keep their files reachable.
    run = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
    run.chmod(0o755)
    port, buffering_port = free_port(), free_port()
    block = substitute(
        readme_block("# nginx site:"), {"127.0.0.1:8787": f"127.0.0.1:{gateway_behind_nginx.port}"}
    )
    (run / "gateway.conf").write_text(
        substitute(block, {"listen 80;": f"listen 127.0.0.1:{port};"})
    )
    # The same site where the location forgot `proxy_buffering off` and `gzip off`:
    # nginx then buffers and gzips event streams, unless the gateway says not to.
    buffering = substitute(
        block,
        {
            "listen 80;": f"listen 127.0.0.1:{buffering_port};",
            "upstream gateway {": "upstream gateway_buffered {",
            "proxy_pass http://gateway;": "proxy_pass http://gateway_buffered;",
            "proxy_buffering off;": "",
            "gzip off;": "",
        },
    )
    (run / "buffering.conf").write_text(buffering)
    (run / "nginx.conf").write_text(NGINX_CONFIG.format(run=run))
    log = run / "nginx.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "-c", str(run / "nginx.conf"), "-p", str(run)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/health", 15, "nginx", log)
        yield url, f"http://127.0.0.1:{buffering_port}"
    finally:
        stop(process)
        shutil.rmtree(run, ignore_errors=True)


def test_health_and_an_envelope_call(nginx, module_fake_upstream):
    nginx, _ = nginx
    assert requests.get(nginx + "/health", timeout=10).json() == {"ok": True}
    answer = requests.post(
        nginx + "/proxy",
        json={"method": "POST", "path": "/chat/completions", "body": {"model": "m"}},
        headers=AUTH,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert module_fake_upstream.last("/v1/chat/completions").headers["Authorization"] == (
        "Bearer " + CANARIES["CANARY_OPENAI"]
    )


def test_events_arrive_as_sent_with_gzip_on(nginx, module_fake_upstream):
    nginx, _ = nginx
    # "lockstep": the upstream sends an event only after the client got the last one,
    # so any buffering deadlocks and the read times out.
    response = requests.get(
        nginx + "/proxy/files/sse-lockstep?events=4", headers=AUTH, stream=True, timeout=5
    )
    assert read_lockstep(response, module_fake_upstream) == [
        b"data: 0",
        b"data: 1",
        b"data: 2",
        b"data: 3",
    ]
    # The block's `gzip off` wins over the http level's `gzip on`: bytes pass as sent.
    assert response.headers.get("Content-Encoding") is None


def test_the_access_log_shows_the_callers_address_not_nginxs(nginx, gateway_behind_nginx):
    nginx, _ = nginx
    host, port = nginx.removeprefix("http://").split(":")
    # The caller on 127.0.0.2, so its address differs from nginx's own (127.0.0.1),
    # and it claims another address: only the hop nginx adds is believed.
    connection = http.client.HTTPConnection(host, int(port), source_address=("127.0.0.2", 0))
    connection.request(
        "GET", "/health", headers={"X-Forwarded-For": "203.0.113.66", "X-Request-ID": "via-nginx-1"}
    )
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("X-Gateway-Request-Id") == "via-nginx-1"
    connection.close()
    assert gateway_behind_nginx.access_line("via-nginx-1")["remote"] == "127.0.0.2"


def test_the_gateway_keeps_events_flowing_where_the_location_buffers_and_gzips(
    nginx, module_fake_upstream
):
    _, buffered = nginx
    response = requests.get(
        buffered + "/proxy/files/sse-lockstep?events=3", headers=AUTH, stream=True, timeout=5
    )
    assert read_lockstep(response, module_fake_upstream) == [b"data: 0", b"data: 1", b"data: 2"]
