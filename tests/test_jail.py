"""The jail on the real kernel: fds, namespaces, privileges, seccomp in kill and
log mode, how children end, parent death and set-up failures.

Most tests run twice: as the invoking user and, through `as_user`, in a forked
helper that dropped to uid/gid 65534 (the jail then uses a user namespace).
Jailed children report over a kept pipe and always end in os._exit; the parent
waits with deadlines and never sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import prctl
import pyseccomp
import pytest

from sandbox import EXIT_CALLABLE_RAISED, ExitStatus, JailConfig, JailSetupError, Limits, Policy, WaitTimeout, spawn
from tests.jail_helpers import (
    DEADLINE,
    Reporter,
    drive_workload,
    fallocate,
    held_fds,
    jailed,
    make_workload_fds,
    proc_status,
    process_gone,
    run_as_nobody,
    run_in_fork,
    running_as_root,
    wait_until,
    worker_loop,
)

REPO = Path(__file__).resolve().parent.parent
BALLOON = Policy.from_file(REPO / "device" / "balloon.policy")
# Resolved now: a jailed child cannot look symbols up (that reads files).
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
SYS_OPEN = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "open")
PTRACE_ATTACH = 16

AsUser = Callable[[Callable[[], None]], None]


@pytest.fixture(params=["invoking-user", "nobody"])
def as_user(request: pytest.FixtureRequest) -> AsUser:
    """Runs a test body as the invoking user, or as uid 65534 in a forked helper."""
    if request.param == "nobody":
        if not running_as_root():
            pytest.skip("becoming uid 65534 needs root (this run is unprivileged already)")
        return run_as_nobody
    return lambda body: body()


def wait_for_read(fd: int) -> Callable[[], None]:
    """A callable that blocks until the parent writes to (or closes) a kept pipe."""
    return lambda: os._exit(0 if os.read(fd, 1) else 3)


def identity(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_rdev


# ---------------------------------------------------------------------------
# fds
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def junk_fds() -> Iterator[None]:
    """fds the child must not get: inheritable or not, raw or owned by Python objects."""
    inheritable_r, inheritable_w = os.pipe()
    os.set_inheritable(inheritable_r, True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    poller = select.epoll()
    devnull = open(os.devnull, "rb")  # noqa: SIM115 - closed below
    try:
        yield
    finally:
        os.close(inheritable_r)
        os.close(inheritable_w)
        sock.close()
        poller.close()
        devnull.close()


def dup_to_free(fd: int, number: int) -> int:
    """dup2 onto `number`, which must not be in use (never clobber pytest's fds)."""
    with pytest.raises(OSError):
        os.fstat(number)
    return os.dup2(fd, number)


def keep_layout(case: str, report: int, a: int, b: int) -> tuple[list[int], object]:
    """(keep fds as the caller passes them, renumber) for one layout."""
    return {
        "plain": ([b, report, a, a], None),  # unsorted, with a duplicate
        "fd0-kept": ([0, report, a], None),
        "fd0-mapped": ([report, a, b], {a: 0, report: 5, b: 9}),
        "high": ([report, 900, 901], None),
        "renumber-3": ([report, a, b, 900], 3),
        "swap": ([report, 910, 911], {report: report, 910: 911, 911: 910}),
    }[case]


@pytest.mark.parametrize("case", ["plain", "fd0-kept", "fd0-mapped", "high", "renumber-3", "swap"])
def test_child_holds_only_keep_fds(case: str, as_user: AsUser) -> None:
    def body() -> None:
        reporter = Reporter()
        a, b = os.eventfd(0, os.EFD_CLOEXEC), os.memfd_create("b", os.MFD_CLOEXEC)
        aliases = [dup_to_free(a, 900), dup_to_free(b, 901), dup_to_free(a, 910), dup_to_free(b, 911)]
        keep, renumber = keep_layout(case, reporter.write_fd, a, b)
        config = JailConfig(keep_fds=keep, renumber=renumber, seccomp_mode="off")
        moved = config.child_fds()
        expected = {dst: identity(src) for src, dst in moved.items()}
        with open(os.devnull) as null:
            for std in {0, 1, 2} - set(moved.values()):
                expected[std] = identity(null.fileno())
        report_fd = moved[reporter.write_fd]

        def target() -> None:
            reporter.send(report_fd, {fd: list(identity(fd)) for fd in held_fds()})

        try:
            with junk_fds(), jailed(target, config) as child:
                seen = {int(fd): tuple(ident) for fd, ident in reporter.receive().items()}
                assert child.wait(DEADLINE).describe() == "exited with code 0"
        finally:
            reporter.close()
            for fd in (a, b, *aliases):
                os.close(fd)
        assert config.keep_fds == tuple(sorted(set(keep)))
        assert seen == expected

    as_user(body)


def test_keep_fd_that_is_not_open_is_a_setup_error(as_user: AsUser) -> None:
    def body() -> None:
        closed = os.dup(0)
        os.close(closed)
        started = time.monotonic()
        with pytest.raises(JailSetupError) as info:
            spawn(lambda: None, JailConfig(keep_fds=[closed], seccomp_mode="off"))
        assert (info.value.step, info.value.errno) == ("fds", errno.EBADF)
        assert f"keep fd {closed} is not open" in str(info.value)
        assert time.monotonic() - started < DEADLINE

    as_user(body)


# ---------------------------------------------------------------------------
# Namespaces, root, privileges
# ---------------------------------------------------------------------------


def test_child_sees_no_host_files_and_no_host_network(as_user: AsUser) -> None:
    def body() -> None:
        reporter = Reporter()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"\0vballoon-jail-test-{os.getpid()}"
        listener.bind(address)
        listener.listen()

        def target() -> None:
            try:
                os.mkdir("/new")
                mkdir_errno = 0
            except OSError as exc:
                mkdir_errno = exc.errno
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connect_errno = probe.connect_ex(address)
            reporter.send(
                3,
                {
                    "pid": os.getpid(),
                    "root": os.listdir("/"),
                    "passwd": os.path.exists("/etc/passwd"),
                    "proc": os.path.exists("/proc/self"),
                    "mkdir": mkdir_errno,
                    "connect": connect_errno,
                    "interfaces": [name for _, name in socket.if_nameindex()],
                },
            )

        try:
            config = JailConfig(keep_fds=[reporter.write_fd], renumber=3, seccomp_mode="off")
            with jailed(target, config) as child:
                seen = reporter.receive()
                assert child.wait(DEADLINE).code == 0
        finally:
            reporter.close()
            listener.close()
        assert seen == {
            "pid": 1,
            "root": [],
            "passwd": False,
            "proc": False,
            "mkdir": errno.EROFS,
            "connect": errno.ECONNREFUSED,
            "interfaces": ["lo"],
        }

    as_user(body)


NAMESPACES = ["pid", "net", "ipc", "uts", "mnt"]


def test_child_has_no_privileges_and_its_own_namespaces(as_user: AsUser) -> None:
    def body() -> None:
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        # dumpable so that an unprivileged parent may read /proc/<pid>/ns (see JailConfig.dumpable).
        config = JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON, name="jail-test", dumpable=True)
        try:
            with jailed(wait_for_read(3), config) as child:
                status = proc_status(child.pid)
                theirs = {ns: os.readlink(f"/proc/{child.pid}/ns/{ns}") for ns in NAMESPACES + ["user"]}
                os.write(hold_w, b"x")
                assert child.wait(DEADLINE).describe() == "exited with code 0"
        finally:
            os.close(hold_r)
            os.close(hold_w)
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[field], 16) == 0, field
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        assert status["Name"] == "jail-test"
        assert status["State"][0] in "SR"
        ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES + ["user"]}
        for ns in NAMESPACES:
            assert theirs[ns] != ours[ns], ns
        if os.geteuid() == 0:
            assert theirs["user"] == ours["user"]
            assert status["Uid"].split() == ["65534"] * 4  # root is left for nobody
        else:
            assert theirs["user"] != ours["user"]

    as_user(body)


