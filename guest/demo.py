"""``make demo``: a real Linux guest gives memory back to the host through vballoon.

Boots User-Mode Linux (a real Linux kernel run as a process) against ``vballoon serve``,
lets the guest use most of its memory, inflates the balloon to half the guest's memory,
shows the guest's and the host's view, the guest's statistics, deflates, and shuts down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from control.client import ControlClient, ServerUnavailable
from guest.uml import GuestConfig, UmlGuest

GUEST_MIB = 512
MIB = 1 << 20
VBALLOON = Path(sys.executable).with_name("vballoon")


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


def vballoon(*args: str) -> int:
    say(f"$ vballoon {' '.join(args)}")
    return subprocess.run([str(VBALLOON), *args]).returncode


def wait_for_server(control: str, server: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("vballoon serve exited early")
        try:
            with ControlClient(control, timeout=1.0) as client:
                client.request("status")
                return
        except (ServerUnavailable, OSError):
            time.sleep(0.02)      # polling with a deadline, not synchronisation
    raise SystemExit("vballoon serve did not come up")


def main() -> int:
    run = Path(tempfile.mkdtemp(prefix="vballoon-demo-"))
    vhost, control = str(run / "vhost.sock"), str(run / "control.sock")
    step("Start the device: vballoon serve (its worker will run jailed)")
    server = subprocess.Popen([str(VBALLOON), "serve", "--socket", vhost, "--control", control,
                               "--stats-interval", "1", "--log-level", "warning"])
    guest = None
    try:
        wait_for_server(control, server)
        step(f"Boot a real Linux guest with {GUEST_MIB} MiB (User-Mode Linux, its own virtio_balloon driver)")
        guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=vhost))
        guest.start()
        guest.wait_ready()
        say(f"guest up in {guest.boot_seconds:.2f} s; virtio_balloon {guest.balloon_state}")
        show(guest, "after boot")
        show_jail(control)

        step("The guest uses most of its memory, then frees it (the host keeps backing it)")
        guest.fill_memory(400)
        guest.free_memory()
        host_before = guest.host_ram_bytes()
        show(guest, "after use")

        with ControlClient(control) as client:
            half = client.request("status")["guest_memory_bytes"] // 2 // MIB
        step(f"Inflate the balloon to half the guest's memory: {half} MiB")
        if vballoon("set", f"{half}M", "--wait", "--control", control, "--timeout", "30") != 0:
            return 1
        show(guest, "with the balloon inflated")
        say("  (without DEFLATE_ON_OOM the guest's MemTotal shrinks by the balloon's size)")
        freed = host_before - guest.host_ram_bytes()
        say(f"host memory given back: {freed / MIB:.0f} MiB of {half} MiB ballooned")

        step("The guest's statistics, as the device received them")
        fresh_stats(control)
        vballoon("stats", "--control", control)

        step("Deflate: the guest gets its memory back")
        if vballoon("set", "0", "--wait", "--control", control, "--timeout", "30") != 0:
            return 1
        show(guest, "after deflating")
        step("Status")
        vballoon("status", "--control", control)
    finally:
        step("Shut down")
        if guest is not None:
            guest.stop()
            say("guest powered off")
        server.send_signal(signal.SIGTERM)
        say(f"vballoon serve exited with {server.wait(10)}")
    return 0


def fresh_stats(control: str, timeout: float = 5.0) -> None:
    """Ask the guest for new statistics and wait (bounded) until they have arrived."""
    with ControlClient(control) as client:
        before = client.request("stats", refresh=True)["updated_at"] or 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (client.request("stats")["updated_at"] or 0) > before:
                return
            time.sleep(0.02)      # polling with a deadline, not synchronisation


def show_jail(control: str) -> None:
    """What the kernel says about the worker that reads guest memory."""
    with ControlClient(control) as client:
        pid = client.request("status")["worker_pid"]
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    own_ns = all(os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
                 for ns in ("pid", "net", "mnt", "ipc", "uts"))
    say(f"  the jailed worker, pid {pid}: uid {status['Uid'].split()[0]}, "
        f"NoNewPrivs {status['NoNewPrivs']}, Seccomp {status['Seccomp']} (filter), "
        f"CapEff {status['CapEff']}, own pid/net/mount/ipc/uts namespaces: {own_ns}")


def show(guest: UmlGuest, when: str) -> None:
    info = guest.meminfo()
    say(f"  {when:<28} guest MemFree {info['MemFree'] / 1024:6.0f} MiB of "
        f"{info['MemTotal'] / 1024:.0f} MiB | host memory behind the guest "
        f"{guest.host_ram_bytes() / MIB:6.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
