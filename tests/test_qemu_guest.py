"""A real Linux guest under QEMU 11 (TCG) with vballoon as its balloon, through QEMU's
generic ``vhost-user-test-device-pci`` (issue 11). Boots take ~8 s under TCG, so each rig
boots once and its tests share it; the UML tests stay as they are.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from control.client import ControlClient
from control.proxy import ProxyOptions
from control.server import ServeOptions
from device.balloon import BalloonOptions
from guest.qemu import DEFAULT_QEMU_DIR, QemuConfig, QemuGuest
from tests.driver import MIB, wait_for
from tests.frontend import ServerThread

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(not (DEFAULT_QEMU_DIR / ".ready").exists(),
                                 reason="no QEMU test bed: run `make qemu` (make test does)")]

GUEST_MIB = 512


@dataclass
class QemuRig:
    server: ServerThread
    guest: QemuGuest
    control: ControlClient
    options: ServeOptions

    def device(self):
        return self.server.server.device

    def set(self, size: int) -> dict:
        self.control.request("set", size=size)
        return self.control.request("wait", timeout=60.0, stall=15.0)


def boot(server: ServerThread, options: ServeOptions, num_vqs: int, config_size: int = 8,
         kernel_args: tuple[str, ...] = ()) -> QemuGuest:
    guest = QemuGuest(QemuConfig(mem_mib=GUEST_MIB, vhost_socket=options.socket_path,
                                 num_vqs=num_vqs, config_size=config_size,
                                 kernel_args=kernel_args))
    guest.start()
    try:
        guest.wait_ready()
        assert guest.balloon_state in ("loaded", "builtin"), guest.console_log()
        wait_for(lambda: server.server.device is not None
                 and server.server.device.state == "active", timeout=30,
                 what="the device activated by QEMU")
    except BaseException:
        guest.stop()
        raise
    return guest


def start_rig(tmp_path, balloon: BalloonOptions, num_vqs: int, config_size: int = 8,
              kernel_args: tuple[str, ...] = ()) -> QemuRig:
    options = ServeOptions(str(tmp_path / "vhost.sock"), str(tmp_path / "ctl.sock"), balloon,
                           ProxyOptions(jail=True))
    server = ServerThread(options)
    try:
        guest = boot(server, options, num_vqs, config_size, kernel_args)
    except BaseException:
        server.stop()
        raise
    return QemuRig(server, guest, ControlClient(options.control_path), options)


def stop_rig(rig: QemuRig) -> None:
    rig.control.close()
    rig.guest.stop()
    rig.server.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[QemuRig]:
    rig = start_rig(tmp_path_factory.mktemp("qemu"), BalloonOptions(), num_vqs=3)
    yield rig
    stop_rig(rig)


def test_a_normal_boot_restarts_no_worker(rig):
    """QEMU swaps every call fd right after the device starts: the live worker takes
    them (issue 11.3), so nothing restarts."""
    status = rig.control.request("status")
    assert status["state"] == "active" and status["worker_restarts"] == 0
    assert status["guest_memory_bytes"] == GUEST_MIB * MIB


def test_inflate_and_deflate_free_and_return_host_memory(rig):
    rig.guest.fill_memory(300)                  # dirty the memory the balloon will take
    rig.guest.free_memory()
    before = rig.guest.host_ram_bytes()
    target = 256 * MIB
    result = rig.set(target)
    assert (result["outcome"], result["actual_bytes"], result["target_bytes"]) == \
        ("settled", target, target)
    freed = before - rig.guest.host_ram_bytes()
    assert freed >= 0.9 * target, f"host freed {freed / MIB:.0f} of {target / MIB:.0f} MiB"
    result = rig.set(0)
    assert (result["outcome"], result["actual_bytes"]) == ("settled", 0)
    rig.guest.fill_memory(300)                  # and the guest can use all of it again
    rig.guest.free_memory()
    assert rig.control.request("status")["worker_restarts"] == 0


def test_stats_arrive_and_refresh(rig):
    first = wait_for(lambda: rig.control.request("stats")["updated_at"], timeout=20,
                     what="the first stats")
    fresh = rig.control.request("stats", refresh=True, timeout=10)
    assert fresh["updated_at"] > first and fresh["refresh_requested"] is True
    assert 0 < fresh["free_memory"] <= fresh["total_memory"] <= GUEST_MIB * MIB


def test_worker_killed_mid_inflation_completes(rig):
    rig.guest.fill_memory(200)
    rig.guest.free_memory()
    target = 192 * MIB
    rig.control.request("set", size=target)
    victim = rig.device().worker.pid
    wait_for(lambda: rig.control.request("status")["actual_bytes"] > 0, timeout=30,
             what="inflation under way")
    os.kill(victim, signal.SIGKILL)
    result = rig.control.request("wait", timeout=60.0, stall=15.0)
    status = rig.control.request("status")
    assert (result["outcome"], result["actual_bytes"]) == ("settled", target)
    assert status["worker_restarts"] >= 1 and status["worker_pid"] != victim
    assert rig.set(0)["outcome"] == "settled"
    assert rig.guest.run("echo alive").strip() == "alive"


def test_jailed_worker_holds_only_guest_memory_rings_and_its_socket(rig):
    pid = rig.device().worker.pid
    targets = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    memory = [t for t in targets if t.startswith("/memfd:")]
    events = [t for t in targets if t == "anon_inode:[eventfd]"]
    sockets = [t for t in targets if t.startswith("socket:")]
    null = [t for t in targets if t == "/dev/null"]
    # QEMU's guest RAM memfd once; a kick and a call eventfd per queue (3); the command
    # socket; 0/1/2 on /dev/null. Nothing else.
    assert len(memory) == 1 and len(events) == 6 and len(sockets) == 1 and len(null) == 3
    assert len(targets) == 11, targets


@pytest.fixture(scope="module")
def reporting_rig(tmp_path_factory) -> Iterator[QemuRig]:
    rig = start_rig(tmp_path_factory.mktemp("qemu-fpr"),
                    BalloonOptions(free_page_reporting=True), num_vqs=4)
    yield rig
    stop_rig(rig)


def test_free_page_reporting_frees_host_memory(reporting_rig):
    rig = reporting_rig
    assert "PAGE_REPORTING" in rig.control.request("status")["features"]
    rig.guest.fill_memory(256)
    before = rig.guest.host_ram_bytes()
    rig.guest.free_memory()
    # Linux reports freed 4 MiB blocks about 2 s after they are freed.
    wait_for(lambda: before - rig.guest.host_ram_bytes() >= 128 * MIB, timeout=30,
             what="reported pages freed on the host")
    # The worker sends its counters at most every 0.2 s: the last report may still be on its way.
    wait_for(lambda: rig.control.request("status")["counters"]["reported_bytes"] >= 128 * MIB,
             timeout=5, what="the reports counted")


def test_a_second_guest_after_the_first_disconnects(reporting_rig):
    rig = reporting_rig
    first = rig.server.server.connections
    rig.guest.stop()
    wait_for(lambda: rig.control.request("status")["state"] == "waiting", timeout=15,
             what="the first guest gone")
    rig.guest = boot(rig.server, rig.options, num_vqs=4)
    assert rig.server.server.connections == first + 1
    rig.guest.fill_memory(100)
    rig.guest.free_memory()
    result = rig.set(64 * MIB)
    assert (result["outcome"], result["actual_bytes"]) == ("settled", 64 * MIB)
    assert rig.control.request("status")["worker_restarts"] == 0


def test_config_size_left_at_zero_is_named_in_the_log(tmp_path, caplog):
    """QEMU's default config_size=0: the guest reads num_pages 0xFFFFFFFF from QEMU itself
    and inflates everything. vballoon never sees a config read, only the inflation, and
    names the fix (issue 11.7)."""
    options = ServeOptions(str(tmp_path / "vhost.sock"), str(tmp_path / "ctl.sock"),
                           BalloonOptions(), ProxyOptions(jail=True))
    server = ServerThread(options)
    guest = QemuGuest(QemuConfig(mem_mib=256, vhost_socket=options.socket_path, config_size=0))
    try:
        with caplog.at_level("ERROR", logger="vballoon.device"):
            guest.start()
            guest.wait_ready()
            wait_for(lambda: any("config_size=8" in r.getMessage() for r in caplog.records),
                     timeout=20, what="the hint")
    finally:
        guest.stop()
        server.stop()


def test_with_the_keeper_a_serve_crash_costs_the_guest_nothing(tmp_path):
    """``serve --keeper`` under QEMU, which never reconnects by itself: SIGKILL to serve with
    128 MiB in the balloon. The keeper holds QEMU's connection, so QEMU never sees it drop;
    the new serve adopts it and the balloon deflates and inflates again."""
    from tests.guest_rig import kept_serve, kill_kept_serve
    from tests.test_real_guest import _answers, _state
    vhost, ctl = tmp_path / "v.sock", tmp_path / "c.sock"
    guest = QemuGuest(QemuConfig(mem_mib=GUEST_MIB, vhost_socket=str(vhost), num_vqs=3,
                                 config_size=8))
    with kept_serve(vhost, ctl) as keeper:
        try:
            wait_for(lambda: _answers(ctl), what="serve")
            guest.start()
            guest.wait_ready()
            with ControlClient(str(ctl)) as client:
                wait_for(lambda: client.request("status")["state"] == "active", timeout=30,
                         what="activation")
                guest.fill_memory(300)
                guest.free_memory()
                client.request("set", size=128 * MIB)
                assert client.request("wait", timeout=60.0, stall=15.0)["outcome"] == "settled"
            assert guest.ram_file_size() - guest.host_ram_bytes() >= 120 * MIB
            kill_kept_serve(keeper)
            wait_for(lambda: _answers(ctl) and _state(ctl) == ("active", True), timeout=30,
                     what="the new serve serving the adopted connection")
            with ControlClient(str(ctl)) as client:
                status = client.request("status")
                assert (status["target_bytes"], status["actual_bytes"]) == (128 * MIB, 128 * MIB)
                assert guest.ram_file_size() - guest.host_ram_bytes() >= 120 * MIB
                client.request("set", size=0)
                assert client.request("wait", timeout=60.0, stall=15.0)["outcome"] == "settled"
                guest.fill_memory(300)
                guest.free_memory()
                client.request("set", size=64 * MIB)
                assert client.request("wait", timeout=60.0, stall=15.0)["outcome"] == "settled"
            assert guest.run("echo alive").strip() == "alive"
        finally:
            guest.stop()