@pytest.mark.parametrize("dumpable", [False, True])
def test_child_is_not_dumpable_unless_asked(dumpable: bool) -> None:
    reporter = Reporter()
    config = JailConfig(keep_fds=[reporter.write_fd], renumber=3, seccomp_mode="off", dumpable=dumpable)
    try:
        with jailed(lambda: reporter.send(3, prctl.get_dumpable()), config) as child:
            seen = reporter.receive()
            assert child.wait(DEADLINE).code == 0
    finally:
        reporter.close()
    assert seen is dumpable


def test_rlimits_in_the_child() -> None:
    reporter = Reporter()

    def target() -> None:
        names = ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NPROC")
        reporter.send(7, {name: list(resource.getrlimit(getattr(resource, name))) for name in names})

    config = JailConfig(keep_fds=[reporter.write_fd], renumber=7, seccomp_mode="off", limits=Limits(nofile_headroom=4))
    try:
        with jailed(target, config) as child:
            seen = reporter.receive()
            assert child.wait(DEADLINE).code == 0
    finally:
        reporter.close()
    assert seen == {"RLIMIT_NOFILE": [12, 12], "RLIMIT_CORE": [0, 0], "RLIMIT_FSIZE": [0, 0], "RLIMIT_NPROC": [0, 0]}


