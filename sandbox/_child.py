"""What runs between fork() and the callable: the set-up process, then the worker.

::

    parent ──fork──> set-up ──unshare(pid, net, ipc, uts, mount[, user])──fork──> worker (pid 1)
    (a child         fds, namespaces, empty root,                                waits for set-up
    subreaper)       privileges dropped, sends                                   to end, parent-
                     the worker's pid, exits                                     death signal,
                                                                                 rlimits, name,
                                                                                 seccomp, "ready",
                                                                                 callable, os._exit

A new pid namespace only applies to the children of the process that creates it, hence two
processes. The set-up process does not stay: once it has told the parent the worker's pid it
exits, and the kernel hands the worker to the parent, a child subreaper
(PR_SET_CHILD_SUBREAPER), which then waits for the worker itself. So no process per worker
only waits (issue 12.4). The worker arms its parent-death signal only after that hand-over
(a pidfd of the set-up process tells it: readable once the kernel reparented its children),
so it dies with the parent, not with the set-up process.

Both processes run only code from this module until the callable starts, end
with os._exit (never returning into the caller's stack) and report any failure
as ["error", step, errno, detail] on the set-up channel before exiting.
"""

from __future__ import annotations

import array
import errno
import gc
import os
import resource
import select
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn

import prctl

from sandbox import channel, syscalls
from sandbox.errors import JailSetupError
from sandbox.fds import FdPlan, arrange_fds, ensure_fd_room
from sandbox.status import EXIT_CALLABLE_RAISED, EXIT_PARENT_GONE, EXIT_SETUP_FAILED
from sandbox.syscalls import LoadableFilter

CAP_SETPCAP = 8
MAX_CAPS = 64
SECUREBITS = (
    (1 << 0)  # SECBIT_NOROOT: uid 0 gains no capabilities...
    | (1 << 1)  # ...locked
    | (1 << 2)  # SECBIT_NO_SETUID_FIXUP
    | (1 << 3)  # ...locked
    | (1 << 5)  # SECBIT_KEEP_CAPS_LOCKED (KEEP_CAPS itself stays off)
    | (1 << 6)  # SECBIT_NO_CAP_AMBIENT_RAISE
    | (1 << 7)  # ...locked
)
NAMESPACE_FLAGS = (
    syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNET
)
EMPTY_ROOT_OPTIONS = "size=4k,nr_inodes=2,mode=0555"
MAP_WAIT = 30.0
"""Seconds the set-up process waits for the parent to map its user namespace."""
SETUP_EXIT_WAIT = 30.0
"""Seconds the worker waits for the set-up process to end (it ends at once; the parent's own
set-up deadline kills both long before)."""


@dataclass(frozen=True)
class ChildLimits:
    """Resource limits of the worker (soft = hard); None leaves one unchanged."""

    fsize: int | None
    nproc: int | None
    core: int | None
    data: int | None = None


@dataclass(frozen=True)
class ChildPlan:
    """Everything the forked processes need, decided in the parent before fork."""

    fds: FdPlan
    parent_pid: int
    namespaces: bool
    user_namespace: bool
    host_ids: tuple[int, int]
    """(uid, gid) mapped to root inside the user namespace (by the child itself)."""
    map_ids: tuple[int, int] | None
    """(uid, gid) the parent maps root inside the user namespace to instead; the
    child then becomes them."""
    run_as: tuple[int, int] | None
    """(uid, gid) to switch to outside a user namespace, when root."""
    mount_point: str
    name: str
    limits: ChildLimits
    dumpable: bool
    filter: LoadableFilter | None
    log_mode: bool


@contextmanager
def step(name: str) -> Iterator[None]:
    """Turn any failure inside into JailSetupError(name, errno, detail)."""
    try:
        yield
    except JailSetupError:
        raise
    except OSError as exc:
        raise JailSetupError(name, exc.errno or 0, _detail(exc)) from None
    except Exception as exc:
        # A bug in set-up must still reach the parent as an error naming the
        # step; the process exits right after, so nothing "keeps going".
        raise JailSetupError(name, 0, f"{type(exc).__name__}: {exc}") from None


