"""Operating the real gateway under gunicorn: access log lines, metrics over workers, HUP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..fake_upstream import FakeUpstream
from ..live_gateway import LiveGateway
from ..support import (
    AUTH,
    CANARIES,
    CHAT_KEY,
    READONLY_KEY,
    SLOW_KEY,
    base_config,
    write_config,
)

SCRAPE = {"Authorization": f"Bearer {CANARIES['CANARY_METRICS']}"}
NEW_KEY = "ck-test-added-by-reload-0123456789"


def rid() -> str:
    return f"test-{uuid.uuid4().hex}"


def scrape(live: LiveGateway) -> dict[tuple[str, frozenset], float]:
    response = requests.get(live.url + "/metrics", headers=SCRAPE, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def labels(**values: str) -> frozenset:
    return frozenset(values.items())


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Lockstep:
    """An SSE stream through the gateway whose upstream sends an event only when told."""

    def __init__(self, live: LiveGateway, upstream: FakeUpstream, events: int, **headers) -> None:
        self.upstream = upstream
        self.response = requests.get(
            live.url + f"/proxy/files/sse-lockstep?events={events}",
            headers={**AUTH, **headers},
            stream=True,
            timeout=30,
        )
        assert self.response.status_code == 200
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = b""
        self.received = 0

    def next_event(self) -> bytes:
        while b"\n\n" not in self._buffer:
            chunk = next(self._chunks)
            self.received += len(chunk)
            self._buffer += chunk
        event, self._buffer = self._buffer.split(b"\n\n", 1)
        self.upstream.release.release()
        return event

    def rest(self) -> bytes:
        for chunk in self._chunks:
            self.received += len(chunk)
            self._buffer += chunk
        return self._buffer


# --- the session's gateway ---------------------------------------------------------


def test_a_stream_is_logged_once_it_has_ended_with_its_whole_duration(live_gateway, fake_upstream):
    request_id = rid()
    stream = Lockstep(live_gateway, fake_upstream, 3, **{"X-Request-ID": request_id})
    assert stream.next_event() == b"data: 0"
    time.sleep(0.5)
    assert stream.next_event() == b"data: 1"
    assert request_id not in live_gateway.log_text()  # still streaming: no line yet
    assert stream.next_event() == b"data: 2"
    stream.rest()
    line = live_gateway.access_line(request_id)
    assert line["status"] == 200 and line["error"] is None
    assert (line["client"], line["target"], line["method"]) == ("client#1", "api", "GET")
    assert line["path"] == "/files/sse-lockstep"  # the upstream path, never the query
    assert line["upstream_status"] == 200
    assert line["bytes_out"] == stream.received
    assert line["duration_ms"] >= 500 > line["ttfb_ms"]
    assert line["remote"] == "127.0.0.1"


def test_the_upstreams_request_id_is_logged_and_passed_on(live_gateway, fake_upstream):
    request_id = rid()
    response = requests.post(
        live_gateway.url + "/proxy",
        json={"method": "POST", "path": "/chat/completions", "body": {"model": "m"}},
        headers={**AUTH, "X-Request-ID": request_id},
        timeout=10,
    )
    assert response.headers["x-request-id"] == "req-openai"
    assert response.headers["X-Gateway-Request-Id"] == request_id
    assert fake_upstream.last("/v1/chat/completions").headers["X-Request-ID"] == request_id
    line = live_gateway.access_line(request_id)
    assert line["upstream_request_id"] == "req-openai"
    assert line["bytes_in"] == len(response.request.body)
    assert line["bytes_out"] == len(response.content)


def test_refusals_and_gateway_routes_are_logged_and_keys_and_queries_are_not(live_gateway):
    marker = "qv-" + uuid.uuid4().hex
    # (asked, headers, status, code, the path logged: as asked before authentication,
    # the upstream path after it; never the query or a key)
    cases = [
        ("/health", {}, 200, None, "/health"),
        (
            f"/proxy/models?api_key={marker}",
            {"Authorization": f"Bearer {marker}"},
            401,
            None,
            "/proxy/models",
        ),
        (f"/proxy/admin?token={marker}", AUTH, 403, "path_not_allowed", "/admin"),
        (f"/nowhere/probed?q={marker}", {}, 404, "not_found", "/nowhere/probed"),
    ]
    for path, headers, status, code, logged in cases:
        request_id = rid()
        response = requests.get(
            live_gateway.url + path, headers={**headers, "X-Request-ID": request_id}, timeout=10
        )
        assert response.status_code == status
        line = live_gateway.access_line(request_id)
        assert (line["status"], line["path"]) == (status, logged)
        if code:
            assert line["error"] == code == response.json()["error"]
        assert response.headers["X-Gateway-Request-Id"] == request_id
    assert marker not in live_gateway.log_text()


def test_a_stream_cut_by_the_upstream_is_logged_with_its_error(live_gateway):
    request_id = rid()
    response = requests.get(
        live_gateway.url + "/proxy/cut-mid-event",
        headers={"Authorization": f"Bearer {SLOW_KEY}", "X-Request-ID": request_id},
        stream=True,
        timeout=10,
    )
    with contextlib.suppress(requests.exceptions.RequestException):
        response.content  # noqa: B018 - read to the cut (tests/edge/test_client_faults.py checks the client side)
    line = live_gateway.access_line(request_id)
    assert (line["status"], line["error"], line["upstream_status"]) == (200, "upstream_error", 200)


def test_forwarded_headers_are_ignored_without_trusted_proxies(live_gateway):
    request_id = rid()
    requests.get(
        live_gateway.url + "/health",
        headers={"X-Forwarded-For": "203.0.113.5", "X-Request-ID": request_id},
        timeout=10,
    )
    assert live_gateway.access_line(request_id)["remote"] == "127.0.0.1"


def test_gunicorns_own_errors_carry_a_request_id(live_gateway):
    response = requests.get(live_gateway.url + "/health?" + "a" * 9000, timeout=10)
    assert response.status_code == 414
    assert response.json()["request_id"] == response.headers["X-Gateway-Request-Id"]


# --- a gateway of its own: metrics over workers, and reloads -------------------------


def observed_config(upstream: FakeUpstream) -> dict:
    config = base_config(upstream.url + "/v1")
    config["secrets"]["metrics"] = "${CANARY_METRICS}"
    config["metrics"] = {"tokenRef": "metrics"}
    return config


def start(tmp_path, upstream: FakeUpstream) -> tuple[LiveGateway, str]:
    config = write_config(tmp_path / "config.yaml", observed_config(upstream))
    folder = tmp_path / "metrics"
    env = {**CANARIES, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    live = LiveGateway(config, env, tmp_path / "error.log", tmp_path / "access.log")
    return live.start(), str(folder)


def chat_count(live: LiveGateway) -> float:
    found = scrape(live)
    return found.get(
        ("gateway_requests_total", labels(client="client#1", target="api", status="200")), 0
    )


def test_metrics_are_summed_over_workers_and_kept_when_workers_exit(tmp_path, module_fake_upstream):
    live, folder = start(tmp_path, module_fake_upstream)
    try:

        def one(_):
            return requests.get(live.url + "/proxy/models", headers=AUTH, timeout=10).status_code

        sent = 0
        # New connections in parallel until both workers have answered some.
        while not all(
            os.path.exists(os.path.join(folder, f"counter_{pid}.db")) for pid in live.worker_pids()
        ):
            with ThreadPoolExecutor(16) as pool:
                assert set(pool.map(one, range(32))) == {200}
            sent += 32
            assert sent < 32 * 20, "one worker answered everything"
        assert chat_count(live) == sent

        # Workers exit (as on a reload or a crash): their counts stay, their files go.
        for _ in range(5):
            victim = min(live.worker_pids())
            os.kill(victim, signal.SIGTERM)
            wait_until(
                lambda v=victim: v not in live.worker_pids() and len(live.worker_pids()) == 2,
                30,
                "a replacement worker",
            )
            with ThreadPoolExecutor(4) as pool:
                assert set(pool.map(one, range(8))) == {200}
            sent += 8
            assert chat_count(live) == sent
        files = sorted(os.listdir(folder))
        # Per live worker: counters, histograms, live gauges; the master's counter;
        # one folded file per kind for every worker that has exited.
        assert len(files) <= 2 * 3 + 1 + 2, files

        # In flight: one open stream, then none.
        stream = Lockstep(live, module_fake_upstream, 2)
        stream.next_event()
        in_flight = ("gateway_in_flight", labels(target="api"))
        assert scrape(live)[in_flight] == 1
        stream.next_event()
        stream.rest()
        wait_until(lambda: scrape(live)[in_flight] == 0, 10, "in_flight back to 0")
        for line in live.access_log_path.read_text().splitlines():
            assert line.startswith("{") and line.endswith("}")  # stdout is the access log only
    finally:
        live.stop()


def test_hup_with_a_broken_config_keeps_serving_then_a_fixed_one_applies(
    tmp_path, module_fake_upstream
):
    live, _ = start(tmp_path, module_fake_upstream)
    config_path = tmp_path / "config.yaml"
    try:
        workers = live.worker_pids()
        stream = Lockstep(live, module_fake_upstream, 4)
        assert stream.next_event() == b"data: 0"

        broken = observed_config(module_fake_upstream)
        broken["clients"][CHAT_KEY]["allowedPaths"] = []
        broken["clients"][NEW_KEY] = broken["clients"].pop(READONLY_KEY)
        broken["secrets"]["extra"] = "${NOT_SET_FOR_THIS_TEST}"
        write_config(config_path, broken)
        os.kill(live.process.pid, signal.SIGHUP)
        wait_until(lambda: "reload refused" in live.log_text(), 60, "the refused reload")
        time.sleep(1)  # a reload that went ahead anyway would be booting workers now
        log = live.log_text()
        assert 'allowedPaths: must not be empty; write ["/**"]' in log
        assert "environment variable NOT_SET_FOR_THIS_TEST is not set" in log
        assert live.process.poll() is None and live.worker_pids() == workers
        assert requests.get(live.url + "/proxy/models", headers=AUTH, timeout=10).ok
        readonly = {"Authorization": f"Bearer {READONLY_KEY}"}
        assert requests.get(live.url + "/proxy/models", headers=readonly, timeout=10).ok
        assert stream.next_event() == b"data: 1"  # the stream in flight goes on
        reloads = scrape(live)
        assert reloads["gateway_config_reloads_total", labels(result="failed")] == 1
        assert reloads["gateway_config_reloads_total", labels(result="ok")] == 0

        fixed = observed_config(module_fake_upstream)
        fixed["clients"][NEW_KEY] = fixed["clients"].pop(READONLY_KEY)
        write_config(config_path, fixed)
        os.kill(live.process.pid, signal.SIGHUP)
        new_key = {"Authorization": f"Bearer {NEW_KEY}"}

        def status(headers):
            return requests.get(live.url + "/proxy/models", headers=headers, timeout=10).status_code

        wait_until(lambda: status(new_key) == 200, 60, "the new key to work")
        wait_until(lambda: status(readonly) == 401, 30, "the removed key to be refused")
        assert status(AUTH) == 200
        # The stream began on the old config and ends on it, whole.
        assert stream.next_event() == b"data: 2"
        assert stream.next_event() == b"data: 3"
        assert stream.rest() == b""
        wait_until(lambda: not workers & live.worker_pids(), 30, "the old workers to exit")
        reloads = scrape(live)
        assert reloads["gateway_config_reloads_total", labels(result="failed")] == 1
        assert reloads["gateway_config_reloads_total", labels(result="ok")] == 1
        assert live.process.poll() is None
        assert "Traceback" not in live.log_text()
    finally:
        live.stop()


@pytest.mark.parametrize(
    "request_text",
    [
        f"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Bearer {CHAT_KEY}\r\n\r\n",
        f"GET /health?key={CHAT_KEY} HTTP/1.1\r\nHost: x\r\nX-\x00: {CHAT_KEY}\r\n\r\n",
        f"GET /health?key={CHAT_KEY} HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
)
def test_requests_gunicorn_cannot_parse_are_logged_without_their_text(live_gateway, request_text):
    before = live_gateway.log_text().count("Invalid request from ip=")
    with socket.create_connection(("127.0.0.1", live_gateway.port), timeout=10) as sock:
        sock.sendall(request_text.encode("latin-1"))
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5"), answer
    wait_until(
        lambda: live_gateway.log_text().count("Invalid request from ip=") > before,
        10,
        "the log line",
    )
    assert CHAT_KEY not in live_gateway.log_text()


# --- workers serve the config the master accepted, never the file as it is now -----


def statuses(live: LiveGateway, key: str, calls: int = 20) -> list[int]:
    """Make ``calls`` calls with ``key``, each on a new connection (so on any worker)."""
    headers = {"Authorization": f"Bearer {key}"}
    return [
        requests.get(live.url + "/proxy/models", headers=headers, timeout=10).status_code
        for _ in range(calls)
    ]


def kill_every_worker(live: LiveGateway) -> None:
    """SIGKILL each worker, as a crash or the OOM killer would; wait for their replacements."""
    old = live.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not old & live.worker_pids() and len(live.loaded_workers()) == len(old),
        60,
        "new workers to load the app",
    )


def edited(upstream: FakeUpstream) -> dict:
    """A valid config that differs: READONLY_KEY's client now has NEW_KEY."""
    config = observed_config(upstream)
    config["clients"][NEW_KEY] = config["clients"].pop(READONLY_KEY)
    return config


