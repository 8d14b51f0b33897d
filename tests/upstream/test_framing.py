"""A pooled upstream connection never falls out of step: no caller ever gets another's answer.

The upstream (tests/raw_upstream.py) writes interim answers, a 101, and wrongly
framed answers whose stray bytes are a whole answer naming ``smuggled``: a
connection reused out of step hands that, or the previous call's answer, to the
next call.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import requests

from gateway.config.load import parse_config
from gateway.errors import GatewayError
from gateway.policy.access import Client
from gateway.upstream.client import Call, Upstream, body_chunks

from ..live_gateway import LiveGateway
from ..raw_upstream import RawUpstream, body_for
from ..support import CANARIES, RAPID_KEY, base_config, write_config

INTERIMS = ["100", "102", "103", "103h", "102h", "103h.102h.100.103"]


@pytest.fixture(scope="module")
def raw_upstream():
    server = RawUpstream().start()
    yield server
    server.stop()


def _client(url: str) -> Client:
    config = base_config(url + "/v1")
    client, _ = parse_config(config, CANARIES).client_for(RAPID_KEY, datetime.now(UTC))
    assert client is not None
    return client


def _caller() -> str:
    return uuid.uuid4().hex[:12]


def _call(upstream: Upstream, client: Client, method: str, path: str, body: bytes | None = None):
    """Send one call through ``upstream``; return (status, headers, body) or the error code."""
    try:
        response = upstream.send(Call(client, method, path, "", {}, body))
    except GatewayError as exc:
        return exc.code
    return response.status_code, response.headers, b"".join(body_chunks(response, client))


@pytest.fixture
def pooled(raw_upstream):
    """An Upstream with a one-connection pool, and a call that checks it is still in step."""
    upstream = Upstream(pool_size=1, idle_bound=30.0)
    client = _client(raw_upstream.url)

    def next_call(reused: bool) -> None:
        caller = _caller()
        assert _call(upstream, client, "GET", f"/ok/-/{caller}")[2] == body_for(caller)
        # In step, a connection is reused; a connection in doubt was closed instead.
        assert (
            raw_upstream.arrived(caller)[0] > 1 if reused else raw_upstream.arrived(caller) == [1]
        )

    return upstream, client, next_call


# --- the Upstream alone: one pooled connection, calls one after another ------------


@pytest.mark.parametrize("interims", INTERIMS)
def test_interim_answers_are_skipped_and_the_connection_stays_in_step(pooled, interims):
    upstream, client, next_call = pooled
    for method in ("GET", "POST"):
        caller = _caller()
        status, _, body = _call(upstream, client, method, f"/interim/{interims}/{caller}", b"{}")
        assert (status, body) == (200, body_for(caller))
        next_call(reused=True)


def test_101_is_refused_and_its_connection_closed(pooled, raw_upstream):
    upstream, client, next_call = pooled
    caller = _caller()
    assert _call(upstream, client, "GET", f"/switch/-/{caller}") == "upstream_error"
    assert raw_upstream.arrived(caller) == [1]
    next_call(reused=False)


@pytest.mark.parametrize(("method", "interims"), [("GET", "103h"), ("POST", "102.103")])
def test_an_interim_answer_then_a_close_is_a_broken_call_never_sent_again(
    pooled, raw_upstream, method, interims
):
    # Even on a reused connection, and for a GET: the upstream read the call and
    # began answering, so this is the upstream failing, not a stale keep-alive close.
    upstream, client, next_call = pooled
    next_call(reused=False)  # a pooled connection for the call to reuse
    caller = _caller()
    path = f"/interim-close/{interims}/{caller}"
    assert _call(upstream, client, method, path, b"{}") == "upstream_error"
    assert len(raw_upstream.arrived(caller)) == 1
    assert raw_upstream.arrived(caller)[0] > 1
    next_call(reused=False)


@pytest.mark.parametrize(
    ("method", "arg", "status"),
    [
        ("HEAD", "200.length", 200),
        ("HEAD", "200.chunked", 200),
        ("GET", "204.length", 204),
        ("GET", "204.chunked", 204),
        ("GET", "304.length", 304),
        ("GET", "304.chunked", 304),
    ],
)
def test_a_bodiless_answer_that_announces_a_body_closes_its_connection(pooled, method, arg, status):
    upstream, client, next_call = pooled
    caller = _caller()
    got, headers, body = _call(upstream, client, method, f"/bodiless/{arg}/{caller}")
    assert (got, headers["X-Caller"], body) == (status, caller, b"")
    next_call(reused=False)


@pytest.mark.parametrize(
    ("script", "arg"),
    [
        ("both-framings", "chunked"),
        ("both-framings", "gzip, chunked"),
        ("lengths", "lines"),
        ("lengths", "list"),
    ],
)
def test_an_answer_framed_two_ways_is_refused_and_its_connection_closed(pooled, script, arg):
    upstream, client, next_call = pooled
    next_call(reused=False)
    assert _call(upstream, client, "GET", f"/{script}/{arg}/{_caller()}") == "upstream_error"
    next_call(reused=False)


@pytest.mark.parametrize("arg", ["length", "chunked"])
def test_bytes_after_a_whole_answer_never_reach_the_next_call(pooled, arg):
    # They came with the answer: read ahead with it and dropped (the connection is in
    # step), or seen waiting when the connection is next taken from the pool (closed).
    upstream, client, _ = pooled
    for _ in range(3):
        caller = _caller()
        assert _call(upstream, client, "GET", f"/overlong/{arg}/{caller}")[2] == body_for(caller)


@pytest.mark.parametrize("arg", ["close", "http10"])
def test_an_answer_that_ends_its_connection_is_not_reused(pooled, arg):
    upstream, client, next_call = pooled
    caller = _caller()
    assert _call(upstream, client, "GET", f"/closing/{arg}/{caller}")[2] == body_for(caller)
    next_call(reused=False)


@pytest.mark.parametrize("size", [1000, 8 * 1024 * 1024])
def test_an_answer_before_the_call_was_written_is_passed_on_and_its_connection_dropped(
    pooled, raw_upstream, size
):
    # The upstream answers 413 on the head alone and closes unread: a large body's
    # write fails (urllib3 swallows it to read this answer), a small one's does not.
    upstream, client, next_call = pooled
    next_call(reused=False)
    caller = _caller()
    got, _, body = _call(upstream, client, "POST", f"/early/0.1/{caller}", b"x" * size)
    assert (got, body) == (413, body_for(caller))
    assert len(raw_upstream.arrived(caller)) == 1
    next_call(reused=False)


# --- live: one gunicorn worker, concurrent callers, every body names its caller ------

FRAMING_KEY = "ck-test-framing-0123456789"

# (method, script and arg, expected): an int is a status whose body names its caller;
# "empty" a status with no body; a string an error code.
SCRIPTS = [
    *[("GET", f"interim/{i}", 200) for i in INTERIMS],
    ("POST", "interim/103h", 200),
    ("POST", "interim/102.103h.103", 200),
    ("GET", "interim-close/103h", "upstream_error"),
    ("POST", "interim-close/102", "upstream_error"),
    ("GET", "switch/-", "upstream_error"),
    ("HEAD", "bodiless/200.length", ("empty", 200)),
    ("GET", "bodiless/204.length", ("empty", 204)),
    ("GET", "bodiless/304.chunked", ("empty", 304)),
    ("GET", "both-framings/chunked", "upstream_error"),
    ("GET", "lengths/list", "upstream_error"),
    ("GET", "overlong/length", 200),
    ("GET", "overlong/chunked", 200),
    ("GET", "closing/close", 200),
    ("GET", "closing/http10", 200),
    ("GET", "ok/-", 200),
]


@pytest.fixture(scope="module")
def one_worker(raw_upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("framing-gateway")
    config = {
        "targets": {"raw": {"baseUrl": raw_upstream.url + "/v1"}},
        "clients": {
            FRAMING_KEY: {"target": "raw", "allowedMethods": ["*"], "allowedPaths": ["/**"]}
        },
    }
    live = LiveGateway(
        write_config(folder / "config.yaml", config), {}, folder / "gunicorn.log", workers=1
    ).start()
    yield live
    live.stop()


def _caller_run(gateway: LiveGateway, number: int) -> list[str]:
    """Make every scripted call once, in a random order; return what went wrong."""
    wrong = []
    scripts = SCRIPTS * 2
    random.Random(number).shuffle(scripts)
    with requests.Session() as session:
        for i, (method, script, expected) in enumerate(scripts):
            caller = f"live{number}-{i}"
            response = session.request(
                method,
                f"{gateway.url}/proxy/{script}/{caller}",
                headers={"Authorization": f"Bearer {FRAMING_KEY}"},
                data=b"{}" if method == "POST" else None,
                timeout=20,
            )
            if isinstance(expected, int):
                got = (response.status_code, response.content)
                want = (expected, body_for(caller))
            elif isinstance(expected, tuple):
                got = (response.status_code, response.headers.get("X-Caller"), response.content)
                want = (expected[1], caller, b"")
            else:
                got = (response.status_code, json.loads(response.content or b"{}").get("error"))
                want = (502, expected)
            if got != want:
                wrong.append(f"{method} {script} as {caller}: got {got}, wanted {want}")
    return wrong


def test_concurrent_callers_on_one_worker_each_get_their_own_answer(one_worker, raw_upstream):
    with ThreadPoolExecutor(max_workers=12) as pool:
        runs = list(pool.map(lambda n: _caller_run(one_worker, n), range(12)))
    wrong = list(itertools.chain.from_iterable(runs))
    assert wrong == [], f"{len(wrong)} wrong answers, e.g.:\n" + "\n".join(wrong[:10])
    # Every call reached the upstream once: none was resent, not even a GET.
    callers = [a.caller for a in raw_upstream.arrivals if a.caller.startswith("live")]
    assert len(callers) == len(set(callers)) == 12 * 2 * len(SCRIPTS)
