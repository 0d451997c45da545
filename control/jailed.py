"""The worker in a jailed child: the glue between the proxy and ``sandbox.jail``.

This is the one place where the device's declarations (its worker entry point and its
seccomp policy file) meet the jail, the way crosvm wires a device into a ``ProxyDevice``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from control.errors import WorkerError
from device.worker import run_worker
from sandbox.errors import JailError, WaitTimeout
from sandbox.jail import NOBODY, JailConfig, JailedChild, Limits, spawn
from sandbox.policy import Policy

log = logging.getLogger("vballoon.jail")

WORKER_NAME = "vballoon-worker"
# The worker's own heap (guest memory is a shared file mapping, not counted): on top of
# what it inherits from us at fork, the worker needs a few MiB; a hostile guest must not
# make it grow without bound.
WORKER_DATA_HEADROOM = 128 << 20


def worker_limits() -> Limits:
    """RLIMIT_DATA = this process's data size now (the worker inherits it) + headroom."""
    inherited = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                inherited = int(line.split()[1]) * 1024
    return Limits(data=inherited + WORKER_DATA_HEADROOM)


@functools.lru_cache(maxsize=4)
def load_policy(path: Path) -> Policy:
    """Parse a policy file once per process (it does not change while we run)."""
    return Policy.from_file(path)


class JailedWorker:
    """A ``WorkerHandle`` over a ``JailedChild``."""

    def __init__(self, child: JailedChild) -> None:
        self.child = child
        self.pid = child.pid

    def exit_fd(self) -> int:
        return self.child.fileno()

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the worker to end, then SIGKILL it and reap it,
        waiting at most ``grace`` more. A worker that still has not ended (a cgroup v1
        freezer holds SIGKILL until thawed) is left to the kernel: it dies with us
        (PDEATHSIG), and nothing here waits longer."""
        if self.child.poll() is None:
            try:
                self.child.wait(grace)
            except WaitTimeout:
                self.child.kill()
                try:
                    self.child.wait(grace)
                except WaitTimeout:
                    log.error("worker %d did not end after SIGKILL: left behind", self.pid)
                    return
        self.child.close()

    def kill(self) -> None:
        """SIGKILL now (it works on a stopped process too); ``stop`` reaps it."""
        if self.child.poll() is None:
            self.child.kill()

    def reap(self) -> str | None:
        status = self.child.poll()
        return None if status is None else status.describe()

    def release(self) -> None:
        self.child.close()

    def describe_exit(self) -> str:
        status = self.child.poll()
        return "still running" if status is None else status.describe()

    def denials(self) -> dict[str, int]:
        """Syscalls the policy would have denied (``--seccomp log`` only), by name."""
        return self.child.denials()


def spawn_jailed_worker(command_fd: int, keep_fds: list[int], policy_path: Path,
                        seccomp_mode: str, run_as: int | None = None,
                        renumber: dict[int, int] | None = None) -> JailedWorker:
    """Fork a jailed worker serving ``command_fd``; raises ``WorkerError`` if the jail fails.

    ``run_as``: the uid (and gid) it runs as (``control.worker_ids``): switched to as root,
    mapped into its user namespace (subordinate ids) otherwise; None: nobody as root, our
    own uid otherwise. ``renumber``: {our fd: its number in the worker} for every keep fd
    (``command_fd`` is the worker's number)."""
    root = os.geteuid() == 0
    try:
        config = JailConfig(keep_fds=keep_fds, name=WORKER_NAME,
                            seccomp=load_policy(policy_path), seccomp_mode=seccomp_mode,
                            run_as=NOBODY if run_as is None or not root else (run_as, run_as),
                            map_ids=None if run_as is None or root else (run_as, run_as),
                            limits=worker_limits(), renumber=renumber)
        return JailedWorker(spawn(lambda: run_worker(command_fd), config))
    except (JailError, ValueError) as exc:      # ValueError: an inconsistent JailConfig
        raise WorkerError(f"cannot start the jailed worker: {exc}") from exc