# ---------------------------------------------------------------------------
# seccomp: each forbidden thing, in kill mode and in log mode
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What an attempt may use in the child: fd numbers there, the parent's pid."""

    report: int
    memfd: int
    parent_pid: int


def _check(result: int) -> None:
    if result < 0:
        raise OSError(ctypes.get_errno(), "failed")


def attempt_openat(ctx: Context) -> None:
    os.open("/etc/passwd", os.O_RDONLY)


def attempt_open(ctx: Context) -> None:
    _check(_syscall(SYS_OPEN, b"/etc/passwd", 0))


def attempt_socket(ctx: Context) -> None:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def attempt_execve(ctx: Context) -> None:
    os.execv("/bin/true", ["true"])


def attempt_ptrace(ctx: Context) -> None:
    _check(_ptrace(PTRACE_ATTACH, ctx.parent_pid, None, None))


def attempt_fork(ctx: Context) -> None:
    if os.fork() == 0:
        os._exit(0)


def attempt_thread(ctx: Context) -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()


def attempt_kill_parent(ctx: Context) -> None:
    # In log mode this really runs: the parent is invisible from the child's pid
    # namespace, so it fails with ESRCH.
    os.kill(ctx.parent_pid, signal.SIGKILL)


def attempt_mmap_exec(ctx: Context) -> None:
    mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_EXEC)


def attempt_mprotect_exec(ctx: Context) -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    _check(_mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC))


def attempt_madvise_dontneed(ctx: Context) -> None:
    mmap.mmap(-1, mmap.PAGESIZE).madvise(mmap.MADV_DONTNEED)


def attempt_fallocate_allocate(ctx: Context) -> None:
    fallocate(ctx.memfd, 0, 0, mmap.PAGESIZE)


ATTEMPTS = [
    (attempt_openat, "openat"),
    (attempt_open, "open"),
    (attempt_socket, "socket"),
    (attempt_execve, "execve"),
    (attempt_ptrace, "ptrace"),
    (attempt_fork, "clone"),
    (attempt_thread, "clone3"),
    (attempt_kill_parent, "kill"),
    (attempt_mmap_exec, "mmap"),
    (attempt_mprotect_exec, "mprotect"),
    (attempt_madvise_dontneed, "madvise"),
    (attempt_fallocate_allocate, "fallocate"),
]


def _run_attempt(attempt: Callable[[Context], None], mode: str) -> tuple[ExitStatus, dict[str, int], object]:
    reporter = Reporter()
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 20)
    ctx = Context(report=3, memfd=4, parent_pid=os.getpid())

    def target() -> None:
        os.write(ctx.report, b"trying")  # proves the child got this far before dying
        attempt(ctx)

    config = JailConfig(keep_fds=[reporter.write_fd, memfd], renumber={reporter.write_fd: 3, memfd: 4},
                        seccomp=BALLOON, seccomp_mode=mode)
    try:
        with jailed(target, config) as child:
            status = child.wait(DEADLINE)
            os.close(reporter.write_fd)
            reporter.write_fd = -1
            said = os.read(reporter.read_fd, 100)
            return status, child.denials(), said
    finally:
        reporter.close()
        os.close(memfd)