def _detail(exc: OSError) -> str:
    """What failed, without repeating the errno text JailSetupError adds itself."""
    if exc.filename is not None:
        return str(exc.filename)
    if exc.strerror and exc.errno and exc.strerror != os.strerror(exc.errno):
        return exc.strerror
    return ""


class _Exit:
    """The code os._exit will be called with; updated as set-up progresses."""

    def __init__(self) -> None:
        self.code = EXIT_SETUP_FAILED


# ---------------------------------------------------------------------------
# The set-up process.
# ---------------------------------------------------------------------------


def run_setup(plan: ChildPlan, channel_fd: int, target: Callable[[], object]) -> NoReturn:
    """Entry point of the forked child. Never returns."""
    exit_ = _Exit()
    try:
        # Garbage the parent left in reference cycles must never be collected
        # here: a finaliser would close an fd number that now means something else.
        gc.freeze()
        _setup(plan, channel_fd, target, exit_)
    finally:
        os._exit(exit_.code)


def _report(sock: socket.socket, err: JailSetupError) -> None:
    try:
        channel.send(sock, channel.encode_error(err.step, err.errno, err.detail))
    except OSError:
        pass  # the parent is gone or stopped listening; exiting is all that is left


def _setup(plan: ChildPlan, channel_fd: int, target: Callable[[], object], exit_: _Exit) -> None:
    # Wrapped now, long before any filter: making the object probes the fd
    # (getsockname), and sendmsg is then the only syscall sending costs.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=channel_fd)
    try:
        if not _still_wanted(plan):
            exit_.code = EXIT_PARENT_GONE
            return
        with step("signals"):
            _reset_signals()
            os.setsid()
        with step("fds"):
            arrange_fds([*plan.fds.moves, (channel_fd, plan.fds.channel)])
            sock.detach()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=plan.fds.channel)
            sock.settimeout(None)
        if plan.namespaces:
            _enter_namespaces(plan, sock)
        _drop_privileges(plan)
        # Changing uid cleared the parent-death signal; set it again, last.
        if not _still_wanted(plan):
            exit_.code = EXIT_PARENT_GONE
            return
        worker = _fork_worker(plan, sock, target)
        with step("handshake"):
            pidfd = os.pidfd_open(worker)
            try:
                channel.send(sock, channel.encode_pid(worker), (pidfd,))
            finally:
                os.close(pidfd)
    except JailSetupError as err:
        _report(sock, err)
        return
    exit_.code = 0               # done: the worker goes to the parent when we end


def _still_wanted(plan: ChildPlan) -> bool:
    """Arm the parent-death signal, then check the parent did not die before."""
    with step("parent-death"):
        prctl.set_pdeathsig(signal.SIGKILL)
    return os.getppid() == plan.parent_pid


def _reset_signals() -> None:
    """Default handling for every signal the parent's Python code handled (its
    handlers make no sense here), and nothing blocked."""
    for signum in signal.valid_signals():
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_namespaces(plan: ChildPlan, sock: socket.socket) -> None:
    flags = NAMESPACE_FLAGS | (syscalls.CLONE_NEWUSER if plan.user_namespace else 0)
    with step("namespaces"):
        if plan.user_namespace:
            # /proc/self/*_map belong to root when the process is not dumpable
            # (e.g. it changed uid): make them ours to write.
            prctl.set_dumpable(True)
        syscalls.unshare(flags)
    if plan.user_namespace and plan.map_ids is not None:
        with step("user-namespace"):
            _mapped_by_parent(sock)
    elif plan.user_namespace:
        with step("user-namespace"):
            uid, gid = plan.host_ids
            _write_proc("/proc/self/setgroups", "deny")
            _write_proc("/proc/self/uid_map", f"0 {uid} 1")
            _write_proc("/proc/self/gid_map", f"0 {gid} 1")
    with step("mount"):
        _pivot_to_empty_root(plan.mount_point)


