"""A real QEMU/TCG guest boots, runs commands, and goes away cleanly.

The booting tests need the image built by ``bash guest/prepare_qemu.sh .cache/qemu``.
No vhost-user device here: these tests pin QEMU, the guest and its driver, so that
balloon tests through QEMU can trust them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.errors import GuestBootError, GuestCommandError, GuestNotPrepared
from guest.procfs import group_members
from guest.qemu import DEFAULT_QEMU_DIR, QemuConfig, QemuGuest, QemuImage

needs_qemu = pytest.mark.skipif(
    not (DEFAULT_QEMU_DIR / ".ready").exists(),
    reason=f"no QEMU guest image in {DEFAULT_QEMU_DIR}: run `bash guest/prepare_qemu.sh .cache/qemu`",
)


def qemu_test(func: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.guest(needs_qemu(func))


MEM_MIB = 512
MiB = 1024 * 1024
# Measured 4.7-6 s from exec to the ready marker under TCG on a 2-vCPU machine;
# the limit leaves room for a loaded CI neighbour.
BOOT_LIMIT_S = 30.0


@pytest.fixture(scope="module")
def guest() -> Iterator[QemuGuest]:
    """One guest without devices, shared by the tests that only run commands."""
    with QemuGuest(QemuConfig(mem_mib=MEM_MIB)) as g:
        yield g


@qemu_test
def test_guest_boots_and_runs_commands(guest: QemuGuest, record_property: Callable[[str, object], None]) -> None:
    assert guest.boot_seconds is not None
    record_property("qemu_boot_seconds", round(guest.boot_seconds, 3))
    print(f"QEMU/TCG boot to ready: {guest.boot_seconds:.2f} s")
    assert guest.boot_seconds < BOOT_LIMIT_S
    assert guest.run("echo hello; echo to-stderr >&2") == "hello\nto-stderr\n"
    assert guest.run("printf 'no newline'") == "no newline"
    assert guest.image is not None
    assert guest.run("uname -r").strip() == guest.image.versions["kernel_release"]
    assert guest.run("cat /sys/class/tty/console/active").split() == ["ttyS0"]


@qemu_test
def test_balloon_module_loads_without_a_device(guest: QemuGuest) -> None:
    assert guest.balloon_state in ("loaded", "builtin")
    assert "virtio_balloon" in guest.run("ls /sys/bus/virtio/drivers").split()


@qemu_test
def test_guest_sees_the_configured_memory(guest: QemuGuest) -> None:
    total_kib = guest.meminfo()["MemTotal"]
    # The kernel image, its early allocations and firmware holes stay out of MemTotal.
    assert (MEM_MIB - 64) * 1024 < total_kib <= MEM_MIB * 1024
    assert guest.ram_file_size() == MEM_MIB * MiB


@qemu_test
def test_failed_command_reports_status_and_output(guest: QemuGuest) -> None:
    with pytest.raises(GuestCommandError) as info:
        guest.run("echo partial; ls /does-not-exist")
    assert info.value.returncode == 1
    assert "partial" in info.value.output
    assert guest.run_status("exit 3") == (3, "")
    assert guest.run("echo still-alive") == "still-alive\n"


@qemu_test
def test_command_timeout_interrupts_and_guest_keeps_working(guest: QemuGuest) -> None:
    # ^C travels through QEMU's serial port to the shell's controlling tty.
    with pytest.raises(GuestCommandError) as info:
        guest.run("sleep 30", timeout=1.0)
    assert info.value.returncode is None
    assert guest.run("echo next", timeout=10) == "next\n"


@qemu_test
def test_fill_memory_grows_the_host_memfd(guest: QemuGuest) -> None:
    before = guest.host_ram_bytes()
    free_before = guest.meminfo()["MemFree"]
    guest.fill_memory(128)
    try:
        grown = guest.host_ram_bytes() - before
        # Some of the 128 MiB may land on pages the guest had touched before (measured:
        # 96-120 MiB of new host memory from one boot to the next).
        assert grown > 64 * MiB
        assert guest.meminfo()["MemFree"] < free_before - 120 * 1024
    finally:
        guest.free_memory()
    # This kernel keeps freed pages on its per-CPU lists (tens of MiB at 512 MiB, one
    # vCPU), which MemFree does not count.
    assert guest.meminfo()["MemFree"] + _pcp_kib(guest) > free_before - 16 * 1024
    # Freed in the guest is not freed on the host: that is the balloon's job.
    assert guest.host_ram_bytes() >= before + grown - 8 * MiB


def _pcp_kib(guest: QemuGuest) -> int:
    """Free pages parked on the guest's per-CPU page lists, in kB (/proc/zoneinfo "count:")."""
    zoneinfo = guest.run("cat /proc/zoneinfo")
    pages = sum(int(line.split()[1]) for line in zoneinfo.splitlines() if line.split()[:1] == ["count:"])
    return pages * 4


@qemu_test
def test_stop_powers_off_and_leaves_nothing_behind() -> None:
    g = QemuGuest(QemuConfig(mem_mib=128))
    with g:
        pid = g.pid
        assert pid is not None
        assert group_members(pid) == [pid], "QEMU runs alone in its own process group"
    assert g.stop() is None  # idempotent: already stopped by the with block
    assert group_members(pid) == []
    assert "reboot: Power down" in g.console_log()
    assert g.pid is None and not g.running


@qemu_test
def test_stop_kills_a_guest_that_ignores_poweroff() -> None:
    g = QemuGuest(QemuConfig(mem_mib=128))
    with g:
        pid = g.pid
        assert pid is not None
        # The shell stays busy (^C ignored), so "poweroff -f" is never read:
        # stop() falls back to SIGTERM, on which QEMU exits (with status 0).
        with pytest.raises(GuestCommandError):
            g.run("trap '' INT; sleep 60", timeout=0.5)
        g.stop(timeout=10)
    assert group_members(pid) == []
    assert "terminating on signal 15" in g.qemu_log()
    assert "reboot: Power down" not in g.console_log()


@qemu_test
def test_missing_vhost_socket_is_reported_before_boot(tmp_path: Path) -> None:
    g = QemuGuest(QemuConfig(vhost_socket=str(tmp_path / "absent.sock")))
    with pytest.raises(GuestBootError, match="must listen first"):
        g.start()
    assert g.pid is None


def test_unprepared_image_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GuestNotPrepared, match="prepare_qemu.sh"):
        QemuImage.load(tmp_path)


def test_command_line_adds_the_vhost_user_balloon_only_with_a_socket(tmp_path: Path) -> None:
    image = QemuImage(
        directory=tmp_path,
        qemu=tmp_path / "qemu",
        firmware_dirs=(tmp_path / "seabios", tmp_path / "share"),
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        versions={},
    )
    plain = QemuConfig(mem_mib=256).qemu_args(image)
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in plain
    assert plain[plain.index("-m") + 1] == "256M"
    assert "-chardev" not in plain and "-device" not in plain
    assert plain.count("-L") == 2

    args = QemuConfig(vhost_socket="/run/a,b.sock", num_vqs=4).qemu_args(image)
    assert args[args.index("-chardev") + 1] == "socket,id=vb,path=/run/a,,b.sock"
    assert args[args.index("-device") + 1] == (
        "vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=4,config_size=8"
    )
