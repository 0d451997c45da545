"""The proxy: a balloon served by a separate worker, driven exactly like the in-process one."""

from __future__ import annotations

import os
import signal

import pytest

from control.errors import RequestError, WorkerError
from control.proxy import ACTIVE, FAILED, ProxyBalloon, ProxyOptions
from device.balloon import BalloonOptions
from device.stats import VIRTIO_BALLOON_S_MEMFREE
from tests.driver import MIB, PAGE, BalloonDriver, wait_for

MODES = [pytest.param(False, id="thread"), pytest.param(True, id="jailed")]


def make_proxy(ram, jail: bool, **proxy_options):
    proxy = ProxyBalloon(BalloonOptions(free_page_reporting=True),
                         ProxyOptions(jail=jail, **proxy_options))
    proxy.ack_features(proxy.device_features)
    driver = BalloonDriver(ram, proxy.queue_names(), proxy.acked_features,
                           write_config=proxy.write_config)
    return proxy, driver


@pytest.fixture(params=MODES)
def proxied(request, ram):
    proxy, driver = make_proxy(ram, request.param)
    proxy.activate([ram.region()], driver.specs())
    yield proxy, driver
    proxy.reset()
    driver.close()


def test_inflate_and_deflate_through_the_worker_free_host_memory(ram, proxied):
    proxy, driver = proxied
    ram.populate()
    proxy.set_target_bytes(16 * MIB)
    driver.inflate(16 * MIB // PAGE, batch=8)
    assert ram.host_bytes() == ram.size - 16 * MIB
    assert proxy.wait_settled(timeout=1).outcome == "settled"
    driver.deflate(8 * MIB // PAGE)
    assert proxy.config.actual == 8 * MIB // PAGE
    counters = proxy.request("state")["counters"]
    assert counters["inflated_pages"] == 16 * MIB // PAGE
    assert counters["deflated_pages"] == 8 * MIB // PAGE


def test_stats_reach_the_parent(proxied):
    proxy, driver = proxied
    driver.send_stats({VIRTIO_BALLOON_S_MEMFREE: 1234})
    wait_for(lambda: proxy.stats.values == {"free_memory": 1234}, what="first stats")
    assert proxy.request_stats()
    driver.refresh_stats({VIRTIO_BALLOON_S_MEMFREE: 4321})
    wait_for(lambda: proxy.stats.values == {"free_memory": 4321}, what="refreshed stats")
    assert proxy.request("state")["counters"]["stats_updates"] == 2


def test_size_requests_are_validated(ram, proxied):
    proxy, _ = proxied
    proxy.set_target_bytes(MIB)
    for bad in (lambda: proxy.set_target_bytes(-1),
                lambda: proxy.set_target_bytes(ram.size + PAGE),
                lambda: proxy.adjust_pages(-(MIB // PAGE) - 1),
                lambda: proxy.adjust_pages(-2**31),
                lambda: proxy.set_target_pages(2**32)):
        with pytest.raises(RequestError):
            bad()
    assert proxy.config.num_pages == MIB // PAGE
    assert proxy.adjust_pages(10) == MIB // PAGE + 10


def test_wait_settled_reports_a_stalled_guest(proxied):
    proxy, _ = proxied
    proxy.set_target_pages(100)
    result = proxy.wait_settled(timeout=5, stall=0.3)
    assert (result.outcome, result.actual_pages) == ("stalled", 0)


def test_kill_returns_state(proxied):
    proxy, driver = proxied
    driver.inflate(256)
    state = proxy.kill()
    assert state["next_avail"]["inflate"] == 1
    assert proxy.worker is None
