"""The zygote: a small process that forks every jailed worker (issue 12.4).

A worker forked from ``serve`` shares ``serve``'s whole heap copy-on-write, and CPython's
reference counts dirty the pages it touches: measured ~5 MiB of private memory per worker
with 100 VMs. A worker forked from this process (exec'd fresh at ``serve``'s start, with only
the worker's and the jail's modules imported) inherits a heap a fraction of that size.

    serve --spawn request (fds by SCM_RIGHTS)--> zygote --sandbox.spawn--> jailed worker
          <--pid + pidfd------------------------        (its child: the zygote reaps it)
          <--exit status, on the worker's own status socket, when it ends

One zygote serves every VM. It dies with ``serve`` (parent-death signal, and the end of its
socket), and its workers die with it. If it is gone, the next spawn starts a new one.

Requests (msgpack map, at most ``MAX_REQUEST`` bytes) carry the worker's fds in order: the
status socket's zygote end first, then every keep fd; ``targets`` lists each keep fd's
number in the worker. The zygote answers ``{"ok": true, "pid": N}`` with a pidfd of the
worker, or ``{"ok": false, "error": "..."}``. ``--seccomp log`` workers are not spawned here
(their denial log lives in the process that spawned them).
"""

from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack

MAX_REQUEST = 8192
MAX_FDS = 64
REPLY_TIMEOUT = 15.0
"""Seconds to wait for a spawn: the jail's set-up deadline (5 s) plus reaping a failed one
(up to 4 x 2 s). A late answer is recognised by its id and discarded (its worker killed);
the zygote is not killed for being slow, since every worker dies with it."""


class ZygoteError(OSError):
    """The zygote could not be started, or did not answer."""


class ZygoteUnavailable(ZygoteError):
    """The zygote cannot be started at all here (e.g. the interpreter cannot be exec'd):
    workers are forked from ``serve`` itself instead. ``first``: the first time it is said."""

    first = False


# -- the serve side -------------------------------------------------------------------------