@pytest.mark.parametrize(("attempt", "syscall"), ATTEMPTS, ids=[name for _, name in ATTEMPTS])
def test_denied_syscall_kills_the_child(attempt: Callable[[Context], None], syscall: str, as_user: AsUser) -> None:
    def body() -> None:
        status, denials, said = _run_attempt(attempt, "kill")
        assert said == b"trying"
        assert status.killed_by_seccomp
        assert status.describe() == "killed by seccomp (SIGSYS)"
        assert denials == {}

    as_user(body)


@pytest.mark.parametrize(("attempt", "syscall"), ATTEMPTS, ids=[name for _, name in ATTEMPTS])
def test_denied_syscall_is_reported_in_log_mode(attempt: Callable[[Context], None], syscall: str, as_user: AsUser) -> None:
    def body() -> None:
        status, denials, said = _run_attempt(attempt, "log")
        assert said == b"trying"
        assert not status.killed_by_seccomp, status.describe()
        assert denials.get(syscall, 0) >= 1, denials

    as_user(body)


def test_log_mode_counts_by_name_and_shows_arguments() -> None:
    def target() -> None:
        for _ in range(3):
            os.getppid()
        os.getuid()
        mmap.mmap(-1, mmap.PAGESIZE).madvise(mmap.MADV_DONTNEED)

    with jailed(target, JailConfig(seccomp=BALLOON, seccomp_mode="log")) as child:
        assert child.wait(DEADLINE).describe() == "exited with code 0"
        denials, examples = child.denials(), child.denial_examples()
    assert denials == {"getppid": 3, "getuid": 1, "madvise": 1}
    assert examples["madvise"][0][2] == mmap.MADV_DONTNEED


def test_realistic_worker_survives_the_balloon_policy(as_user: AsUser) -> None:
    """memfd mmap, fallocate punch hole, MADV_REMOVE, eventfds, epoll, SEQPACKET,
    msgpack and logging, all under the kill-mode policy."""

    def body() -> None:
        fds = make_workload_fds()
        config = JailConfig(keep_fds=fds.keep, renumber=3, seccomp=BALLOON, seccomp_mode="kill")
        seen_by_child = fds.in_child(config)
        try:
            with jailed(lambda: worker_loop(seen_by_child), config) as child:
                replies = drive_workload(fds, child)
                status = child.wait(DEADLINE)
            os.close(fds.log_write)
            log = os.read(fds.log_read, 4096).decode()
        finally:
            fds.close()
        assert status.describe() == "exited with code 0"
        page = mmap.PAGESIZE
        assert replies == [
            ["done", "touch", 64 * page],
            ["done", "punch", 32 * page],
            ["done", "remove", 0],
            ["done", "touch", 16 * page],
            ["bye"],
        ]
        assert log.splitlines()[0] == "worker ready"
        assert "remove 32 pages at 32" in log

    as_user(body)


# ---------------------------------------------------------------------------
# How the child ends
# ---------------------------------------------------------------------------


