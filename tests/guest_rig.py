"""A real guest wired to ``vballoon serve``: shared by the real-guest and CLI tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from control.autopilot import Tuning
from control.client import ControlClient
from control.proxy import ProxyOptions
from control.server import ServeOptions
from device.balloon import BalloonOptions
from guest.uml import DEFAULT_IMAGE_DIR, GuestConfig, UmlGuest
from tests.driver import MIB, wait_for
from tests.frontend import ServerThread

needs_guest = [
    pytest.mark.guest,
    pytest.mark.skipif(not (DEFAULT_IMAGE_DIR / ".ready").exists(),
                       reason="no guest image: run `make guest` (make test does)"),
]

GUEST_MIB = 256
JAIL = os.environ.get("VBALLOON_TEST_JAIL", "1") != "0"


@dataclass
class Rig:
    server: ServerThread
    guest: UmlGuest
    control: ControlClient
    options: ServeOptions

    def device(self):
        return self.server.server.device

    def set(self, size: int) -> dict:
        self.control.request("set", size=size)
        return self.control.request("wait", timeout=30.0, stall=5.0)

    def mem_free_mib(self) -> float:
        return self.guest.meminfo()["MemFree"] / 1024


def start_rig(tmp_path, balloon: BalloonOptions = BalloonOptions(), name: str = "a",
              kernel_args: tuple[str, ...] = (), autopilot: Tuning = Tuning()) -> Rig:
    options = ServeOptions(str(tmp_path / f"vhost-{name}.sock"), str(tmp_path / f"ctl-{name}.sock"),
                           balloon, ProxyOptions(jail=JAIL), autopilot=autopilot)
    server = ServerThread(options)
    guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=options.socket_path,
                                 extra_args=kernel_args))
    guest.start()
    guest.wait_ready()
    assert guest.balloon_state in ("loaded", "builtin")
    wait_for(lambda: server.server.device is not None and server.server.device.state == "active",
             what="the device to be activated")
    return Rig(server, guest, ControlClient(options.control_path), options)


def stop_rig(rig: Rig) -> None:
    rig.control.close()
    rig.guest.stop()
    rig.server.stop()


def half_guest(rig: Rig) -> int:
    return rig.control.request("status")["guest_memory_bytes"] // 2 // MIB * MIB


@contextlib.contextmanager
def kept_serve(vhost, ctl) -> Iterator[subprocess.Popen]:
    """``vballoon serve --keeper`` on ``vhost`` and ``ctl`` in a session of its own; stopped
    with SIGTERM at the end (its whole group killed if it does not stop)."""
    keeper = subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--keeper",
                               "--socket", str(vhost), "--control", str(ctl),
                               "--log-level", "warning"], start_new_session=True)
    try:
        yield keeper
    finally:
        if keeper.poll() is None:
            keeper.send_signal(signal.SIGTERM)
            try:
                keeper.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(keeper.pid, signal.SIGKILL)
                keeper.wait(10)


def kill_kept_serve(keeper: subprocess.Popen) -> None:
    """SIGKILL the serve a keeper runs (its zygote and workers die with it)."""
    with open(f"/proc/{keeper.pid}/task/{keeper.pid}/children") as f:
        (serve,) = map(int, f.read().split())
    os.kill(serve, signal.SIGKILL)