class RemoteWorker:
    """A ``WorkerHandle`` for a worker the zygote forked: killed through its pidfd, its end
    read from its status socket (readable when the zygote reaped it, or the zygote died)."""

    def __init__(self, pid: int, pidfd: int, status: socket.socket) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._status = status
        self._ended: str | None = None

    def exit_fd(self) -> int:
        return self._status.fileno()

    def kill(self) -> None:
        if self._ended is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass                           # ended already; its status says how

    def reap(self) -> str | None:
        if self._ended is None and self._status.fileno() >= 0:
            try:
                data = self._status.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            self._ended = _describe(data)
        return self._ended

    def release(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._status.close()

    def stop(self, grace: float) -> None:
        if not _readable(self._status.fileno(), grace):
            self.kill()
            _readable(self._status.fileno(), grace)
        self.reap()
        self.release()

    def describe_exit(self) -> str:
        return self._ended or "still running"

    def denials(self) -> dict[str, int]:
        return {}


def _describe(data: bytes) -> str:
    from sandbox.status import ExitStatus
    try:
        code, signum = msgpack.unpackb(data)
        return ExitStatus(code=code, signal=signum).describe()
    except (ValueError, TypeError, msgpack.UnpackException):
        return "ended (its zygote is gone)"


def _readable(fd: int, timeout: float) -> bool:
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class Zygote:
    """The serve side: starts the zygote on first use and asks it for workers. ``spawn``
    blocks until the worker is jailed (call it off the event loop: the spawner thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._next_id = 1
        self.unavailable: str | None = None     # why it cannot be started, once it could not

    def spawn(self, keep: dict[int, int], command: int, policy: Path, run_as: int | None) -> RemoteWorker:
        """A jailed worker holding ``keep`` ({our fd: its number}) serving ``command`` (its
        number for the command socket). Raises ``ZygoteError`` or the jail's error text as
        ``OSError``."""
        with self._lock:
            if self.unavailable is not None:
                raise ZygoteUnavailable(errno.ENOEXEC, self.unavailable)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                ident, self._next_id = self._next_id, self._next_id + 1
                request = msgpack.packb({"id": ident, "targets": list(keep.values()),
                                         "command": command, "policy": str(policy),
                                         "run_as": run_as})
                fds = [theirs.fileno(), *keep]
                for attempt in (0, 1):           # a dead zygote is restarted once
                    sock = self._connection()
                    try:
                        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", fds))])
                        reply, pidfd = self._reply(sock, ident)
                        break
                    except (ZygoteUnavailable, TimeoutError):
                        raise
                    except (BrokenPipeError, ConnectionResetError, ZygoteError):
                        self._forget()
                        if attempt:
                            raise ZygoteError(errno.EPIPE, "the zygote is gone") from None
            finally:
                theirs.close()
            if not reply.get("ok"):
                ours.close()
                raise OSError(errno.EIO, str(reply.get("error", "the zygote refused")))
            ours.setblocking(False)
            return RemoteWorker(int(reply["pid"]), pidfd, ours)

    def warm(self) -> None:
        """Start the zygote now (``serve``'s start), so the first guest does not wait for it."""
        with self._lock:
            if self.unavailable is None:
                try:
                    self._connection()
                except ZygoteUnavailable:
                    pass                 # said at the first spawn, which forks from serve

    def _reply(self, sock: socket.socket, ident: int) -> tuple[dict, int]:
        """The answer to request ``ident``; earlier requests' late answers are discarded
        (a worker nobody waits for any more is killed). Raises ``TimeoutError``."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            if not _readable(sock.fileno(), max(0.0, deadline - time.monotonic())):
                raise TimeoutError("the zygote did not answer in time")
            data, ancillary, flags, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4),
                                                     socket.MSG_CMSG_CLOEXEC)
            fds = _fds(ancillary)
            if not data:
                raise ZygoteError(errno.EPIPE, "the zygote closed its socket")
            reply = msgpack.unpackb(data)
            if isinstance(reply, dict) and reply.get("id") == ident:
                break
            for fd in fds:                       # a late answer: its worker is not wanted
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
                os.close(fd)
        if reply.get("ok") and len(fds) == 1:
            return reply, fds[0]
        for fd in fds:
            os.close(fd)
        return ({"ok": False, "error": reply.get("error", "no pidfd")} if reply.get("ok")
                else reply), -1

    def _connection(self) -> socket.socket:
        if self._sock is None or (self._proc is not None and self._proc.poll() is not None):
            self._forget()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "control.zygote", str(theirs.fileno()), str(os.getpid())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    cwd=str(Path(__file__).resolve().parent.parent), close_fds=True)
            except OSError as exc:
                ours.close()
                self.unavailable = f"cannot start the zygote: {exc}"
                error = ZygoteUnavailable(exc.errno or errno.EIO, self.unavailable)
                error.first = True
                raise error from None
            finally:
                theirs.close()
            self._sock = ours
        return self._sock

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._forget()


    def _after_fork(self) -> None:
        """In a forked child: the parent's zygote is not ours to ask, wait for or kill."""
        self._lock = threading.Lock()
        if self._sock is not None:
            self._sock.close()               # our copy only; the parent keeps its own
        self._sock, self._proc = None, None


ZYGOTE = Zygote()
os.register_at_fork(after_in_child=ZYGOTE._after_fork)


def _fds(ancillary: list) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return list(fds)


# -- the zygote process ---------------------------------------------------------------------

def main(fd: int, parent: int) -> None:
    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        return
    prctl.set_name("vballoon-zygote")
    # Everything a worker runs, imported once here (a worker imports nothing).
    from control.jailed import WORKER_NAME, load_policy, worker_limits
    from device.worker import run_worker
    from sandbox.jail import NOBODY, JailConfig, spawn
    from sandbox.errors import JailError
    import gc
    gc.freeze()                        # what is here now is never collected: never dirtied by it

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)
    children: dict[int, tuple[object, socket.socket]] = {}     # pidfd -> (child, status socket)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    root = os.geteuid() == 0
    while True:
        for ready, _ in poller.poll():
            if ready != fd:
                child, status = children.pop(ready)
                poller.unregister(ready)
                ended = child.poll()
                try:
                    status.send(msgpack.packb([ended.code, ended.signal]))
                except OSError:
                    pass                   # serve forgot the worker already
                status.close()
                child.close()
                continue
            data, ancillary, _, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * 4),
                                                 socket.MSG_CMSG_CLOEXEC)
            fds = _fds(ancillary)
            if not data and not fds:
                return                     # serve is gone: so are we, and our workers
            reply, pidfd, request = {"ok": False, "error": "bad request"}, -1, None
            status = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0]) \
                if fds else None
            try:
                request = msgpack.unpackb(data)
                keep = fds[1:]
                targets = request["targets"]
                if len(targets) != len(keep):
                    raise ValueError("fds and targets differ")
                run_as = request["run_as"]
                command = int(request["command"])
                config = JailConfig(keep_fds=keep, name=WORKER_NAME,
                                    seccomp=load_policy(Path(request["policy"])),
                                    run_as=NOBODY if run_as is None or not root else (run_as, run_as),
                                    map_ids=None if run_as is None or root else (run_as, run_as),
                                    limits=worker_limits(), renumber=dict(zip(keep, targets)))
                child = spawn(lambda: run_worker(command), config)
                children[child.fileno()] = (child, status)
                poller.register(child.fileno(), select.POLLIN)
                reply, pidfd, status = {"ok": True, "pid": child.pid, "id": request.get("id")}, \
                    child.fileno(), None
            except (JailError, ValueError, KeyError, TypeError, IndexError, OSError,
                    msgpack.UnpackException) as exc:
                reply = {"ok": False, "error": f"cannot start the jailed worker: {exc}",
                         "id": request.get("id") if isinstance(request, dict) else None}
            finally:
                for extra in fds[1:]:
                    os.close(extra)
                if status is not None:
                    status.close()
            try:
                sock.sendmsg([msgpack.packb(reply)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))]
                             if pidfd >= 0 else [])
            except OSError:
                return


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