@pytest.mark.parametrize("change", ["broken", "deleted", "edited"])
def test_workers_booting_later_serve_the_accepted_config_not_the_file(
    tmp_path, module_fake_upstream, change
):
    live, _ = start(tmp_path, module_fake_upstream)
    config_path = tmp_path / "config.yaml"
    try:
        if change == "broken":
            config_path.write_text("targets: {api: {baseURL: http://x}}\nclients: {}\n")
        elif change == "deleted":
            config_path.unlink()
        else:
            write_config(config_path, edited(module_fake_upstream))
        kill_every_worker(live)  # no HUP: nothing has accepted the change
        assert statuses(live, CHAT_KEY) == [200] * 20
        assert statuses(live, READONLY_KEY) == [200] * 20
        assert statuses(live, NEW_KEY, 5) == [401] * 5
        assert "config_invalid" not in live.log_text()
    finally:
        live.stop()


def test_workers_recycled_by_max_requests_serve_the_accepted_config(tmp_path, module_fake_upstream):
    config = write_config(tmp_path / "config.yaml", observed_config(module_fake_upstream))
    env = {**CANARIES, "GUNICORN_CMD_ARGS": "--max-requests 5"}
    live = LiveGateway(config, env, tmp_path / "error.log", tmp_path / "access.log").start()
    try:
        first = live.worker_pids()
        (tmp_path / "config.yaml").write_text("targets: {}\nclients: {}\nbogus: 1\n")
        # A worker answers 5 at most: at least 30 answers come from workers booted since.
        assert statuses(live, CHAT_KEY, 40) == [200] * 40
        assert first - live.worker_pids(), "max_requests recycled no worker"
    finally:
        live.stop()