def _stderr_of(target: Callable[[], None], mode: str = "kill") -> tuple[ExitStatus, bytes]:
    """Run with the child's fd 2 on a pipe; its status and everything it wrote there."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    config = JailConfig(keep_fds=[err_w], renumber={err_w: 2}, seccomp=BALLOON, seccomp_mode=mode)
    try:
        with jailed(target, config) as child:
            status = child.wait(DEADLINE)
        os.close(err_w)
        err_w = -1
        return status, os.read(err_r, 4096)
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)


def test_callable_exception_exits_without_traceback() -> None:
    def target() -> None:
        raise ValueError("boom")

    status, stderr = _stderr_of(target)
    assert status == ExitStatus(code=EXIT_CALLABLE_RAISED)
    assert status.describe() == f"exited with code {EXIT_CALLABLE_RAISED}"
    assert stderr == b""


@pytest.mark.parametrize(("exit_with", "code"), [(0, 0), (3, 3), (None, 0), ("message", 1)])
def test_sys_exit_and_os_exit_codes(exit_with: object, code: int) -> None:
    status, _ = _stderr_of(lambda: sys.exit(exit_with))
    assert status.describe() == f"exited with code {code}"
    status, _ = _stderr_of(lambda: os._exit(code))
    assert status.code == code


def test_kill_reports_sigkill_and_the_pidfd_says_when() -> None:
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    try:
        with jailed(wait_for_read(3), JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON)) as child:
            poller = select.poll()
            poller.register(child.fileno(), select.POLLIN)
            assert poller.poll(0) == []
            assert child.poll() is None
            child.kill()
            assert poller.poll(DEADLINE * 1000)
            assert child.poll() == ExitStatus(signal=signal.SIGKILL)
            assert child.wait(0).describe() == "killed by signal SIGKILL"
    finally:
        os.close(hold_r)
        os.close(hold_w)


def test_wait_times_out_while_the_child_runs() -> None:
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    try:
        with jailed(wait_for_read(3), JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON)) as child:
            with pytest.raises(WaitTimeout):
                child.wait(0.05)
            os.write(hold_w, b"x")
            assert child.wait(DEADLINE).code == 0
    finally:
        os.close(hold_r)
        os.close(hold_w)


def test_other_signals_are_reported_by_name() -> None:
    """Outside a pid namespace the worker is not pid 1, so SIGTERM's default applies."""
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    config = JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON, namespaces=False)
    try:
        with jailed(wait_for_read(3), config) as child:
            os.kill(child.pid, signal.SIGTERM)
            assert child.wait(DEADLINE).describe() == "killed by signal SIGTERM"
    finally:
        os.close(hold_r)
        os.close(hold_w)


def test_exit_status_words() -> None:
    assert ExitStatus(code=0).describe() == "exited with code 0"
    assert ExitStatus(signal=signal.SIGTERM).describe() == "killed by signal SIGTERM"
    assert ExitStatus(signal=signal.SIGSYS).describe() == "killed by seccomp (SIGSYS)"
    assert ExitStatus.from_wait_status(0x0300).describe() == "exited with code 3"
    with pytest.raises(ValueError):
        ExitStatus()


# ---------------------------------------------------------------------------
# The child dies with its parent
# ---------------------------------------------------------------------------


def test_child_dies_when_its_parent_is_sigkilled(as_user: AsUser) -> None:
    def body() -> None:
        pids_r, pids_w = os.pipe2(os.O_CLOEXEC)
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        intermediate = os.fork()
        if intermediate == 0:
            _intermediate(pids_w, hold_r)
        os.close(pids_w)
        try:
            data = Reporter.read_exactly(pids_r, 8, time.monotonic() + DEADLINE)
            worker, parent = struct.unpack("=ii", data)
            assert not process_gone(worker)
            assert parent == intermediate                 # no process in between that waits
            os.kill(intermediate, signal.SIGKILL)
            os.waitpid(intermediate, 0)
            wait_until(lambda: process_gone(worker), what="the jailed child to die")
        finally:
            for fd in (pids_r, hold_r, hold_w):
                os.close(fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(intermediate, os.WNOHANG)

    as_user(body)


def _intermediate(pids_w: int, hold_r: int) -> None:
    """A parent that spawns a jail, says the pids, then waits to be SIGKILLed."""
    try:
        child = spawn(wait_for_read(3), JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON))
        os.write(pids_w, struct.pack("=ii", child.pid, int(proc_status(child.pid)["PPid"])))
        select.select([], [], [])
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------
# Set-up failures reach the parent, naming the step
# ---------------------------------------------------------------------------


def test_listener_without_a_free_fd_fails_at_the_seccomp_step(as_user: AsUser) -> None:
    """In log mode the kernel must find an fd below RLIMIT_NOFILE for the
    listener; with no headroom there is none, and loading the filter fails."""

    def body() -> None:
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        config = JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON, seccomp_mode="log",
                            limits=Limits(nofile_headroom=0))
        try:
            with pytest.raises(JailSetupError) as info:
                spawn(wait_for_read(3), config)
        finally:
            os.close(hold_r)
            os.close(hold_w)
        assert (info.value.step, info.value.errno) == ("seccomp", errno.EMFILE)

    as_user(body)


