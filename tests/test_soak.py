"""Soak (issue 10, "done when"): a real guest inflates and deflates in a loop while its
worker is SIGKILLed, SIGSTOPped and cgroup-frozen at random, the front-end (the whole UML
process) pauses, and control clients flood. Afterwards the guest's memory holds what the
guest wrote, every page the balloon holds is freed on the host, and ``serve`` answered
every status request within 100 ms throughout.

``serve`` runs as its own process, and the latency probe and the floods run as their own
processes too, so what is measured is ``serve``, not this test's threads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.client import ControlClient
from guest.uml import GuestConfig, UmlGuest
from tests.driver import MIB, wait_for
from tests.guest_rig import needs_guest

pytestmark = [*needs_guest, pytest.mark.skipif(os.geteuid() != 0, reason="freezes cgroups")]

GUEST_MIB = 256
CHAOS_SECONDS = float(os.environ.get("VBALLOON_SOAK_SECONDS", "30"))
LATENCY_LIMIT = 0.100
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")

PROBE = r"""
import json, sys, time
from control.client import ControlClient
path, seconds = sys.argv[1], float(sys.argv[2])
worst, count, errors = 0.0, 0, []
end = time.monotonic() + seconds
with ControlClient(path) as client:
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            client.request("status")
        except Exception as exc:
            errors.append(repr(exc))
        worst = max(worst, time.monotonic() - start)
        count += 1
        time.sleep(0.02)
print(json.dumps({"worst": worst, "count": count, "errors": errors[:5]}))
"""

FLOOD = r"""
import random, socket, struct, sys, time
import msgpack
from control.wire import encode_frame
path, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
end = time.monotonic() + seconds
requests = [{"cmd": "status"}, {"cmd": "stats", "refresh": True}, {"cmd": "wait", "timeout": 0.2},
            {"cmd": "set", "size": -1}, {"cmd": "adjust", "pages": 1.5}, {"cmd": "nope" * 9000}]
while time.monotonic() < end:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.setblocking(False)
        for ident in range(rng.randrange(10, 300)):
            try:
                sock.send(encode_frame({"id": ident, **rng.choice(requests)}))
            except BlockingIOError:
                break                       # serve stopped reading us: fine, go away
        if rng.random() < 0.5:              # read some, or leave everything unread
            try:
                sock.recv(rng.randrange(1, 65536))
            except BlockingIOError:
                pass
        if rng.random() < 0.2:
            sock.send(struct.pack(">I", 60000) + b"\x81")   # half a frame, then hang up
    except OSError:
        pass
    finally:
        sock.close()
    time.sleep(rng.random() * 0.05)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


class Freezer:
    """A cgroup v2 the worker is moved into, to freeze and thaw it (``docker pause``)."""

    def __init__(self) -> None:
        self.path = CGROUP_ROOT / f"vballoon-soak-{os.getpid()}"
        self.path.mkdir()

    def freeze(self, pid: int) -> bool:
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError:
            return False                     # it just died
        (self.path / "cgroup.freeze").write_text("1")
        return True

    def thaw(self) -> None:
        (self.path / "cgroup.freeze").write_text("0")

    def close(self) -> None:
        self.thaw()
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        wait_for(lambda: not (self.path / "cgroup.procs").read_text().strip(), what="empty cgroup")
        self.path.rmdir()


def _status(path: str) -> dict:
    with ControlClient(path) as client:
        return client.request("status")


@pytest.mark.skipif(not (CGROUP_ROOT / "cgroup.controllers").exists(), reason="no cgroup v2")
def test_soak_real_guest_under_chaos(tmp_path):
    vhost, ctl = str(tmp_path / "vhost.sock"), str(tmp_path / "ctl.sock")
    serve = subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--socket", vhost,
                              "--control", ctl, "--stats-interval", "0.5",
                              "--log-level", "warning"],
                             stderr=open(tmp_path / "serve.log", "w"))
    guest = freezer = None
    helpers: list[subprocess.Popen] = []
    rng = random.Random(20261202)
    try:
        wait_for(lambda: os.path.exists(ctl), what="serve")
        guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB, vhost_socket=vhost))
        guest.start()
        guest.wait_ready()
        wait_for(lambda: _status(ctl)["state"] == "active", what="activation")
        # What the guest must find intact: 24 MiB of random data in guest RAM (tmpfs).
        guest.run("dd if=/dev/urandom of=/tmp/keep bs=1M count=24 2>/dev/null")
        checksum = guest.run("md5sum /tmp/keep", timeout=20).split()[0]
        guest.fill_memory(120)               # dirty most of the rest, so balloons free host memory
        guest.free_memory()
        freezer = Freezer()

        helpers.append(_python(PROBE, ctl, str(CHAOS_SECONDS)))
        helpers += [_python(FLOOD, ctl, str(CHAOS_SECONDS), str(seed)) for seed in range(2)]
        operator = ControlClient(ctl)
        actions: dict[str, int] = {}
        end = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < end:
            operator.request("set", size=rng.choice([0, 32, 64, 96, 128]) * MIB)
            action = rng.choice(["kill", "stop", "freeze", "pause-frontend", "none"])
            pid = operator.request("status")["worker_pid"]
            pause = rng.uniform(0.05, 0.5)
            if pid is None:
                action = "none"
            if action == "kill":
                os.kill(pid, signal.SIGKILL)
            elif action == "stop":
                os.kill(pid, signal.SIGSTOP)
                time.sleep(pause)
                os.kill(pid, signal.SIGCONT)
            elif action == "freeze":
                if freezer.freeze(pid):
                    time.sleep(pause)
                    freezer.thaw()
            elif action == "pause-frontend":
                os.kill(guest.pid, signal.SIGSTOP)        # the VMM stops reading replies
                time.sleep(pause)
                os.kill(guest.pid, signal.SIGCONT)
            actions[action] = actions.get(action, 0) + 1
            time.sleep(rng.uniform(0.1, 0.6))

        probe = json.loads(helpers[0].communicate(timeout=30)[0])
        for flood in helpers[1:]:
            flood.wait(30)
        # The guest settles on a balloon of 64 MiB: all of it freed on the host.
        target = 64 * MIB
        operator.request("set", size=target)
        result = operator.request("wait", timeout=30, stall=10)
        assert (result["outcome"], result["actual_bytes"]) == ("settled", target), result
        ram = guest.ram_files()[0]
        assert ram.allocated <= ram.size - target, \
            f"{ram.allocated / MIB:.0f} MiB of {ram.size / MIB:.0f} backed with {target >> 20} MiB ballooned"
        assert guest.run("md5sum /tmp/keep", timeout=20).split()[0] == checksum
        operator.request("set", size=0)
        assert operator.request("wait", timeout=30, stall=10)["outcome"] == "settled"
        guest.fill_memory(100)               # the guest can use all of it again
        guest.free_memory()
        assert guest.run("md5sum /tmp/keep", timeout=20).split()[0] == checksum
        status = operator.request("status")
        operator.close()

        assert probe["errors"] == [] and probe["count"] > CHAOS_SECONDS * 5
        assert probe["worst"] < LATENCY_LIMIT, f"serve took {probe['worst'] * 1000:.0f} ms"
        assert status["state"] == "active"
        print(f"soak: actions {actions}, {probe['count']} probes, worst "
              f"{probe['worst'] * 1000:.1f} ms, restarts {status['worker_restarts']}")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(5) == 0
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        if freezer is not None:
            freezer.close()
        if guest is not None:
            guest.stop()
        if serve.poll() is None:
            serve.kill()
            serve.wait()
