"""``vballoon serve --keeper``: a small process that keeps the guests' connections through a
``serve`` crash.

The keeper forks ``serve`` and holds what ``serve`` leaves with it (``control/handover.py``):
copies of every VM's vhost-user connection and of the fds that set its session up. A front-end
therefore never sees its connection drop when ``serve`` dies. The keeper then starts a new
``serve`` (at most ``MAX_RESTARTS`` within ``RESTART_WINDOW`` seconds), hands it the entries,
and the new ``serve`` adopts each connection: it replays the setup requests without answering
them, restores the target and ``actual``, and starts a worker that resumes every ring at the
used index in guest memory (so no buffer is applied twice and none is lost).

SIGTERM or SIGINT to the keeper stops ``serve`` (the signal is passed on) and then the keeper.
A ``serve`` that exits on its own with status 0 ends the keeper too; one that refuses its
configuration (``CONFIG_ERROR``) ends it with status 1, without a restart. The keeper runs no
threads: it waits in ``select`` on the handover socket and the child's pidfd, pauses
``BATCH`` s between looks at the records, and after a crash waits (bounded) for the old
``serve``'s processes to end. What it holds is forgotten, never handed on, once ``serve``
gave up on it (the shared flag) or a record was lost.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import signal
import socket
import time
from collections.abc import Callable

import prctl

from control.handover import Link, recv_record, send_record

log = logging.getLogger("vballoon.keeper")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
MAX_ENTRIES = 65536               # keys held (each VM: ~25 + its connection)
ORPHAN_GRACE = 2.0                # seconds a dead serve's processes get to end by themselves
BATCH = 0.02                      # seconds between looks at serve's records ...
BUSY = 32                         # ... unless the last look found this many (read on at once)
CONFIG_ERROR = 2                  # serve's exit status for a refused configuration: not retried


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Keeper:
    def __init__(self, serve: Callable[[Link], int]) -> None:
        self.serve = serve                     # runs in the child; returns its exit status
        self.entries: dict[str, tuple[bytes, list[int]]] = {}
        self.restarts: list[float] = []
        self.child: int | None = None
        self.pidfd = -1
        self.sock: socket.socket | None = None
        self.stopping = False
        self.eof = False                       # serve closed its end (it is exiting)
        self.flag: mmap.mmap | None = None     # set by serve when it gives up on us
        self.poisoned = False                  # a record was lost: nothing is kept any more

    # -- the entries ---------------------------------------------------------------------------

    def apply(self, op: str, key: str, blob: bytes, fds: list[int]) -> None:
        if op == "put":
            if key not in self.entries and len(self.entries) >= MAX_ENTRIES:
                log.error("more than %d entries: %s not kept", MAX_ENTRIES, key)
                self._close(fds)
                return
            self._forget(key)
            self.entries[key] = (blob, fds)
            return
        self._close(fds)
        if op == "drop":
            self._forget(key)
        elif op == "drop-prefix":
            for name in [k for k in self.entries if k.startswith(key)]:
                self._forget(name)
        else:
            log.warning("unknown op %r from serve: ignored", op)

    def _forget(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._close(old[1])

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    # -- the child -----------------------------------------------------------------------------

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.flag = mmap.mmap(-1, mmap.PAGESIZE)           # shared with the child
        self.poisoned = False
        pid = os.fork()
        if pid == 0:                                       # the new serve
            status = 1
            try:
                ours.close()
                for _, fds in self.entries.values():   # its copies come over the socket
                    self._close(fds)
                self.entries.clear()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                status = self.serve(Link(theirs, self.flag))
            except BaseException:
                log.exception("serve failed")
            finally:
                os._exit(status)
        theirs.close()
        self.child, self.sock, self.eof = pid, ours, False
        self.pidfd = os.pidfd_open(pid)
        log.info("serve started (pid %d), %d entries handed over", pid, len(self.entries))
        # The child reads these first thing, before it serves; a child that does not read
        # them in time is killed (and counts as a crash).
        ours.settimeout(10.0)
        try:
            for key, (blob, fds) in self.entries.items():
                send_record(ours, "entry", key, blob, tuple(fds))
            send_record(ours, "end", "")
        except OSError as exc:
            log.error("handing the entries over failed (%s): stopping that serve", exc)
            os.kill(pid, signal.SIGKILL)
        ours.setblocking(False)

    def _reap(self) -> int:
        _, status = os.waitpid(self.child, 0)
        os.close(self.pidfd)
        self.pidfd = -1
        self.child = None
        self._drain()                 # what it left before it died still counts
        self.sock.close()
        self.sock = None
        self.flag.close()
        self.flag = None
        self._reap_orphans()
        return status

    def _reap_orphans(self) -> None:
        """Wait until every process of the dead serve is gone: its zygote and workers die
        with it (parent-death signals) and, the keeper being a child subreaper, end as its
        children. A successor's worker must never serve a ring an old one still touches.
        Bounded: stragglers are killed after ORPHAN_GRACE s, and waited for as long again."""
        deadline = time.monotonic() + ORPHAN_GRACE
        killed = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return                                  # none left
            if pid:
                continue
            if time.monotonic() >= deadline:
                if killed:
                    log.error("processes of the dead serve outlive SIGKILL: starting anyway")
                    return
                for orphan in _children(os.getpid()):
                    log.warning("process %d of the dead serve is still there: killing it", orphan)
                    try:
                        os.kill(orphan, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
                deadline = time.monotonic() + ORPHAN_GRACE
            time.sleep(0.005)

    def _drain(self) -> int:
        """Apply what serve sent; how many records."""
        count = 0
        while True:
            try:
                record = recv_record(self.sock)
            except (BlockingIOError, InterruptedError):
                break
            except ValueError as exc:
                # A record lost (out of fds, truncated): what we hold may now be stale, and a
                # successor must never adopt a stale session. Keep nothing from this serve.
                self._poison(f"{exc}")
                continue
            except OSError:
                break
            if record is None:
                self.eof = True
                break
            count += 1
            if self.poisoned:
                self._close(record[3])
            else:
                self.apply(*record)
        if self.flag is not None and self.flag[0] and not self.poisoned:
            self._poison("serve gave up on its keeper")
        return count

    def _poison(self, why: str) -> None:
        log.error("%s: forgetting %d entries (a crash of this serve now costs the guests "
                  "their balloons)", why, len(self.entries))
        self.poisoned = True
        for key in list(self.entries):
            self._forget(key)

    # -- running -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.child is not None:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        prctl.set_child_subreaper(1)          # the dead serve's processes end as ours
        self._start()
        try:
            while True:
                try:
                    ready, _, _ = select.select([self.pidfd] if self.eof else
                                                [self.sock, self.pidfd], [], [])
                except InterruptedError:
                    continue
                if self.sock in ready and self._drain() < BUSY:
                    # Records wait in the socket (serve's queue behind it) until the next
                    # look: one wake-up per BATCH s, not per record (serve sends one per MiB
                    # a guest inflates); under load, read on. A successor still gets every
                    # record: the socket is drained before it starts.
                    time.sleep(BATCH)
                if self.pidfd not in ready:
                    continue
                status = self._reap()
                if self.stopping or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    return 0
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CONFIG_ERROR:
                    return 1
                why = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                       if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}")
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
                if len(self.restarts) >= MAX_RESTARTS:
                    log.error("serve died (%s), %d times in %.0f s: giving up", why,
                              len(self.restarts) + 1, RESTART_WINDOW)
                    return 1
                self.restarts.append(now)
                log.error("serve died (%s): starting a new one, which adopts %d entries",
                          why, len(self.entries))
                self._start()
        finally:
            for key in list(self.entries):
                self._forget(key)