def _mapped_by_parent(sock: socket.socket) -> None:
    """Have the parent map root here to its chosen host ids, then become them: no
    supplementary group of the caller's, root's gid and uid (host: the mapped ids)."""
    channel.send(sock, channel.encode_userns())
    # The parent answers within its own set-up deadline or kills us; this bound is a
    # second line only (a parent that stopped running).
    reply = channel.receive(sock, time.monotonic() + MAP_WAIT)
    if reply is None or reply.kind != "mapped":
        raise JailSetupError("user-namespace", errno.EPROTO, "the parent did not map the user namespace")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _pivot_to_empty_root(mount_point: str) -> None:
    """Make an empty read-only tmpfs the root and detach every host mount."""
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
    flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("tmpfs", mount_point, "tmpfs", flags, EMPTY_ROOT_OPTIONS)
    os.chdir(mount_point)
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching
    # the top of "." then leaves only the tmpfs, with no directory needed for it.
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def _drop_privileges(plan: ChildPlan) -> None:
    """Securebits and bounding set (they need CAP_SETPCAP), then uid, then every
    capability set, then no_new_privs; each verified after."""
    may_setpcap = bool(syscalls.capget()[0] & (1 << CAP_SETPCAP))
    if may_setpcap:
        with step("securebits"):
            # Raw prctl: python-prctl refuses the NO_CAP_AMBIENT_RAISE bits.
            syscalls.prctl(syscalls.PR_SET_SECUREBITS, SECUREBITS)
            if syscalls.prctl(syscalls.PR_GET_SECUREBITS) != SECUREBITS:
                raise JailSetupError("securebits", 0, "securebits did not stick")
        with step("bounding-set"):
            _drop_bounding_set()
    if plan.run_as is not None and not plan.user_namespace and os.geteuid() == 0:
        with step("identity"):
            uid, gid = plan.run_as
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
    with step("capabilities"):
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
        syscalls.capset_clear()
        _verify_no_capabilities(check_bounding=may_setpcap)
    with step("no-new-privs"):
        prctl.set_no_new_privs(1)
        if prctl.get_no_new_privs() != 1:
            raise JailSetupError("no-new-privs", 0, "no_new_privs did not stick")


def _drop_bounding_set() -> None:
    for cap in range(MAX_CAPS):
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # past the last capability this kernel has
                return
            raise


def _verify_no_capabilities(check_bounding: bool) -> None:
    effective, permitted, inheritable = syscalls.capget()
    if effective or permitted or inheritable:
        raise JailSetupError("capabilities", errno.EPERM, "capabilities still set after capset")
    if check_bounding and any(_in_bounding_set(cap) for cap in range(MAX_CAPS)):
        raise JailSetupError("bounding-set", errno.EPERM, "bounding set not empty")


def _in_bounding_set(cap: int) -> bool:
    try:
        return syscalls.prctl(syscalls.PR_CAPBSET_READ, cap) == 1
    except OSError:
        return False  # EINVAL: no such capability on this kernel


def _fork_worker(plan: ChildPlan, sock: socket.socket, target: Callable[[], object]) -> int:
    with step("fork"):
        _make_lifeline(plan.fds)
        pid = os.fork()
    if pid == 0:
        run_worker(plan, sock, target)
    os.close(plan.fds.lifeline)
    return pid


def _make_lifeline(fds: FdPlan) -> None:
    """A pidfd of this (set-up) process at fds.lifeline, for the worker to watch: it turns
    readable only once this process has ended and the kernel has reparented its children."""
    ensure_fd_room(fds.lifeline + 1)
    pidfd = os.pidfd_open(os.getpid())
    if pidfd != fds.lifeline:
        os.dup2(pidfd, fds.lifeline, inheritable=False)
        os.close(pidfd)


# ---------------------------------------------------------------------------
# The worker.
# ---------------------------------------------------------------------------


