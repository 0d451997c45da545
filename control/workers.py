"""Where a worker runs: in a jailed child (the default) or in a thread (debug, benchmarks).

Both are driven the same way: a ``WorkerHandle`` gives a pid, an fd that becomes readable
when the worker has ended, a way to stop it and the words for how it ended.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Protocol

import prctl

from control.jailed import spawn_jailed_worker
from device.balloon import SECCOMP_POLICY
from device.worker import run_worker


class WorkerHandle(Protocol):
    """How the supervisor drives a worker, wherever it runs. Nothing here waits, except
    ``stop`` (bounded by ``grace``), which only ``serve``'s shutdown uses."""

    pid: int

    def exit_fd(self) -> int:
        """An fd that becomes readable once the worker has ended."""
    def kill(self) -> None:
        """End it now (a jailed worker: SIGKILL, which also ends a stopped one)."""
    def reap(self) -> str | None:
        """After ``exit_fd`` fired: how it ended (None: not yet)."""
    def release(self) -> None:
        """Free what is left of an ended worker (its pidfds, its exit eventfd)."""
    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` for it to end, then kill it; release it."""
    def describe_exit(self) -> str: ...
    def denials(self) -> dict[str, int]: ...


class ThreadWorker:
    """The worker as a thread of this process: no jail, for debugging and for measuring
    what the jail costs. ``stop`` closes its socket; the worker ends on EOF."""

    def __init__(self, command: socket.socket) -> None:
        self.pid = os.getpid()
        self._fd = os.dup(command.fileno())
        self._exit = os.eventfd(0, os.EFD_CLOEXEC)
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="vballoon-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prctl.set_name("vballoon-worker")     # this thread's name, as tools see it
        try:
            run_worker(self._fd, owns_fds=False)
        finally:
            os.close(self._fd)
            os.eventfd_write(self._exit, 1)

    def exit_fd(self) -> int:
        return self._exit

    def kill(self) -> None:
        """A thread cannot be killed: it ends when its command socket closes (the
        supervisor closes its end)."""

    def reap(self) -> str | None:
        # The exit eventfd is written as the thread's last act: it is ending, not running.
        self._thread.join(1.0)
        return None if self._thread.is_alive() else self.describe_exit()

    def release(self) -> None:
        if self._exit >= 0 and not self._thread.is_alive():
            os.close(self._exit)        # only now: its thread no longer writes it
            self._exit = -1

    def stop(self, grace: float) -> None:
        self._thread.join(grace)
        if not self._thread.is_alive() and self._exit >= 0:
            os.close(self._exit)
            self._exit = -1

    def describe_exit(self) -> str:
        return "worker thread ended"

    def denials(self) -> dict[str, int]:
        return {}


def spawn_worker(command: socket.socket, keep_fds: list[int], options,
                 run_as: int | None = None, renumber: dict[int, int] | None = None) -> WorkerHandle:
    """Start a worker serving the command socket ``command`` (the child's end).

    ``keep_fds`` is everything the worker may hold. With ``options.jail`` it is forked into
    the jail with exactly those fds and the balloon's seccomp policy, as uid/gid ``run_as``.
    """
    if not options.jail:
        return ThreadWorker(command)
    return spawn_jailed_worker(command.fileno(), keep_fds, options.policy or SECCOMP_POLICY,
                               options.seccomp_mode, run_as, renumber)
