"""Processes for the isolation tests: ``serve`` in a process of its own, and hostile
neighbours (a flooding front-end, a deaf one, a killer of the neighbour's worker) in others.

Each runs in its own interpreter so that what the healthy VM's prober measures is ``serve``,
not the test process's GIL shared with a busy neighbour (in one process, a flooding thread
made the prober wait for the GIL: median 1.1-1.8 ms per config read, worst 13 ms on CI).
Nothing here is niced or pinned: the flooder competes for the two CPUs as a real VMM would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, **popen)


class ServeProcess:
    """``serve(options)`` in a process of its own: VMs ``{name: socket}``, proxy
    options as keyword arguments. ``stop()`` sends SIGTERM and waits."""

    def __init__(self, control_path: str, vms: dict[str, str], **proxy) -> None:
        spec = json.dumps({"control": control_path, "vms": vms, "proxy": proxy})
        self.proc = _python("import sys; from tests.hostile import _serve; _serve(sys.argv[1])",
                            spec)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, f"serve exited with {self.proc.returncode}"


def _serve(spec_json: str) -> None:
    from control.proxy import ProxyOptions
    from control.server import ServeOptions, serve
    from control.vm import VmSpec
    spec = json.loads(spec_json)
    options = ServeOptions(control_path=spec["control"], proxy=ProxyOptions(**spec["proxy"]),
                           vms=tuple(VmSpec(name, path) for name, path in spec["vms"].items()))
    serve(options)


class Neighbour:
    """A hostile neighbour in its own process; ``ready()`` returns once it has begun."""

    def __init__(self, kind: str, socket_path: str, control_path: str, seconds: float) -> None:
        self.proc = _python("import sys; from tests.hostile import _neighbour; "
                            "_neighbour(*sys.argv[1:])", kind, socket_path, control_path,
                            str(seconds), stdout=subprocess.PIPE)

    def ready(self) -> None:
        assert self.proc.stdout.readline() == b"ready\n", "the neighbour did not start"

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self) -> None:
        try:
            assert self.proc.wait(30) == 0, "the neighbour failed"
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


def _neighbour(kind: str, socket_path: str, control_path: str, seconds: str) -> None:
    {"flood": _flood, "deaf": _deaf, "crash": _kill_worker, "stop": _kill_worker}[kind](
        kind, socket_path, control_path, float(seconds))


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _flood(kind: str, path: str, control: str, seconds: float) -> None:
    """A front-end that sends GET_CONFIG as fast as it can and reads every reply."""
    from control import vhost_user as vu
    from tests.frontend import Frontend
    front = Frontend(path)
    request = front.conn.send(vu.GetConfig(0, 16, 0))[0] * 64
    front.sock.setblocking(False)
    _ready()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            front.sock.send(request)
        except BlockingIOError:
            pass
        try:
            while front.sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
    front.close()


def _deaf(kind: str, path: str, control: str, seconds: float) -> None:
    """A front-end that asks and never reads a reply."""
    from control import vhost_user as vu
    from tests.frontend import Frontend
    front = Frontend(path)
    front.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = front.conn.send(vu.GetConfig(0, 256, 0))[0]
    front.sock.setblocking(False)
    _ready()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            front.sock.send(request)
        except BlockingIOError:
            time.sleep(0.01)
    front.close()


def _kill_worker(kind: str, path: str, control: str, seconds: float) -> None:
    """Kill (crash) or SIGSTOP (stop) the neighbour VM's worker four times, each time waiting
    for serve to replace it; the VM's front-end stays attached in the test process."""
    from control.client import ControlClient
    from tests.driver import wait_for
    with ControlClient(control) as client:
        def worker() -> int | None:
            return client.request("status", vm="hostile")["worker_pid"]
        _ready()
        for _ in range(4):
            pid = wait_for(worker, what="the neighbour's worker")
            os.kill(pid, signal.SIGKILL if kind == "crash" else signal.SIGSTOP)
            wait_for(lambda: worker() not in (None, pid), timeout=10,
                     what="the neighbour's worker replaced")
