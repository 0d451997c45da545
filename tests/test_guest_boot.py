"""A real User-Mode Linux guest boots, runs commands, and goes away cleanly.

The booting tests need the image built by ``bash guest/prepare.sh .cache/guest``
(``make test`` builds it first). No vhost-user device here: these tests pin the
guest and its driver, so that balloon tests can trust them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.console import ConsoleLog
from guest.errors import ConsoleOverrun, GuestBootError, GuestCommandError, GuestNotPrepared
from guest.procfs import group_members
from guest.uml import DEFAULT_IMAGE_DIR, GuestConfig, GuestImage, UmlGuest

# Tests that boot UML carry the `guest` marker (slow, still run in CI) and skip only
# when the image is missing; the console-log tests below need no guest.
needs_guest = pytest.mark.skipif(
    not (DEFAULT_IMAGE_DIR / ".ready").exists(),
    reason=f"no guest image in {DEFAULT_IMAGE_DIR}: run `bash guest/prepare.sh .cache/guest` (make test does)",
)


def guest_test(func: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.guest(needs_guest(func))


MEM_MIB = 512
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def guest() -> Iterator[UmlGuest]:
    """One guest without devices, shared by the tests that only run commands."""
    with UmlGuest(GuestConfig(mem_mib=MEM_MIB)) as g:
        yield g


@guest_test
def test_guest_boots_quickly_and_runs_commands(guest: UmlGuest) -> None:
    assert guest.boot_seconds is not None and guest.boot_seconds < 10
    assert guest.run("echo hello; echo to-stderr >&2") == "hello\nto-stderr\n"
    assert guest.run("printf 'no newline'") == "no newline"
    assert guest.image is not None
    assert guest.run("uname -r").strip() == guest.image.versions["kernel_release"]


@guest_test
def test_balloon_module_loads_without_a_device(guest: UmlGuest) -> None:
    assert guest.balloon_state in ("loaded", "builtin")
    assert "virtio_balloon" in guest.run("ls /sys/bus/virtio/drivers").split()


@guest_test
def test_guest_sees_the_configured_memory(guest: UmlGuest) -> None:
    total_kib = guest.meminfo()["MemTotal"]
    # The kernel keeps its own image and early allocations out of MemTotal: ~10 MiB here.
    assert (MEM_MIB - 32) * 1024 < total_kib <= MEM_MIB * 1024


@guest_test
def test_failed_command_reports_status_and_output(guest: UmlGuest) -> None:
    with pytest.raises(GuestCommandError) as info:
        guest.run("echo partial; ls /does-not-exist")
    assert info.value.returncode == 1
    assert "partial" in info.value.output
    assert guest.run_status("exit 3") == (3, "")
    status, output = guest.run_status("if then")
    assert status == 2 and "syntax error" in output
    assert guest.run("echo still-alive") == "still-alive\n"


@guest_test
def test_command_timeout_interrupts_and_guest_keeps_working(guest: UmlGuest) -> None:
    with pytest.raises(GuestCommandError) as info:
        guest.run("sleep 30", timeout=0.5)
    assert info.value.returncode is None
    assert guest.run("echo next", timeout=5) == "next\n"


@guest_test
def test_commands_the_console_cannot_carry_are_refused(guest: UmlGuest) -> None:
    with pytest.raises(ValueError):
        guest.run("echo \x03")
    with pytest.raises(ValueError):
        guest.run("echo " + "x" * 5000)


@guest_test
def test_fill_memory_grows_the_host_ram_file(guest: UmlGuest) -> None:
    (ram,) = guest.ram_files()
    assert ram.size == MEM_MIB * MiB
    before = guest.host_ram_bytes()
    free_before = guest.meminfo()["MemFree"]
    guest.fill_memory(128)
    try:
        grown = guest.host_ram_bytes() - before
        # Some of the 128 MiB may land on pages the guest had touched before.
        assert grown > 96 * MiB
        assert guest.meminfo()["MemFree"] < free_before - 120 * 1024
    finally:
        guest.free_memory()
    assert guest.meminfo()["MemFree"] > free_before - 16 * 1024
    # Freed in the guest is not freed on the host: that is the balloon's job.
    assert guest.host_ram_bytes() >= before + grown - 8 * MiB


@guest_test
def test_stop_powers_off_and_leaves_nothing_behind() -> None:
    g = UmlGuest(GuestConfig(mem_mib=128))
    with g:
        pid, run_dir = g.pid, g.run_dir
        assert pid is not None and run_dir is not None
        assert group_members(pid), "UML runs in its own process group"
    assert g.stop() is None  # idempotent: already stopped by the with block
    assert group_members(pid) == []
    assert not os.path.exists(run_dir)
    assert "reboot: Power down" in g.console_log()


@guest_test
def test_stop_kills_a_guest_that_ignores_poweroff() -> None:
    g = UmlGuest(GuestConfig(mem_mib=128))
    with g:
        pid = g.pid
        assert pid is not None
        # The shell stays busy (^C ignored), so "poweroff -f" is never read.
        with pytest.raises(GuestCommandError):
            g.run("trap '' INT; sleep 60", timeout=0.3)
        status = g.stop(timeout=6)
    assert status != 0
    assert group_members(pid) == []


@guest_test
def test_missing_vhost_socket_is_reported_before_boot(tmp_path: Path) -> None:
    g = UmlGuest(GuestConfig(vhost_socket=str(tmp_path / "absent.sock")))
    with pytest.raises(GuestBootError, match="must listen first"):
        g.start()
    assert g.pid is None


def test_unprepared_image_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GuestNotPrepared, match="prepare.sh"):
        GuestImage.load(tmp_path)


# -- the console log, with a plain pipe standing in for UML ---------------------------


def _console_with(data: bytes, limit: int) -> ConsoleLog:
    """A ConsoleLog that has read all of ``data`` and reached EOF."""
    r, w = os.pipe()
    log = ConsoleLog(r, limit=limit)
    log.start()
    os.write(w, data)
    os.close(w)
    assert log.join(5.0)
    return log


def test_console_log_keeps_only_the_newest_bytes() -> None:
    log = _console_with(b"a" * 100 + b"tail-0123456789", limit=32)
    assert log.end == 115
    assert log.text() == ("a" * 100 + "tail-0123456789")[-32:]
    with pytest.raises(ConsoleOverrun):
        log.wait_for(re.compile(b"tail"), 0, time.monotonic() + 1)
    match = log.wait_for(re.compile(rb"tail-(\d+)"), 90, time.monotonic() + 1)
    assert match is not None and match.group(1) == b"0123456789"


def test_console_wait_for_gives_up_at_eof_and_at_the_deadline() -> None:
    log = _console_with(b"no marker here", limit=1024)
    assert log.eof
    assert log.wait_for(re.compile(b"marker!"), 0, time.monotonic() + 30) is None  # EOF: at once

    r, w = os.pipe()
    live = ConsoleLog(r, limit=1024)
    live.start()
    try:
        started = time.monotonic()
        assert live.wait_for(re.compile(b"never"), 0, started + 0.2) is None
        assert 0.2 <= time.monotonic() - started < 5
    finally:
        os.close(w)
        assert live.join(5.0)
