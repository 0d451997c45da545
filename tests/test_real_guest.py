"""vballoon against a real Linux guest: User-Mode Linux and its own virtio_balloon driver.

Each test boots a guest (about 0.3 s) against ``vballoon serve`` and checks what a user of
the guest and of the host would see: the guest's MemFree, ``actual``, and the host memory
behind guest RAM (the RAM file UML passes in SET_MEM_TABLE).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from device.balloon import BalloonOptions
from guest.uml import GuestConfig, UmlGuest
from tests.driver import MIB, wait_for
from tests.guest_rig import (GUEST_MIB, JAIL, half_guest, kept_serve, kill_kept_serve,
                             needs_guest, start_rig, stop_rig)

pytestmark = needs_guest


@pytest.fixture
def rig(tmp_path):
    rig = start_rig(tmp_path)
    yield rig
    stop_rig(rig)


def test_inflate_to_half_frees_host_memory_and_deflate_gives_it_back(rig):
    rig.guest.fill_memory(180)                     # the guest dirties most of its RAM
    rig.guest.free_memory()
    host_before = rig.guest.host_ram_bytes()
    free_before = rig.mem_free_mib()
    target = half_guest(rig)

    result = rig.set(target)
    assert (result["outcome"], result["actual_bytes"]) == ("settled", target)
    freed = host_before - rig.guest.host_ram_bytes()
    assert freed >= 0.9 * target, f"host freed {freed / MIB:.0f} MiB of {target / MIB:.0f}"
    drop = free_before - rig.mem_free_mib()
    assert abs(drop - target / MIB) < 0.1 * target / MIB, f"guest MemFree dropped {drop:.0f} MiB"
    # A guest inflating as fast as it can stays well within its front-end's request budget.
    assert rig.control.request("status")["counters"]["frontend_pauses"] == 0

    result = rig.set(0)
    assert (result["outcome"], result["actual_bytes"]) == ("settled", 0)
    assert rig.mem_free_mib() > free_before - 0.05 * target / MIB
    rig.guest.fill_memory(150)                     # and the guest can use it again
    rig.guest.free_memory()


def test_stats_arrive_and_refresh(tmp_path):
    rig = start_rig(tmp_path, BalloonOptions(stats_interval=0.2))
    try:
        first = wait_for(lambda: rig.control.request("stats")["updated_at"], what="stats")
        stats = rig.control.request("stats")
        assert stats["total_memory"] > 200 * MIB
        assert 0 < stats["free_memory"] <= stats["total_memory"]
        wait_for(lambda: rig.control.request("stats")["updated_at"] > first, what="a refresh")
        rig.guest.fill_memory(100)
        wait_for(lambda: rig.control.request("stats")["free_memory"] < stats["free_memory"] - 80 * MIB,
                 what="stats to show the guest's new usage")
    finally:
        stop_rig(rig)


def test_free_page_reporting_frees_host_memory(tmp_path):
    rig = start_rig(tmp_path, BalloonOptions(free_page_reporting=True))
    try:
        rig.guest.fill_memory(150)
        before = rig.guest.host_ram_bytes()
        rig.guest.free_memory()
        wait_for(lambda: before - rig.guest.host_ram_bytes() > 100 * MIB, timeout=20,
                 what="reported free pages to be released on the host")
        assert "PAGE_REPORTING" in rig.control.request("status")["features"]
    finally:
        stop_rig(rig)


def test_deflate_on_oom_lets_the_guest_take_pages_back(tmp_path):
    rig = start_rig(tmp_path, BalloonOptions(deflate_on_oom=True))
    try:
        target = 160 * MIB
        assert rig.set(target)["outcome"] == "settled"
        # More than is left outside the balloon: only deflating it makes room.
        rig.guest.fill_memory(140, timeout=60)
        status = rig.control.request("status")
        assert status["actual_bytes"] < target
        assert "DEFLATE_ON_OOM" in status["features"]
    finally:
        stop_rig(rig)


@pytest.mark.skipif(not JAIL, reason="a worker thread cannot be SIGKILLed alone")
def test_worker_killed_mid_inflation_is_replaced_unnoticed(rig):
    rig.guest.fill_memory(150)
    rig.guest.free_memory()
    host_before = rig.guest.host_ram_bytes()
    device = rig.device()
    target = half_guest(rig)
    rig.control.request("set", size=target)
    killed = set()
    for _ in range(3):
        pid = wait_for(lambda: _live_worker_pid(device, killed), what="a live worker")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        # The operator's door stays open while the worker is replaced.
        assert rig.control.request("status")["state"] in ("active", "restarting")
    result = rig.control.request("wait", timeout=30.0, stall=10.0)
    assert (result["outcome"], result["actual_bytes"]) == ("settled", target)
    status = rig.control.request("status")
    assert status["worker_restarts"] >= 3 and status["state"] == "active"
    assert status["worker_pid"] not in killed
    assert "killed by signal SIGKILL" in (status["last_worker_exit"] or "")
    assert host_before - rig.guest.host_ram_bytes() >= 0.9 * target
    assert rig.guest.run("echo alive").strip() == "alive"          # the guest never noticed
    assert rig.set(0)["outcome"] == "settled"


def test_guest_rebinds_the_device_and_a_second_guest_connects(tmp_path):
    rig = start_rig(tmp_path)
    try:
        assert rig.set(32 * MIB)["outcome"] == "settled"
        assert rig.set(0)["outcome"] == "settled"
        rig.guest.run("echo virtio-uml.0 > /sys/bus/platform/drivers/virtio-uml/unbind")
        rig.guest.run("echo virtio-uml.0 > /sys/bus/platform/drivers/virtio-uml/bind")
        # UML drops the connection on unbind and connects anew on bind: a fresh device.
        wait_for(lambda: rig.server.server.connections == 2 and rig.device() is not None
                 and rig.device().state == "active", what="the device re-activated")
        assert rig.set(16 * MIB)["outcome"] == "settled"
        rig.guest.stop()
        wait_for(lambda: rig.control.request("status")["state"] == "waiting",
                 what="the server to see the guest gone")
        second = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=rig.options.socket_path))
        second.start()
        try:
            second.wait_ready()
            wait_for(lambda: rig.device() is not None and rig.device().state == "active",
                     what="the second guest's device")
            assert rig.set(16 * MIB)["outcome"] == "settled"
        finally:
            second.stop()
    finally:
        stop_rig(rig)


def test_driver_reload_resets_the_device(rig):
    """rmmod/insmod of the guest's driver: UML says nothing on removal and probes anew."""
    assert rig.set(32 * MIB)["outcome"] == "settled"
    rig.guest.run("rmmod virtio_balloon")             # the driver deflates on its way out
    rig.guest.run("insmod /lib/modules/virtio_balloon.ko")
    wait_for(lambda: rig.device().state == "active" and rig.device().config.actual == 32 * MIB // 4096,
             timeout=10, what="the new driver to inflate to the standing target")
    assert rig.set(0)["outcome"] == "settled"


