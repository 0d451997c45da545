"""Run a callable in a forked child that is jailed before the callable starts.

::

    child = spawn(worker_loop, JailConfig(keep_fds=[mem_fd, sock_fd], seccomp=policy))
    ...
    status = child.wait(timeout=5)        # ExitStatus: status.describe() -> words

When `spawn` returns, the process running the callable (host pid `child.pid`):

- holds exactly the keep fds (at their numbers, or renumbered), with 0/1/2 on
  /dev/null unless kept, and nothing else;
- is pid 1 of new pid, net, ipc, uts and mount namespaces (plus a user namespace
  when the caller is not root), with an empty read-only tmpfs as its root: no
  host file is visible;
- has no capabilities in any set, locked securebits, no_new_privs, and as root
  outside a user namespace runs as `run_as` (nobody by default); in a user
  namespace, as the caller's ids or, with `map_ids`, as those (mapped by the parent);
- has RLIMIT_NOFILE just above its fds (plus `nofile_headroom`), and
  RLIMIT_CORE/FSIZE/NPROC 0;
- is named `config.name`, dies with SIGKILL when the spawning thread's process
  dies, and runs under the seccomp filter compiled from `config.seccomp`, whose
  default action kills the whole process (or, in log mode, reports the call).

If any step fails, `spawn` raises `JailSetupError(step, errno)` instead, the
child is already gone, and nothing of it is left running. `spawn` never waits
longer than `config.setup_timeout`.

Lifecycle of a `JailedChild`::

    spawn() ─> running ─┬─ callable returns / raises / calls os._exit ─┐
                        ├─ kill() (SIGKILL) ───────────────────────────┤─> ended ─ wait()/poll() ─> reaped
                        └─ denied syscall (seccomp, SIGSYS) ───────────┘

`spawn` makes the calling process a child subreaper (PR_SET_CHILD_SUBREAPER): the
set-up process that forks the worker into its namespaces ends at once, and the worker
becomes this process's child. Its parent-death signal is then tied to this process's
first live thread (normally the main thread): the worker dies with the process.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import signal
import socket
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence, cast

import prctl
import pyseccomp

from sandbox import _child, channel, idmap
from sandbox.errors import JailSetupError, WaitTimeout
from sandbox.fds import FdPlan, normalise_keep, plan_fds, target_map
from sandbox.notify import DenialLog
from sandbox.policy import Compare, Expr, Policy
from sandbox.status import ExitStatus
from sandbox.syscalls import LoadableFilter

SeccompMode = Literal["kill", "log", "off"]
NOBODY = (65534, 65534)
MOUNT_POINTS = ("/tmp", "/mnt", "/run", "/var")
"""Existing directories one of which the new root is mounted over (in the
child's private mount namespace only, and detached from the host at once)."""
MAX_NAME = 15
REAP_GRACE = 2.0
"""Seconds to wait for a process that was sent SIGKILL."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of the worker (soft = hard). None leaves one unchanged."""

    nofile_headroom: int = 16
    """fds the worker may open itself (an epoll, mmap's dup of each mapped fd)
    above its highest kept fd; RLIMIT_NOFILE = highest kept + 1 + headroom."""
    fsize: int | None = 0
    nproc: int | None = 0
    core: int | None = 0
    data: int | None = None
    """RLIMIT_DATA in bytes: the private writable memory (heap) it may have in all,
    counting what it inherits from the parent at fork."""


@dataclass(frozen=True)
class JailConfig:
    """How to jail the child. Raises ValueError on inconsistent settings.

    - keep_fds: fds of the parent the child keeps (sorted and de-duplicated here).
    - renumber: None keeps numbers; an int n renumbers them n, n+1, ... in order;
      a mapping {parent fd: child fd} places each one. See `child_fds()`.
    - seccomp / seccomp_mode: the policy, enforced ("kill": a denied syscall kills
      the process with SIGSYS), reported ("log": allowed, counted in
      `JailedChild.denials()`), or not loaded ("off").
    - namespaces: new pid/net/ipc/uts/mount namespaces and an empty root.
    - user_namespace: None = only when not root; True/False to force.
    - run_as: (uid, gid) to become when root without a user namespace; None stays
      uid 0 (still without any capability).
    - map_ids: (uid, gid) on the host that root inside the user namespace maps to,
      written by the parent (as root itself, else with newuidmap/newgidmap from the
      caller's subordinate ids in /etc/subuid and /etc/subgid); the child then runs
      as them. None maps the caller's own ids (all an unprivileged process may map
      without help).
    - dumpable: False makes the worker non-dumpable (no core dump can leak guest
      memory; /proc/<pid> files other than status/stat become root's).
    """

    keep_fds: Sequence[int] = ()
    name: str = "vballoon-worker"
    seccomp: Policy | None = None
    seccomp_mode: SeccompMode = "kill"
    namespaces: bool = True
    user_namespace: bool | None = None
    renumber: None | int | Mapping[int, int] = None
    limits: Limits = field(default_factory=Limits)
    run_as: tuple[int, int] | None = NOBODY
    map_ids: tuple[int, int] | None = None
    dumpable: bool = False
    setup_timeout: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fds", normalise_keep(self.keep_fds))
        encoded = self.name.encode()
        if not 0 < len(encoded) <= MAX_NAME or b"\0" in encoded:
            raise ValueError(f"name must be 1..{MAX_NAME} bytes without NUL (the kernel's comm)")
        if self.seccomp_mode not in ("kill", "log", "off"):
            raise ValueError(f"seccomp_mode must be 'kill', 'log' or 'off', not {self.seccomp_mode!r}")
        if self.seccomp_mode != "off" and self.seccomp is None:
            raise ValueError(f"seccomp_mode {self.seccomp_mode!r} needs a policy; use 'off' for none")
        if self.user_namespace and not self.namespaces:
            raise ValueError("a user namespace needs namespaces=True")
        if self.map_ids is not None and not self.uses_user_namespace():
            raise ValueError("map_ids needs a user namespace (user_namespace=True, or not root)")
        if self.setup_timeout <= 0:
            raise ValueError("setup_timeout must be positive")
        self.fd_plan()  # validates renumber and the limits

    def child_fds(self) -> dict[int, int]:
        """parent fd -> the number the callable sees it under."""
        return target_map(self.keep_fds, self.renumber)

    def fd_plan(self) -> FdPlan:
        return plan_fds(self.keep_fds, self.renumber, self.limits.nofile_headroom)

    def uses_user_namespace(self) -> bool:
        if not self.namespaces:
            return False
        return os.geteuid() != 0 if self.user_namespace is None else self.user_namespace


class JailedChild:
    """A running (or ended) jailed child. Use from one thread; always `wait()`
    or `close()` it (or use it as a context manager, which kills on exit).

    The worker is a direct child of the process that spawned it (a child subreaper: the
    set-up process that forked it into its namespaces has ended), so it is waited for
    and its status read directly."""

    def __init__(self, pid: int, pidfd: int, log: DenialLog | None):
        self._pid = pid
        self._pidfd = pidfd
        self._log = log
        self._status: ExitStatus | None = None
        # Closes the pidfd if the handle is dropped, but only in this process:
        # a forked child running a finaliser would close a number it reused.
        self._finalizer = weakref.finalize(self, _close_fds_if_owner, os.getpid(), [pidfd])

    @property
    def pid(self) -> int:
        """Host pid of the process running the callable (pid 1 inside its namespace)."""
        return self._pid

    @property
    def status(self) -> ExitStatus | None:
        """How it ended, once reaped by `poll()` or `wait()`."""
        return self._status

    def fileno(self) -> int:
        """A pidfd that becomes readable (for poll/epoll/selectors) once the child
        has ended and `poll()` will return its status without blocking."""
        if self._pidfd < 0:
            raise ValueError("JailedChild is closed")
        return self._pidfd

    def poll(self) -> ExitStatus | None:
        """The status if the child has ended (reaping it), else None."""
        if self._status is None:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid == 0:
                return None
            self._reaped(status)
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the child to end. Raises WaitTimeout after `timeout` seconds."""
        if self._status is None:
            if not _wait_readable(self._pidfd, timeout):
                raise WaitTimeout(f"jailed child {self._pid} still running after {timeout} s")
            _, status = os.waitpid(self._pid, 0)
            self._reaped(status)
        assert self._status is not None
        return self._status

    def kill(self) -> None:
        """SIGKILL the worker (no-op once it has ended); `wait()` then reports
        "killed by signal SIGKILL"."""
        if self._status is not None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already ended; waiting reports how

    def denials(self) -> dict[str, int]:
        """In log mode, syscall name -> times the policy would have denied it
        (complete once `wait()` returned); empty in other modes."""
        return {} if self._log is None else self._log.counts()

    def denial_examples(self) -> dict[str, list[tuple[int, ...]]]:
        """In log mode, a few distinct argument tuples per denied syscall."""
        return {} if self._log is None else self._log.examples()

    def close(self) -> None:
        """Kill the child if it still runs, reap it and release the pidfd."""
        if self._status is None:
            self.kill()
            self.wait(REAP_GRACE)
        self._finalizer()
        self._pidfd = -1

    def __enter__(self) -> JailedChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reaped(self, status: int) -> None:
        self._status = ExitStatus.from_wait_status(status)
        if self._log is not None:
            # The worker is gone, so the listener hangs up at once.
            self._log.join(REAP_GRACE)


def _close_fds_if_owner(owner: int, fds: list[int]) -> None:
    if os.getpid() != owner:
        return
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed through another path; nothing to release


def _wait_readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        if poller.poll(remaining):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


# ---------------------------------------------------------------------------
# spawn
# ---------------------------------------------------------------------------


def spawn(target: Callable[[], object], config: JailConfig) -> JailedChild:
    """Fork, jail, and run `target()` in the jailed child.

    Returns once the child is fully jailed (the callable may already be running).
    Raises JailSetupError(step, errno) if any step failed (the child is gone),
    PolicyError if the policy does not compile.
    """
    _check_open(config.keep_fds)
    plan = _make_plan(config)
    # The worker's set-up process ends once it forked it; the kernel then hands the worker
    # to the nearest child subreaper: this process, which waits for it itself.
    prctl.set_child_subreaper(1)
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid, setup_pidfd = _fork(plan, parent_end, child_end, target)
        return _handshake(parent_end, pid, setup_pidfd, plan, config)
    finally:
        parent_end.close()
        child_end.close()


def _check_open(fds: Sequence[int]) -> None:
    """Raise JailSetupError("fds", EBADF) for a keep fd that is not open, before
    spawn opens anything: its number could otherwise be reused by the set-up
    channel and handed to the child in its place."""
    for fd in fds:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise JailSetupError("fds", exc.errno or errno.EBADF, f"keep fd {fd} is not open") from None


def _fork(
    plan: _child.ChildPlan, parent_end: socket.socket, child_end: socket.socket, target: Callable[[], object]
) -> tuple[int, int]:
    """Fork the set-up process; (its pid, a pidfd for it). Raises JailSetupError("fork")."""
    try:
        pid = os.fork()
    except OSError as exc:
        raise JailSetupError("fork", exc.errno or 0, str(exc)) from None
    if pid == 0:
        # The socket objects must never close "their" numbers in the child.
        parent_end.detach()
        _child.run_setup(plan, child_end.detach(), target)
    child_end.close()
    try:
        return pid, os.pidfd_open(pid)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise JailSetupError("fork", exc.errno or 0, f"pidfd_open: {exc}") from None


def _handshake(sock: socket.socket, setup: int, setup_pidfd: int, plan: _child.ChildPlan, config: JailConfig) -> JailedChild:
    deadline = time.monotonic() + config.setup_timeout
    worker_pid, worker_pidfd, listener, ready, mapped = 0, -1, -1, False, False
    succeeded = False
    try:
        while not (ready and worker_pid):
            message = channel.receive(sock, deadline)
            if message is None:
                raise _ended_early(setup, setup_pidfd, worker_pid, worker_pidfd)
            if message.kind == "error":
                _close_all(message.fds)
                step, err, detail = cast("tuple[str, int, str]", message.fields)
                raise JailSetupError(step, err, detail)
            if message.kind == "userns" and plan.map_ids is not None and not mapped and not message.fds:
                uid, gid = plan.map_ids
                idmap.write_maps(setup, uid, gid, deadline - time.monotonic())
                channel.send(sock, channel.encode_mapped())
                mapped = True
            elif message.kind == "pid" and not worker_pid and len(message.fds) == 1:
                worker_pid, worker_pidfd = cast(int, message.fields[0]), message.fds[0]
            elif message.kind == "ready" and not ready and len(message.fds) == int(plan.log_mode):
                ready = True
                listener = message.fds[0] if message.fds else -1
            else:
                _close_all(message.fds)
                raise JailSetupError("handshake", errno.EPROTO, f"unexpected {message.kind!r} message")
        # "ready" comes after the set-up process ended (the worker waits for that): reap it.
        if _reap(setup, setup_pidfd) is None:
            raise JailSetupError("handshake", errno.ETIMEDOUT, "the set-up process did not end")
        log = DenialLog(listener) if listener >= 0 else None
        child = JailedChild(worker_pid, worker_pidfd, log)
        succeeded = True
        return child
    finally:
        if not succeeded:
            _abandon(setup, setup_pidfd, worker_pid, worker_pidfd)
            _close_all([worker_pidfd, listener])
        os.close(setup_pidfd)


def _ended_early(setup: int, setup_pidfd: int, worker: int, worker_pidfd: int) -> JailSetupError:
    """The channel closed without "ready": say how the child ended."""
    status = _reap(setup, setup_pidfd, worker_pidfd)
    if worker and status is not None:
        status = _reap(worker, worker_pidfd)         # ours since the set-up process ended
    step = "seccomp" if status is not None and status.killed_by_seccomp else "handshake"
    how = status.describe() if status is not None else "did not end"
    return JailSetupError(step, errno.ESRCH, f"the child ended before it was jailed: {how}")


def _abandon(setup: int, setup_pidfd: int, worker: int, worker_pidfd: int) -> None:
    """Kill and reap whatever is left of a child whose set-up failed."""
    _kill(worker_pidfd, setup_pidfd)
    for pid, pidfd in ((setup, setup_pidfd), (worker, worker_pidfd)):
        if pid and pidfd >= 0:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue            # reaped already (by _ended_early), or never ours
            _reap(pid, pidfd)


def _kill(*pidfds: int) -> None:
    for pidfd in pidfds:
        if pidfd >= 0:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended meanwhile


def _reap(pid: int, pidfd: int, *also: int) -> ExitStatus | None:
    """Reap ``pid``, killing it (and the ``also`` pidfds) if it does not end at once."""
    if not _wait_readable(pidfd, REAP_GRACE):
        _kill(pidfd, *also)
        if not _wait_readable(pidfd, REAP_GRACE):
            return None  # cannot happen for a SIGKILLed child; never block forever
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None      # not ours (yet): a worker whose set-up process still runs
    return ExitStatus.from_wait_status(status)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass  # was never ours or already closed; nothing to release


# ---------------------------------------------------------------------------
# Planning (parent side, before fork)
# ---------------------------------------------------------------------------


def _make_plan(config: JailConfig) -> _child.ChildPlan:
    fds = config.fd_plan()
    user_ns = config.uses_user_namespace()
    mode = config.seccomp_mode if config.seccomp is not None else "off"
    loadable = None
    if mode != "off":
        assert config.seccomp is not None
        loadable = _loadable_filter(config.seccomp, mode, fds.channel, fds.listener)
    return _child.ChildPlan(
        fds=fds,
        parent_pid=os.getpid(),
        namespaces=config.namespaces,
        user_namespace=user_ns,
        host_ids=(os.geteuid(), os.getegid()),
        map_ids=config.map_ids if user_ns else None,
        run_as=config.run_as,
        mount_point=next((p for p in MOUNT_POINTS if os.path.isdir(p)), "/tmp"),
        name=config.name,
        limits=_child.ChildLimits(fsize=config.limits.fsize, nproc=config.limits.nproc, core=config.limits.core,
                                  data=config.limits.data),
        dumpable=config.dumpable,
        filter=loadable,
        log_mode=mode == "log",
    )


def handshake_policy(policy: Policy, mode: SeccompMode, channel_fd: int, listener_fd: int) -> Policy:
    """`policy` plus what the worker does after loading it: sendmsg and close on
    the channel (an fd number at RLIMIT_NOFILE, so unusable once closed) and, in
    log mode, close of the listener after handing it over."""
    on_channel: Expr = ((Compare(0, "==", channel_fd),),)
    closable: Expr = on_channel
    if mode == "log" and listener_fd >= 0:
        closable = on_channel + ((Compare(0, "==", listener_fd),),)
    return policy.with_allowed("sendmsg", on_channel).with_allowed("close", closable)


@functools.lru_cache(maxsize=32)
def _loadable_filter(policy: Policy, mode: SeccompMode, channel_fd: int, listener_fd: int) -> LoadableFilter:
    default = pyseccomp.NOTIFY if mode == "log" else pyseccomp.KILL_PROCESS
    bpf = handshake_policy(policy, mode, channel_fd, listener_fd).to_bpf(default)
    return LoadableFilter(bpf)
