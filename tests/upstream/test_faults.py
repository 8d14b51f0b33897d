"""Upstream faults against the real app under gunicorn: each gets a clear error, no worker dies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ..support import AUTH, FAULTS, SLOW, call_fault

pytestmark = pytest.mark.slow


def normal_call(gateway) -> int:
    return requests.post(
        gateway.url + "/proxy", json={"path": "/models"}, headers=AUTH, timeout=20
    ).status_code


@pytest.mark.parametrize(
    ("path", "headers", "expected"), FAULTS, ids=[f[0].split("/")[-1].split("?")[0] for f in FAULTS]
)
def test_each_upstream_fault_gets_a_clear_error(
    live_gateway, live_workers, path, headers, expected
):
    call_fault(live_gateway, path, headers, expected)


def test_slow_drip_within_the_read_timeout_passes_whole(live_gateway, live_workers):
    # 15 pieces 200 ms apart take 3 s, six times the 500 ms read timeout: never cut.
    response = requests.get(
        live_gateway.url + "/proxy/drip?pieces=15&gap=0.2", headers=SLOW, timeout=20
    )
    assert response.status_code == 200
    assert response.text == "".join(f"data: {i}\n\n" for i in range(15))


def test_a_hundred_normal_calls_succeed_after_the_faults(live_gateway, live_workers):
    for path, headers, expected in FAULTS:
        call_fault(live_gateway, path, headers, expected)
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda _: normal_call(live_gateway), range(100)))
    assert statuses == [200] * 100


def test_two_hundred_clients_during_a_fault_storm(live_gateway, live_workers):
    with ThreadPoolExecutor(max_workers=240) as pool:
        faults = [pool.submit(call_fault, live_gateway, *fault) for fault in FAULTS * 4]
        normal = [pool.submit(normal_call, live_gateway) for _ in range(200)]
        assert [f.result() for f in normal] == [200] * 200
        for fault in faults:
            fault.result()