def run_worker(plan: ChildPlan, sock: socket.socket, target: Callable[[], object]) -> NoReturn:
    """The worker's life: finish jailing, say ready, run the callable, _exit.

    An exception from the callable exits with EXIT_CALLABLE_RAISED without a
    traceback (printing one reads source files: under seccomp that kills).
    """
    exit_ = _Exit()
    try:
        if _jail_worker(plan, sock, exit_):
            exit_.code = EXIT_CALLABLE_RAISED
            target()
            exit_.code = 0
    except SystemExit as exc:
        exit_.code = _exit_code(exc.code)
    finally:
        os._exit(exit_.code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def _jail_worker(plan: ChildPlan, sock: socket.socket, exit_: _Exit) -> bool:
    """The worker's own set-up steps; True when jailed and the parent told."""
    try:
        with step("parent-death"):
            # Our parent is the set-up process until it ends; armed before, the signal
            # would fire then. So: wait for it to end (it does right after telling the
            # parent our pid), arm it (the parent is now the subreaper), then check the
            # parent did not go meanwhile (its end of the channel hangs up).
            if not _readable(plan.fds.lifeline, SETUP_EXIT_WAIT):
                raise JailSetupError("parent-death", errno.ETIMEDOUT, "the set-up process did not end")
            os.close(plan.fds.lifeline)
            prctl.set_pdeathsig(signal.SIGKILL)
            if _hung_up(sock):
                exit_.code = EXIT_PARENT_GONE
                return False
        with step("rlimits"):
            _set_limits(plan)
        with step("name"):
            prctl.set_name(plan.name)
            prctl.set_dumpable(plan.dumpable)
        _load_filter_and_say_ready(plan, sock)
    except JailSetupError as err:
        _report(sock, err)
        return False
    return True


def _set_limits(plan: ChildPlan) -> None:
    # The channel sits at fd N = RLIMIT_NOFILE: still usable, but no new fd can
    # ever get that number, and hard = soft so the limit cannot be raised again.
    resource.setrlimit(resource.RLIMIT_NOFILE, (plan.fds.nofile, plan.fds.nofile))
    for limit, value in (
        (resource.RLIMIT_CORE, plan.limits.core),
        (resource.RLIMIT_FSIZE, plan.limits.fsize),
        # Counted per uid and ignored for root outside a user namespace; seccomp
        # forbids fork anyway, this is the second lock.
        (resource.RLIMIT_NPROC, plan.limits.nproc),
        (resource.RLIMIT_DATA, plan.limits.data),
    ):
        if value is not None:
            resource.setrlimit(limit, (value, value))


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _hung_up(sock: socket.socket) -> bool:
    """The parent's end of the channel is closed: it is gone. (getppid() cannot tell: from
    inside the pid namespace it is always 0.)"""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in poller.poll(0))


def _load_filter_and_say_ready(plan: ChildPlan, sock: socket.socket) -> None:
    """Load the seccomp filter, then send "ready" and close the channel.

    After the filter is loaded only what the policy allows (plus sendmsg and
    close on the channel, and close on the listener, added by the jail) works, so
    everything needed afterwards is prepared before.
    """
    ready = channel.encode_ready()
    fds: tuple[int, ...] = ()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [plan.fds.listener]))]
    if plan.filter is not None:
        if plan.log_mode and plan.fds.listener < 0:
            raise JailSetupError(
                "seccomp", errno.EMFILE, "no free fd below RLIMIT_NOFILE for the log-mode listener; raise nofile_headroom"
            )
        with step("seccomp"):
            flags = syscalls.SECCOMP_FILTER_FLAG_NEW_LISTENER if plan.log_mode else 0
            listener = plan.filter.load(flags)
            if plan.log_mode and listener != plan.fds.listener:
                raise JailSetupError("seccomp", errno.EBADF, f"listener got fd {listener}, expected {plan.fds.listener}")
            if plan.log_mode:
                fds = (listener,)
    with step("handshake"):
        sock.sendmsg([ready], ancillary if fds else [])
        for fd in fds:
            os.close(fd)
        sock.close()