def test_workers_after_a_refused_hup_keep_the_old_config_and_after_an_accepted_one_the_new(
    tmp_path, module_fake_upstream
):
    live, _ = start(tmp_path, module_fake_upstream)
    config_path = tmp_path / "config.yaml"
    try:
        config_path.write_text("targets: {api: {baseURL: http://x}}\nclients: {}\n")
        os.kill(live.process.pid, signal.SIGHUP)
        wait_until(lambda: "reload refused" in live.log_text(), 60, "the refused reload")
        kill_every_worker(live)
        assert statuses(live, CHAT_KEY) == [200] * 20
        assert statuses(live, READONLY_KEY) == [200] * 20

        write_config(config_path, edited(module_fake_upstream))
        workers = live.worker_pids()
        os.kill(live.process.pid, signal.SIGHUP)
        wait_until(lambda: "the config is valid; reloading" in live.log_text(), 60, "the reload")
        # Saved again while the new workers boot: they build from what was checked.
        config_path.write_text("targets: {}\nclients: {}\nbogus: 1\n")
        wait_until(lambda: not workers & live.worker_pids(), 60, "the old workers to exit")
        wait_until(lambda: len(live.loaded_workers()) == 2, 60, "the new workers")
        assert statuses(live, NEW_KEY) == [200] * 20
        assert statuses(live, READONLY_KEY) == [401] * 20

        config_path.unlink()  # the accepted config is still the new one
        kill_every_worker(live)
        assert statuses(live, NEW_KEY) == [200] * 20
        assert statuses(live, READONLY_KEY) == [401] * 20
        assert "config_invalid" not in live.log_text()
    finally:
        live.stop()


@pytest.mark.parametrize(
    "line",
    [
        f"Bearer {CHAT_KEY}",  # no colon: gunicorn names the whole line in its warning
        f": Bearer {CHAT_KEY}",
        f"Authori zation: Bearer {CHAT_KEY}",
    ],
)
def test_a_malformed_header_line_never_puts_a_key_in_the_log(live_gateway, line):
    with socket.create_connection(("127.0.0.1", live_gateway.port), timeout=10) as sock:
        sock.sendall(f"GET /proxy/models HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")
    marker = f"marker-{time.monotonic_ns()}"
    requests.get(f"{live_gateway.url}/health", headers={"X-Request-ID": marker}, timeout=10)
    deadline = time.monotonic() + 5
    while marker not in live_gateway.log_text():  # the log is written up to our marker
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Invalid request from ip=127.0.0.1" in live_gateway.log_text()
    assert CHAT_KEY not in live_gateway.log_text()
