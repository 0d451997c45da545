"""Shared fixtures: real memfd guest memory, an in-process balloon and the fake driver."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core machines: wall-clock limits would measure the neighbours, not the code.
settings.register_profile("vballoon", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vballoon")

from device.balloon import Balloon, BalloonOptions
from tests.driver import MIB, BalloonDriver, GuestRam, linux_acks


@pytest.fixture
def ram():
    ram = GuestRam(64 * MIB)
    yield ram
    ram.close()


def make_inprocess(ram: GuestRam, options: BalloonOptions = BalloonOptions()):
    """An activated in-process balloon and a driver that services it synchronously."""
    balloon = Balloon(options)
    balloon.ack_features(linux_acks(balloon.device_features))
    driver = BalloonDriver(ram, balloon.queue_names(), balloon.acked_features,
                           write_config=balloon.write_config,
                           service=balloon.process_queue)
    balloon.activate([ram.region()], driver.specs())
    return balloon, driver


@pytest.fixture
def inprocess(ram):
    balloon, driver = make_inprocess(ram, BalloonOptions(free_page_reporting=True))
    yield balloon, driver
    balloon.reset()
    driver.close()
