"""Helpers for the jail tests: reporting from a jailed child, running a test body
in a forked helper (optionally as an unprivileged user), and a realistic worker
workload."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import resource
import select
import signal
import socket
import struct
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import msgpack
import prctl

from sandbox import JailConfig, JailedChild, spawn

NOBODY = 65534
DEADLINE = 10.0
MAX_REPORT = 1 << 16

# ---------------------------------------------------------------------------
# Reporting from inside the jail.
# ---------------------------------------------------------------------------


class Reporter:
    """A pipe the jailed child writes one msgpack report to; the parent reads it
    with a deadline. The child side must only use already-open fds."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)

    def send(self, fd: int, value: object) -> None:
        """In the child: write `value` to the pipe's write end, now at `fd`."""
        data = msgpack.packb(value)
        os.write(fd, struct.pack("=I", len(data)) + data)

    def receive(self, deadline: float = DEADLINE) -> object:
        """In the parent: the report, or AssertionError if none arrives in time."""
        with contextlib.suppress(OSError):
            os.close(self.write_fd)
        self.write_fd = -1
        data = _read_until_eof(self.read_fd, time.monotonic() + deadline)
        assert len(data) >= 4, "the jailed child sent no report"
        (size,) = struct.unpack_from("=I", data)
        return msgpack.unpackb(data[4 : 4 + size], strict_map_key=False)

    @staticmethod
    def read_exactly(fd: int, size: int, deadline: float) -> bytes:
        """`size` bytes from `fd`, or AssertionError at `deadline` or end of file."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        data = b""
        while len(data) < size:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out reading from the child"
            if poller.poll(remaining * 1000):
                chunk = os.read(fd, size - len(data))
                assert chunk, "the child closed the pipe early"
                data += chunk
        return data

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1


def _read_until_eof(fd: int, deadline: float) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out reading the child's report"
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, MAX_REPORT)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def held_fds() -> list[int]:
    """In the child: every fd number below RLIMIT_NOFILE that is open (/proc is
    not there to list after pivot_root, so ask fstat about each number)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    held = []
    for fd in range(limit):
        try:
            os.fstat(fd)
        except OSError:
            continue
        held.append(fd)
    return held


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/<pid>/status, read by the parent."""
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll `condition` until true; AssertionError after `timeout`. Not a sleep to
    synchronise: it re-checks a real condition with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        select.select([], [], [], 0.002)


def process_gone(pid: int) -> bool:
    """True once `pid` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# ---------------------------------------------------------------------------
# Running a test body as an unprivileged user.
# ---------------------------------------------------------------------------