def test_filter_the_kernel_refuses_fails_at_the_seccomp_step() -> None:
    """A process may carry at most 32768 filter instructions in all; a spawner
    that already has most of them cannot give its child another filter."""

    def body() -> None:
        allow_all = struct.pack("=HBBI", 0x06, 0, 0, pyseccomp.ALLOW)
        from sandbox.syscalls import LoadableFilter

        def allow_all_of(size: int) -> LoadableFilter:
            return LoadableFilter(struct.pack("=HBBI", 0x20, 0, 0, 0) * (size - 1) + allow_all)

        prctl.set_no_new_privs(1)
        for _ in range(7):
            allow_all_of(4096).load(0)
        # The kernel counts each filter's length + 4: 7 * 4100 + 4004 leaves 64.
        allow_all_of(4000).load(0)
        with pytest.raises(JailSetupError) as info:
            spawn(lambda: None, JailConfig(seccomp=BALLOON))
        assert (info.value.step, info.value.errno) == ("seccomp", errno.ENOMEM)

    run_in_fork(body)


def test_namespaces_without_privilege_fail_at_the_namespaces_step() -> None:
    if not running_as_root():
        pytest.skip("needs root to become uid 65534")

    def body() -> None:
        with pytest.raises(JailSetupError) as info:
            spawn(lambda: None, JailConfig(seccomp_mode="off", user_namespace=False))
        assert (info.value.step, info.value.errno) == ("namespaces", errno.EPERM)

    run_as_nobody(body)


def test_the_parent_maps_the_user_namespace_to_the_ids_asked_for() -> None:
    """map_ids: the child runs as host ids other than the caller's,
    with no supplementary group and no capability (as root the parent writes the maps)."""
    if not running_as_root():
        pytest.skip("as root the parent writes the maps itself; unprivileged: test_worker_ids.py")
    ident = 0x7E00_7777
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    config = JailConfig(keep_fds=[hold_r], renumber=3, seccomp=BALLOON, user_namespace=True,
                        map_ids=(ident, ident), dumpable=True)
    try:
        with jailed(wait_for_read(3), config) as child:
            statuses = [proc_status(child.pid)]
            os.write(hold_w, b"x")
            assert child.wait(DEADLINE).describe() == "exited with code 0"
    finally:
        os.close(hold_r)
        os.close(hold_w)
    for status in statuses:
        assert status["Uid"].split() == [str(ident)] * 4
        assert status["Gid"].split() == [str(ident)] * 4
        assert status["Groups"].strip() == ""
        assert int(status["CapEff"], 16) == 0


def test_ids_the_caller_may_not_map_are_a_setup_error_and_nothing_is_left() -> None:
    """Unprivileged without those ids in /etc/subuid: newuidmap refuses; spawn says so."""
    if not running_as_root():
        pytest.skip("needs root to become uid 65534")
    from sandbox import idmap
    if not idmap.helpers_available():
        pytest.skip("newuidmap/newgidmap missing (Debian package uidmap)")

    def body() -> None:
        before = set(os.listdir("/proc"))
        with pytest.raises(JailSetupError) as info:
            spawn(lambda: None, JailConfig(seccomp_mode="off", map_ids=(0x7E00_7778, 0x7E00_7778)))
        assert info.value.step == "user-namespace"
        assert "newuidmap" in str(info.value)
        with pytest.raises(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)                 # every child reaped
        assert not any(pid.isdigit() and pid not in before and _is_ours(pid) for pid in os.listdir("/proc"))

    run_as_nobody(body)


def _is_ours(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[1:2] == [str(os.getpid())] for line in f if line.startswith("PPid:"))
    except OSError:
        return False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_fds": [-1]},
        {"name": "a-name-longer-than-15"},
        {"seccomp_mode": "kill"},  # no policy
        {"seccomp_mode": "strict", "seccomp": BALLOON},
        {"keep_fds": [3, 4], "renumber": {3: 5}},
        {"keep_fds": [3, 4], "renumber": {3: 5, 4: 5}},
        {"namespaces": False, "user_namespace": True},
        {"user_namespace": False, "map_ids": (70000, 70000)},
        {"setup_timeout": 0},
    ],
)
def test_bad_configs_are_rejected_before_forking(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        JailConfig(**kwargs)
