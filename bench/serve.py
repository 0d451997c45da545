"""``vballoon serve`` as a subprocess, as an operator runs it, bounded and always cleaned up.

Every process this module starts is remembered until it is stopped, so ``stop_all`` (called
by ``bench.run`` on the way out, whatever happened) leaves nothing running.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.system import pinned
from control.client import ControlClient, ServerUnavailable
from control.errors import ControlError

_LIVE: set["ServeProcess"] = set()


def vballoon_command() -> list[str]:
    """The installed ``vballoon`` script next to this interpreter, else ``-m control.cli``."""
    script = Path(sys.executable).with_name("vballoon")
    return [str(script)] if script.exists() else [sys.executable, "-m", "control.cli"]


class ServeError(Exception):
    """``vballoon serve`` did not start or answer in time; carries the tail of its log."""


class ServeProcess:
    """One ``vballoon serve --socket S --control C [--no-jail]`` on ``cpus``.

    ``start`` forks it from a thread pinned to ``cpus``, so the server, its supervisor
    thread and the worker it forks all inherit the placement from their first instruction.
    """

    def __init__(self, workdir: Path, name: str, jail: bool, cpus: set[int] | None,
                 extra_args: tuple[str, ...] = (), vms: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.name = name
        self.vms = vms                  # served with --vm NAME=SOCKET each, instead of --socket
        self.socket_path = str(workdir / f"{name}.vhost")
        self.control_path = str(workdir / f"{name}.ctl")
        self.log_path = workdir / f"{name}.log"
        self.jail = jail
        self.cpus = cpus
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        where = [arg for vm in self.vms for arg in ("--vm", f"{vm}={self.vm_socket(vm)}")] \
            if self.vms else ["--socket", self.socket_path]
        args = [*vballoon_command(), "serve", *where, "--control", self.control_path,
                "--log-level", "warning"]
        if not self.jail:
            args.append("--no-jail")
        args.extend(self.extra_args)
        with open(self.log_path, "ab") as log:
            with pinned(self.cpus or os.sched_getaffinity(0)):
                self.started = time.monotonic()
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, close_fds=True,
                                             start_new_session=True)
        _LIVE.add(self)

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Poll the control socket until ``status`` answers; seconds since ``start``.

        Raises ServeError if the server exits or does not answer within ``timeout``.
        """
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServeError(f"vballoon serve exited with {self.proc.returncode}: "
                                 f"{self.log_tail()}")
            try:
                with ControlClient(self.control_path, timeout=2.0) as client:
                    client.request("list")
                return time.monotonic() - self.started
            except (ServerUnavailable, OSError, TimeoutError):
                pass
            if time.monotonic() >= deadline:
                raise ServeError(f"vballoon serve not ready after {timeout} s: {self.log_tail()}")
            time.sleep(0.002)

    def vm_socket(self, vm: str) -> str:
        return str(self.workdir / f"{self.name}-{vm}.vhost")

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.control_path, timeout=timeout)

    def wait_active(self, timeout: float = 5.0) -> dict:
        """Poll ``status`` until the device is active (a guest connected and set it up).

        Call it once the guest is up: its driver has set the device up by then, so
        ``timeout`` only covers the last steps, and a worker that cannot start (the
        server logs "failed to activate") ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                status = client.request("status")
                if status["state"] == "active" and status["worker_pid"]:
                    return status
                failure = self._activation_failure()
                if failure:
                    raise ServeError(failure)
                if time.monotonic() >= deadline or self.proc.poll() is not None:
                    raise ServeError(f"device not active after {timeout} s ({status['state']}): "
                                     f"{self.log_tail()}")
                time.sleep(0.01)

    def _activation_failure(self) -> str | None:
        """The server's own words if it logged that the worker could not be activated."""
        for line in reversed(self.log_tail(8000).splitlines()):
            if "failed to activate" in line or "refused activation" in line:
                return line.split(" failed: ", 1)[-1].strip()
        return None

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (the server stops its worker and removes its sockets), then SIGKILL to
        its whole process group. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                # Wait on a pidfd, not waitpid: until the leader is reaped its pid names the
                # group, so the SIGKILL below cannot hit a recycled process group.
                pidfd = os.pidfd_open(proc.pid)
                try:
                    proc.send_signal(signal.SIGTERM)
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(timeout * 1000)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)   # stragglers: the jailed worker
                    except ProcessLookupError:
                        pass
                finally:
                    os.close(pidfd)
            proc.wait(timeout)
        finally:
            _LIVE.discard(self)
            for path in (self.socket_path, self.control_path, *map(self.vm_socket, self.vms)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    for serve in list(_LIVE):
        try:
            serve.stop()
        except (OSError, subprocess.SubprocessError, ControlError):
            pass
