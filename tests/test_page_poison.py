"""Free page reporting for guests that zero or poison the pages they free (issue 15).

Linux's driver turns free page reporting off unless the device offers PAGE_POISON when the
guest runs with ``init_on_free=1`` (freed pages zeroed) or ``page_poison=1`` (freed pages
filled with 0xaa and checked when allocated again). Each test boots a real guest with one of
those and checks what an operator and the guest would see: the negotiated features, the
host memory behind guest RAM, and that the guest's data and its poison checks survive.
UML first (fast), then QEMU 11 (TCG) through its generic vhost-user device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from device.balloon import BalloonOptions
from guest.qemu import DEFAULT_QEMU_DIR
from tests.driver import MIB, wait_for
from tests.guest_rig import needs_guest, start_rig, stop_rig

REPORTING = BalloonOptions(free_page_reporting=True)
NO_POISON_OFFER = BalloonOptions(free_page_reporting=True, page_poison=False)
POISON = 0xAAAAAAAA          # Linux's PAGE_POISON byte, four times
NO_CONFIG = "built without CONFIG_PAGE_POISONING"

needs_qemu = [pytest.mark.guest,
              pytest.mark.skipif(not (DEFAULT_QEMU_DIR / ".ready").exists(),
                                 reason="no QEMU test bed: run `make qemu` (make test does)")]


@dataclass(frozen=True)
class Frontend:
    """How to boot a guest with kernel arguments against ``serve``, and stop it."""

    start: Callable
    stop: Callable
    fill_mib: int            # most of what the guest can allocate (UML 256 MiB, QEMU 512 MiB)


def _qemu_start(tmp_path, options, kernel_args):
    from tests import test_qemu_guest
    # config_size=16: poison_val lies at bytes 12-15 of config space; QEMU's generic device
    # passes on only the config bytes it is told exist.
    return test_qemu_guest.start_rig(tmp_path, options, num_vqs=4, config_size=16,
                                     kernel_args=kernel_args)


def _qemu_stop(rig) -> None:
    from tests import test_qemu_guest
    test_qemu_guest.stop_rig(rig)


UML = Frontend(lambda tmp_path, options, args: start_rig(tmp_path, options, kernel_args=args),
               stop_rig, 150)
QEMU = Frontend(_qemu_start, _qemu_stop, 300)
FRONTENDS = [pytest.param(UML, id="uml", marks=needs_guest),
             pytest.param(QEMU, id="qemu", marks=needs_qemu)]


def _fill_free_and_check(rig, fill_mib: int) -> None:
    """The guest keeps a checksummed file, fills and frees most of the rest (so pages are
    reported and reused), and its file still reads back exactly."""
    rig.guest.run("head -c 16777216 /dev/urandom > /tmp/keep && md5sum /tmp/keep > /tmp/keep.md5")
    rig.guest.fill_memory(fill_mib)
    rig.guest.free_memory()


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_init_on_free_guest_drops_reporting_unless_page_poison_is_offered(tmp_path, frontend):
    rig = frontend.start(tmp_path, NO_POISON_OFFER, ("init_on_free=1",))
    try:
        status = rig.control.request("status")
        assert "PAGE_REPORTING" not in status["features"], status["features"]
        assert "PAGE_POISON" not in status["features"]
        assert any("did not accept it" in w for w in status["warnings"]), status["warnings"]
    finally:
        frontend.stop(rig)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_init_on_free_guest_reports_and_frees_host_memory_with_page_poison(tmp_path, frontend):
    rig = frontend.start(tmp_path, REPORTING, ("init_on_free=1",))
    try:
        status = rig.control.request("status")
        assert {"PAGE_POISON", "PAGE_REPORTING"} <= set(status["features"]), status["features"]
        assert status["poison_val"] == 0 and status["warnings"] == []
        fill = frontend.fill_mib
        rig.guest.fill_memory(fill)
        before = rig.guest.host_ram_bytes()
        rig.guest.free_memory()
        wait_for(lambda: before - rig.guest.host_ram_bytes() > fill * MIB * 2 // 3, timeout=30,
                 what="reported free pages released on the host")
        _fill_free_and_check(rig, fill)
        assert rig.guest.run("md5sum -c /tmp/keep.md5").strip().endswith("OK")
        counters = rig.control.request("status")["counters"]
        assert counters["report_skipped_bytes"] == 0 and counters["reported_bytes"] > 0
    finally:
        frontend.stop(rig)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_page_poison_guest_reports_but_keeps_its_pages_and_sees_no_corruption(tmp_path, frontend):
    rig = frontend.start(tmp_path, REPORTING, ("page_poison=1",))
    try:
        status = rig.control.request("status")
        if "PAGE_POISON" not in status["features"]:
            # Only acceptable when the kernel says it does not know the parameter.
            boot_log = rig.guest.run("dmesg")
            assert 'Unknown kernel command line parameters "page_poison=1' in boot_log, \
                "the guest knows page_poison=1 but did not negotiate PAGE_POISON"
            pytest.skip(f"the guest kernel does not know page_poison=1 ({NO_CONFIG})")
        assert "PAGE_REPORTING" in status["features"]
        assert status["poison_val"] == POISON
        fill = frontend.fill_mib
        rig.guest.fill_memory(fill)
        before = rig.guest.host_ram_bytes()
        rig.guest.free_memory()
        wait_for(lambda: rig.control.request("status")["counters"]["report_skipped_bytes"]
                 >= 16 * MIB, timeout=30, what="reports of poisoned pages, kept")
        status = rig.control.request("status")
        assert status["counters"]["released_pages"] == 0       # nothing released: no balloon either
        assert rig.guest.host_ram_bytes() >= before - 4 * MIB
        assert any("0xaaaaaaaa" in w for w in status["warnings"]), status["warnings"]
        # The guest frees and reallocates most of its memory: every page it takes back from
        # its free lists is checked for the poison, and none may have changed.
        _fill_free_and_check(rig, fill)
        rig.guest.fill_memory(fill)
        assert rig.guest.run("md5sum -c /tmp/keep.md5").strip().endswith("OK")
        log = rig.guest.run("dmesg")
        assert "corruption" not in log.lower(), log[-2000:]
    finally:
        frontend.stop(rig)