def run_in_fork(body: Callable[[], None], become_nobody: bool = False, timeout: float = 30.0) -> None:
    """Run `body` in a forked helper (optionally dropped to uid/gid 65534 first)
    and re-raise its failure here. The helper always ends with os._exit, so
    whatever `body` changes in its process (uid, seccomp filters) stays there."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _helper(body, become_nobody, read_fd, write_fd)
    os.close(write_fd)
    try:
        data = _read_until_eof(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if data != b"ok":
        who = "as uid 65534" if become_nobody else "in a forked helper"
        raise AssertionError(f"{who}:\n" + data.decode(errors="replace"))


def run_as_nobody(body: Callable[[], None]) -> None:
    """Run `body` as uid/gid 65534 (see `run_in_fork`)."""
    run_in_fork(body, become_nobody=True)


def _helper(body: Callable[[], None], become_nobody: bool, read_fd: int, write_fd: int) -> None:
    result = b"helper ended without a result"
    try:
        os.close(read_fd)
        if become_nobody:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            # A uid change makes the process non-dumpable, which no real
            # unprivileged user is; be one.
            prctl.set_dumpable(True)
        body()
        result = b"ok"
    except BaseException:  # noqa: BLE001 - the whole failure travels to the parent
        result = traceback.format_exc().encode()
    finally:
        os.write(write_fd, result[:MAX_REPORT])
        os._exit(0)


def running_as_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------
# A realistic worker workload.
# ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE = mmap.PAGESIZE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class WorkloadFds:
    """fds the parent creates for the workload; `child` are the ones to keep."""

    memfd: int
    kick: int
    call: int
    sock_parent: socket.socket
    sock_child: socket.socket
    log_read: int
    log_write: int

    @property
    def keep(self) -> list[int]:
        return [self.memfd, self.kick, self.call, self.sock_child.fileno(), self.log_write]

    def in_child(self, config: JailConfig) -> ChildFds:
        """The numbers the jailed worker sees these fds under."""
        moved = config.child_fds()
        return ChildFds(
            memfd=moved[self.memfd],
            kick=moved[self.kick],
            call=moved[self.call],
            sock=moved[self.sock_child.fileno()],
            log=moved[self.log_write],
        )

    def close(self) -> None:
        for fd in (self.memfd, self.kick, self.call, self.log_read, self.log_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock_parent.close()
        self.sock_child.close()


@dataclass(frozen=True)
class ChildFds:
    memfd: int
    kick: int
    call: int
    sock: int
    log: int


MEMORY_PAGES = 256


def make_workload_fds() -> WorkloadFds:
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, MEMORY_PAGES * PAGE)
    sock_parent, sock_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_read, log_write = os.pipe2(os.O_CLOEXEC)
    return WorkloadFds(
        memfd=memfd,
        kick=os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
        call=os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
        sock_parent=sock_parent,
        sock_child=sock_child,
        log_read=log_read,
        log_write=log_write,
    )


class _PipeHandler(logging.Handler):
    """Logging to an fd with one os.write per record (no file objects, no locks
    shared with the parent's logging)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        os.write(self.fd, (self.format(record) + "\n").encode())


def worker_loop(fds: ChildFds) -> None:
    """In the jailed child: what the balloon worker does, in miniature. Serves
    requests from the command socket until "stop", then exits 0.

    Requests (msgpack): ["touch", first_page, pages] writes to guest memory;
    ["punch", first_page, pages] frees them with fallocate; ["remove", ...] with
    madvise(MADV_REMOVE); each kick on the eventfd is answered on the call fd.
    """
    # A logger of its own, emptied: handlers other tests left on a shared logger
    # would write to fd numbers that mean something else in here.
    log = logging.getLogger("tests.jail_helpers.worker")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(_PipeHandler(fds.log))
    memory = mmap.mmap(fds.memfd, MEMORY_PAGES * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # As device/worker.py does: poll (no extra fd), plain read/write on the socket.
    poller = select.poll()
    poller.register(fds.sock, select.POLLIN)
    poller.register(fds.kick, select.POLLIN)
    log.info("worker ready")
    while True:
        for fd, _ in poller.poll(5000):
            if fd == fds.kick:
                os.eventfd_read(fds.kick)
                os.eventfd_write(fds.call, 1)
                continue
            request = msgpack.unpackb(os.read(fds.sock, 4096))
            reply = _serve(request, memory, fds.memfd, log)
            os.write(fds.sock, msgpack.packb(reply))
            if request[0] == "stop":
                memory.close()
                return


def _serve(request: list, memory: mmap.mmap, memfd: int, log: logging.Logger) -> object:
    verb = request[0]
    if verb == "stop":
        return ["bye"]
    first, pages = request[1], request[2]
    if verb == "touch":
        for page in range(first, first + pages):
            memory[page * PAGE : page * PAGE + 8] = b"guestpg!"
    elif verb == "punch":
        fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, first * PAGE, pages * PAGE)
    elif verb == "remove":
        memory.madvise(mmap.MADV_REMOVE, first * PAGE, pages * PAGE)
    log.info("%s %d pages at %d", verb, pages, first)
    return ["done", verb, os.fstat(memfd).st_blocks * 512]


def drive_workload(fds: WorkloadFds, child: JailedChild) -> list[object]:
    """In the parent: exercise every path of `worker_loop` and collect replies."""
    sock = fds.sock_parent
    sock.settimeout(DEADLINE)
    replies = []
    for request in (["touch", 0, 64], ["punch", 0, 32], ["remove", 32, 32], ["touch", 64, 16]):
        sock.send(msgpack.packb(request))
        replies.append(msgpack.unpackb(sock.recv(4096)))
    os.eventfd_write(fds.kick, 1)
    wait_until(lambda: _eventfd_ready(fds.call), what="the worker's call")
    sock.send(msgpack.packb(["stop"]))
    replies.append(msgpack.unpackb(sock.recv(4096)))
    return replies


def _eventfd_ready(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


@contextlib.contextmanager
def jailed(target: Callable[[], None], config: JailConfig) -> Iterator[JailedChild]:
    """spawn(), and always kill and reap the child afterwards."""
    child = spawn(target, config)
    try:
        yield child
    finally:
        child.close()