@pytest.mark.skipif(not JAIL, reason="only a jailed worker has a jail to inspect")
def test_live_worker_holds_exactly_its_fds_and_is_jailed(rig):
    device = rig.device()
    session = rig.server.server.session
    pid = device.worker.pid
    expected = {_inode(f"/proc/self/fd/{fd}") for fd in
                [r.fd for r in session.state.regions]
                + [v.kick_fd for v in session.state.vrings[:3]]
                + [v.call_fd for v in session.state.vrings[:3]]}
    held = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        held[int(name)] = (_inode(path), os.readlink(path))
    others = {fd: link for fd, (inode, link) in held.items() if inode not in expected}
    assert {inode for inode, _ in held.values()} >= expected
    sockets = [fd for fd, link in others.items() if link.startswith("socket:")]
    assert len(sockets) == 1, f"unexpected fds: {others}"                 # the command socket
    assert {fd: link for fd, link in others.items() if fd not in sockets} == \
        {fd: "/dev/null" for fd in (0, 1, 2) if fd in others}
    status = _status(pid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[cap], 16) == 0
    for ns in ("pid", "net", "mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


def _live_worker_pid(device, killed: set[int]) -> int | None:
    worker = device.worker              # read once: the supervisor may clear it meanwhile
    if worker is None or device.state != "active" or worker.pid in killed:
        return None
    return worker.pid


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _serve(vhost, ctl) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--socket", str(vhost),
                             "--control", str(ctl), "--log-level", "warning"],
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_serve_crash_costs_the_guest_its_balloon_never_a_page_and_a_new_serve_serves(tmp_path):
    """What README's "What a serve crash costs each front-end" says of UML, as a test:
    SIGKILL to serve's whole process group (parent, zygote, worker) with 64 MiB in the
    balloon. The guest keeps running; UML drops the device with the balloon's pages in it,
    so they stay the host's (the guest's MemTotal stays 64 MiB lower, and filling the guest's
    memory does not bring the host memory behind them back); a new serve starts at once on
    the same sockets and serves a new guest."""
    from control.client import ControlClient
    vhost, ctl = tmp_path / "v.sock", tmp_path / "c.sock"
    server = _serve(vhost, ctl)
    guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=str(vhost)))
    second = None
    try:
        wait_for(lambda: ctl.exists(), what="serve's control socket")
        total_before, _ = _boot_and_balloon(guest, ctl, 64 * MIB)
        host_ballooned = guest.host_ram_bytes()
        assert "virtio" in guest.run("ls /sys/bus/virtio/devices/")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        # The guest runs on without its balloon device, and never gets those pages back.
        wait_for(lambda: "virtio" not in guest.run("ls /sys/bus/virtio/devices/ 2>/dev/null; true"),
                 what="UML to drop the device")
        assert guest.meminfo()["MemTotal"] <= total_before - 60 * 1024
        # Nearly everything the guest has left (MemTotal ~180 MiB: 150 was OOM-killed once).
        guest.fill_memory(130)
        guest.free_memory()
        ram_size = guest.ram_files()[0].size
        assert guest.host_ram_bytes() <= ram_size - 60 * MIB, \
            "a page the host freed was backed again: the guest used a ballooned page"
        assert host_ballooned <= ram_size - 60 * MIB
        # A new serve replaces the stale sockets and serves a new guest.
        second = _serve(vhost, ctl)
        wait_for(lambda: _answers(ctl), what="the new serve")
        with ControlClient(str(ctl)) as client:
            assert client.request("status")["state"] == "waiting"
        other = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=str(vhost)))
        try:
            other.start()
            other.wait_ready()
            with ControlClient(str(ctl)) as client:
                wait_for(lambda: client.request("status")["state"] == "active",
                         what="the new guest's activation")
                client.request("set", size=16 * MIB)
                assert client.request("wait", timeout=30.0, stall=5.0)["outcome"] == "settled"
        finally:
            other.stop()
    finally:
        guest.stop()
        for proc in (server, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _boot_and_balloon(guest: UmlGuest, ctl, size: int) -> tuple[int, int]:
    """Boot ``guest``, dirty and free most of its memory, inflate ``size`` through the
    serve on ``ctl``; its MemTotal (KiB) before, and the worker's pid."""
    from control.client import ControlClient
    guest.start()
    guest.wait_ready()
    guest.fill_memory(180)
    guest.free_memory()
    with ControlClient(str(ctl)) as client:
        wait_for(lambda: client.request("status")["state"] == "active", what="activation")
        total = guest.meminfo()["MemTotal"]
        client.request("set", size=size)
        assert client.request("wait", timeout=30.0, stall=5.0)["outcome"] == "settled"
        return total, client.request("status")["worker_pid"]


def _answers(ctl) -> bool:
    from control.client import ControlClient
    from control.errors import ControlError
    try:
        with ControlClient(str(ctl)) as client:
            client.request("status")
        return True
    except (ControlError, OSError):
        return False


def test_with_the_keeper_a_serve_crash_costs_the_guest_nothing(tmp_path):
    """``serve --keeper``: SIGKILL to serve (its zygote and worker die with it) with 64 MiB in
    the balloon. The keeper holds UML's connection; the new serve adopts it. The guest keeps
    its device and its balloon (MemTotal unchanged, the host memory still free), and the
    balloon deflates and inflates again through the new serve."""
    from control.client import ControlClient
    vhost, ctl = tmp_path / "v.sock", tmp_path / "c.sock"
    guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=str(vhost)))
    with kept_serve(vhost, ctl) as keeper:
        try:
            wait_for(lambda: _answers(ctl), what="serve")
            total, worker = _boot_and_balloon(guest, ctl, 64 * MIB)
            ram_size = guest.ram_files()[0].size
            assert guest.host_ram_bytes() <= ram_size - 60 * MIB
            kill_kept_serve(keeper)
            wait_for(lambda: _answers(ctl) and _state(ctl) == ("active", True), timeout=20,
                     what="the new serve serving the adopted connection")
            with ControlClient(str(ctl)) as client:
                status = client.request("status")
            assert status["worker_pid"] != worker
            assert (status["target_bytes"], status["actual_bytes"]) == (64 * MIB, 64 * MIB)
            assert "virtio" in guest.run("ls /sys/bus/virtio/devices/")  # the device is there
            assert guest.meminfo()["MemTotal"] <= total - 60 * 1024       # the balloon too
            assert guest.host_ram_bytes() <= ram_size - 60 * MIB
            with ControlClient(str(ctl)) as client:
                client.request("set", size=0)                             # it deflates ...
                assert client.request("wait", timeout=30.0, stall=5.0)["outcome"] == "settled"
                assert guest.meminfo()["MemTotal"] >= total - 1024
                guest.fill_memory(150)                                    # ... the guest uses it
                guest.free_memory()
                client.request("set", size=48 * MIB)                      # ... and inflates
                assert client.request("wait", timeout=30.0, stall=5.0)["outcome"] == "settled"
            assert guest.meminfo()["MemTotal"] <= total - 44 * 1024
        finally:
            guest.stop()


def _state(ctl) -> tuple[str, bool]:
    from control.client import ControlClient
    with ControlClient(str(ctl)) as client:
        status = client.request("status")
    return status["state"], status["connected"]
