"""The worker's supervisor: one state machine per device, driven by the event loop.

It never waits. Every step is a transition taken when something the loop watches happens
(the worker's command socket is readable or writable, its exit fd fired) or a deadline
passes; callers pass a callback that hears how their request ended::

    idle ──start──> starting ──"activate" answered──> active ──stop──> stopping ──ended──> idle
                      │ refused, ended,                │  │                (graceful "kill": the
                      │ no answer in time              │  │ ended           worker replies with its
                      v                                │  v                 state and exits;
       idle (first start: the caller hears why)       │ restarting         SIGKILL at the deadline)
       or the next restart                             │  │ backoff timer
                                                       │  v
                        no answer within               │ starting (resume at the used index)
                        request_timeout                │  │ more than max_restarts deaths in
                                                       v  v restart_window
                                              unresponsive  failed ──start (an operator's reset)──> starting
                                              (SIGKILL; its end is a death like any other)

A replacement worker resumes every ring at the used index in guest memory: buffers the dead
one took and never returned are taken again (releasing a page twice is harmless; a buffer
is never returned twice, since the used index in memory counts only what was returned).

Sends to the worker never block: datagrams wait in a bounded queue until the socket is
writable; a worker that lets the queue fill is unresponsive. Any request outstanding longer
than ``request_timeout`` makes the worker unresponsive too, so every operator request is a
liveness check (``check_alive`` sends a ping when nothing else is outstanding).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control import worker_ids
from control.errors import WorkerError
from control.logs import VmLog
from control.loop import EventLoop, Timer
from control.spawner import SPAWNER, Job
from control.zygote import ZYGOTE, ZygoteUnavailable
from control.jailed import spawn_jailed_worker
from control.workers import WorkerHandle, spawn_worker
from device.balloon import SECCOMP_POLICY, QueueSpec, queue_layout
from device.command import (MAX_MESSAGE, Activate, CountersEvent, Envelope, ErrorEvent, Kill,
                            LogEvent, Message, PartialPage, Ping, ProtocolError, RegionSpec, Reply,
                            RingBases, RingSpec, SetCallFd, SetPoison, StatsEvent, UsedRing, decode,
                            encode)
from device.memory import MemoryRegion

log = logging.getLogger("vballoon.supervisor")

IDLE, STARTING, ACTIVE, STOPPING = "idle", "starting", "active", "stopping"
RESTARTING, FAILED, UNRESPONSIVE = "restarting", "failed", "unresponsive"
MAX_OUTGOING = 64               # datagrams queued for a worker that is not reading
MAX_READS_PER_WAKE = 64         # datagrams read from the worker before others get a turn
GAUGES = frozenset({"pending_pages"})   # counters that are a level, not a running total


@dataclass(frozen=True)
class ProxyOptions:
    jail: bool = True                 # False: the worker runs in a thread (debug, benchmarks)
    seccomp_mode: str = "kill"        # "kill" or "log"
    policy: Path | None = None        # None: the device's own (device/balloon.policy)
    max_restarts: int = 5             # within restart_window seconds
    restart_window: float = 30.0
    request_timeout: float = 5.0      # a worker silent this long is unresponsive
    kill_grace: float = 1.0           # seconds a graceful stop may take before SIGKILL
    worker_ids: tuple[int, int] | None = None   # where each worker's own uid/gid comes from
    zygote: bool = True               # jailed workers fork from the small zygote process

    def policy_path(self) -> Path:
        return self.policy or SECCOMP_POLICY

    def acquire_id(self) -> int | None:
        """A uid of its own for the next jailed worker: from ``worker_ids`` (default
        ``DEFAULT_WORKER_IDS``) as root; unprivileged, from our subordinate ids (narrowed by
        ``worker_ids``), or None when we have none (the worker then maps our own uid)."""
        if not self.jail:
            return None
        if os.geteuid() == 0:
            return worker_ids.acquire([self.worker_ids or worker_ids.DEFAULT_WORKER_IDS])
        ranges = worker_ids.unprivileged_ranges(self.worker_ids)
        return worker_ids.acquire(ranges) if ranges else None


@dataclass(frozen=True)
class Activation:
    """Everything a worker needs to serve the rings (kept to start replacements)."""

    regions: tuple[MemoryRegion, ...]
    queues: tuple[QueueSpec, ...]
    features: int
    stats_interval: float
    partial_pages: tuple[PartialPage, ...] = ()   # for the first worker only (see start)
    poison_val: int | None = None                 # the driver's (PAGE_POISON), once written

    def keep_fds(self) -> set[int]:
        return ({r.fd for r in self.regions} | {q.kick_fd for q in self.queues}
                | {q.call_fd for q in self.queues})

    def region_specs(self) -> list[RegionSpec]:
        return [RegionSpec(r.guest_addr, r.size, r.fd, r.file_offset, r.user_addr, r.page_size)
                for r in self.regions]

    def activate_message(self, resume: bool, carry: bool) -> Activate:
        queues = [RingSpec(q.config.size, q.config.desc_addr, q.config.avail_addr,
                           q.config.used_addr, q.config.event_idx, q.config.indirect,
                           q.kick_fd, q.call_fd, None if resume else q.next_avail)
                  for q in self.queues]
        return Activate(self.features, float(self.stats_interval), self.region_specs(), queues,
                        list(self.partial_pages) if carry else [], self.poison_val)

    def ring_bases_message(self) -> RingBases:
        return RingBases(self.features, self.region_specs(),
                         [UsedRing(q.config.used_addr) for q in self.queues])


Done = Callable[[Any], None]        # hears a result, or a WorkerError


@dataclass
class _Pending:
    kind: str
    done: Done
    timer: Timer


class _Channel:
    """One worker's command socket: a bounded queue of datagrams out, decoded messages in."""

    def __init__(self, loop: EventLoop, sock: socket.socket,
                 on_message: Callable[[Envelope], None], on_full: Callable[[], None],
                 logger: logging.LoggerAdapter | logging.Logger = log) -> None:
        self.loop = loop
        self.log = logger
        self.sock = sock
        self.out: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()
        self.on_message = on_message
        self.on_full = on_full
        self.eof = False
        sock.setblocking(False)
        loop.watch(sock, reader=self._readable)

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> bool:
        """Queue a datagram (with ``fds``, which must stay open until it is sent: the
        caller keeps them until the request is answered)."""
        if self.sock is None:
            return False
        if len(self.out) >= MAX_OUTGOING:
            self.on_full()
            return False
        self.out.append((data, fds))
        self._flush()
        return True

    def _flush(self) -> None:
        while self.out and self.sock is not None:
            data, fds = self.out[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.send(data)
            except BlockingIOError:
                break
            except OSError:
                self.out.clear()          # it is ending: its exit fd will say so
                break
            self.out.popleft()
        if self.sock is not None and not self.eof:
            self.loop.watch(self.sock, reader=self._readable,
                            writer=self._flush if self.out else None)

    def _readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            if self.sock is None:
                return
            try:
                data = self.sock.recv(MAX_MESSAGE + 1)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # The worker is ending; its exit fd is what says it has ended.
                self.eof = True
                self.loop.unwatch(self.sock)
                return
            try:
                envelope = decode(data)
            except ProtocolError as exc:
                self.log.warning("worker sent a bad message: %s", exc)
                continue
            self.on_message(envelope)

    def drain(self) -> None:
        """Read what is left (the worker has ended: its last replies and events)."""
        if self.sock is not None and not self.eof:
            self._readable()

    def close(self) -> None:
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
        self.out.clear()


class Supervisor:
    """Runs one device's worker (see the module docstring). ``on_event(kind, body)`` hears
    the worker's ``stats_event`` and ``counters`` events and ``"state"`` changes."""

    def __init__(self, loop: EventLoop, options: ProxyOptions,
                 on_event: Callable[[str, dict], None] = lambda kind, body: None,
                 name: str = "") -> None:
        self.loop = loop
        self.log = VmLog(log, name)
        self.options = options
        self.on_event = on_event
        self.state = IDLE
        self.worker: WorkerHandle | None = None
        self.activation: Activation | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._channel: _Channel | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._restart_times: list[float] = []
        self._restart_timer: Timer | None = None
        self._kill_timer: Timer | None = None
        self._start_done: Done | None = None
        self._stop_done: list[Done] = []
        self._stop_state: dict = {}
        self._unresponsive: str | None = None
        self._start_error: str | None = None
        self._exit_fd = -1
        self._worker_id: int | None = None
        self._job: Job | None = None                 # a jailed spawn under way
        self._job_parent_end: socket.socket | None = None
        self._spawn_token: object | None = None
        self._carry = False
        self._denied: dict[str, int] = {}
        self.counters_base: dict[str, int] = {}      # summed over workers that ended
        self.counters_current: dict[str, int] = {}   # the serving worker's latest

    # -- public transitions --------------------------------------------------------------------

    def start(self, activation: Activation, done: Done) -> None:
        """Start a worker for ``activation``; ``done(None)`` once it serves, or
        ``done(WorkerError)``. From ``failed`` this is an operator's reset: the restart
        budget starts afresh and the rings resume at their used index."""
        if self.state not in (IDLE, FAILED):
            done(WorkerError(f"the device is already {self.state}"))
            return
        resume = self.state == FAILED
        if resume:
            self._restart_times.clear()
        self.activation = activation
        self._start_done = done
        # Partial huge pages go to this start's first worker only: a replacement after a
        # crash cannot know what the dead one forgot (a deflate), so it starts without.
        self._carry = bool(activation.partial_pages)
        self._spawn(resume)

    def stop(self, done: Done) -> None:
        """Stop the worker: ``done(state)`` with its last state (ring bases, counters), or
        ``done({})`` if it could not give one (dead, stopped, past ``kill_grace``)."""
        self._stop_done.append(done)
        if self.state == STOPPING:
            return
        if self.state in (IDLE, FAILED, RESTARTING):
            if self._restart_timer is not None:
                self._restart_timer.cancel()
                self._restart_timer = None
            self._set_state(IDLE)
            self._finish_stop()
            return
        if self.worker is None:
            # Nothing runs (a start that failed before a worker existed): stopped already.
            self._set_state(IDLE)
            start_done, self._start_done = self._start_done, None
            if start_done is not None:
                start_done(WorkerError("stopped before it started serving"))
            self._finish_stop()
            return
        was = self.state
        self._set_state(STOPPING)
        self._stop_state = {}
        start_done, self._start_done = self._start_done, None
        if start_done is not None:
            start_done(WorkerError("stopped before it started serving"))
        if was == ACTIVE:
            self._request(Kill(), self._on_kill_reply, self.options.kill_grace)
        else:                              # starting, or unresponsive: nothing to ask
            self._kill()

    def terminate(self) -> None:
        """End everything now, waiting at most the reaping of a SIGKILLed process:
        ``serve`` shutting down (nobody needs the worker's state)."""
        for timer in (self._restart_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        job, self._job, self._spawn_token = self._job, None, None
        if job is not None:
            # A jail being set up: nothing waits for it. Not begun: it is skipped. Begun:
            # its worker finds its command socket closed and ends on its own, and its
            # result, if the loop is still running, is ended and released on arrival.
            job.cancelled = True
            job.done = lambda result: _discard(result) if isinstance(result, tuple) else None
            self._job_parent_end.close()
        worker = self.worker
        pending: list[_Pending] = []
        if worker is not None:
            worker.kill()
            if self._channel is not None:
                self._channel.close()
            self.loop.unwatch(self._exit_fd)
            worker.stop(self.options.kill_grace)
            self._forget_worker(worker, "terminated")
            pending = self._take_pending()
        self._set_state(IDLE)
        start_done, self._start_done = self._start_done, None
        if start_done is not None:
            start_done(WorkerError("serve is shutting down"))
        self._finish_stop()
        self._fail(pending, "terminated")

    def request(self, message: Message, done: Done, timeout: float | None = None) -> None:
        """Ask the serving worker; ``done(result)`` or ``done(WorkerError)``, never later
        than ``timeout`` (default ``request_timeout``), after which it is unresponsive."""
        if self.state != ACTIVE or self._channel is None:
            done(WorkerError(f"no worker to ask ({self.state})"))
            return
        self._request(message, done, timeout)

    def swap_call_fd(self, index: int, fd: int, done: Done) -> None:
        """Have the serving worker signal queue ``index`` on ``fd`` from now on (the VMM
        swapped its call fd); ``done(None)``, or ``done(WorkerError)`` if there is no
        serving worker to tell (then a restart with the new fd is the way). The next
        workers get ``fd`` too. ``fd`` must stay open until ``done``."""
        activation = self.activation
        if self.state != ACTIVE or activation is None or index >= len(activation.queues):
            done(WorkerError(f"no serving worker to give the call fd to ({self.state})"))
            return
        name = queue_layout(activation.features)[index]

        def answered(result: Any) -> None:
            if not isinstance(result, WorkerError) and self.activation is activation:
                queues = list(activation.queues)
                queues[index] = dataclasses.replace(queues[index], call_fd=fd)
                self.activation = dataclasses.replace(activation, queues=tuple(queues))
            done(result if isinstance(result, WorkerError) else None)
        self._request(SetCallFd(name), answered, None, fds=(fd,))

    def set_poison(self, value: int) -> None:
        """The driver wrote ``poison_val``: tell the worker serving or starting (commands
        follow its activation in order) and every later one."""
        if self.activation is not None:
            self.activation = dataclasses.replace(self.activation, poison_val=value)
        if self.state in (STARTING, ACTIVE) and self._channel is not None:
            self._request(SetPoison(value), lambda result: None, None)

    def check_alive(self) -> None:
        """Make sure a liveness check is running: any outstanding request is one."""
        if self.state == ACTIVE and not self._pending:
            self._request(Ping(), lambda result: None, None)

    def denials(self) -> dict[str, int] | None:
        """``--seccomp log``: syscalls outside the policy so far, by name; else None."""
        if self.options.seccomp_mode != "log" or not self.options.jail:
            return None
        worker = self.worker                # read once: it may end between two reads
        current = worker.denials() if worker is not None else {}
        return {name: self._denied.get(name, 0) + current.get(name, 0)
                for name in sorted(set(self._denied) | set(current))}

    def counters(self) -> dict[str, int]:
        """What the workers counted, summed over restarts."""
        names = set(self.counters_base) | set(self.counters_current)
        return {name: self.counters_base.get(name, 0) + self.counters_current.get(name, 0)
                for name in sorted(names)}

    # -- starting --------------------------------------------------------------------------------

    def _spawn(self, resume: bool) -> None:
        self._restart_timer = None
        self._set_state(STARTING)
        activation = self.activation
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:                 # out of fds: a failed start, not a stuck one
            self._start_failed(f"cannot make the worker's socket: {exc}")
            return
        if not self.options.jail:              # a thread: nothing slow to wait for
            try:
                worker = spawn_worker(child_end, [], self.options)
            except (WorkerError, OSError) as exc:
                parent_end.close()
                self._start_failed(str(exc))
                return
            finally:
                child_end.close()
            self._serve_with(worker, parent_end, activation, resume)
            return
        # Jailed: the jail's set-up runs on the spawner thread with copies of the fds,
        # each given to the worker under the number the activation names.
        copies: dict[int, int] = {}
        try:
            for fd in sorted(activation.keep_fds()):
                copies[os.dup(fd)] = fd
        except OSError as exc:
            for copy in copies:
                os.close(copy)
            parent_end.close()
            child_end.close()
            self._start_failed(f"cannot hand the worker its fds: {exc}")
            return
        command_fd = child_end.detach()        # the job owns it from here
        renumber = {**copies, command_fd: command_fd}
        options = self.options

        def run() -> tuple[WorkerHandle, int | None]:
            ident = options.acquire_id()
            try:
                if options.zygote and options.seccomp_mode == "kill":
                    try:
                        return ZYGOTE.spawn(renumber, command_fd, options.policy_path(), ident), ident
                    except ZygoteUnavailable as exc:
                        if exc.first:
                            log.warning("%s: forking workers from serve itself", exc.strerror)
                return spawn_jailed_worker(command_fd, sorted(renumber), options.policy_path(),
                                           options.seccomp_mode, ident, renumber), ident
            except BaseException:
                worker_ids.release(ident)
                raise
        token = self._spawn_token = object()
        self._job_parent_end = parent_end
        self._job = SPAWNER.submit(Job(run, self.loop, lambda result: self._spawned(
            token, result, parent_end, activation, resume), [*copies, command_fd]))

    def _spawned(self, token: object, result: Any, parent_end: socket.socket,
                 activation: Activation, resume: bool) -> None:
        if token is self._spawn_token:
            self._job = None
        if isinstance(result, BaseException):
            parent_end.close()
            if token is self._spawn_token and self.state == STARTING:
                self._start_failed(str(result))
            elif not isinstance(result, (WorkerError, OSError)):
                self.log.error("spawning a worker failed: %r", result)
            return
        worker, ident = result
        if token is not self._spawn_token or self.state != STARTING:
            # Stopped while its jail was being set up: not wanted any more.
            parent_end.close()
            _discard(result)
            return
        self._worker_id = ident
        # The newest activation: a poison value the driver wrote meanwhile is in it.
        self._serve_with(worker, parent_end, self.activation or activation, resume)

    def _serve_with(self, worker: WorkerHandle, parent_end: socket.socket,
                    activation: Activation, resume: bool) -> None:
        self.worker = worker
        self._channel = _Channel(self.loop, parent_end, self._on_message, self._on_queue_full,
                                 self.log)
        self._exit_fd = worker.exit_fd()
        self.loop.watch(self._exit_fd, reader=self._on_exit)
        carry, self._carry = self._carry, False
        try:
            self._request(activation.activate_message(resume, carry),
                          lambda result: self._on_activated(worker, result), None)
        except ProtocolError as exc:       # a bad activation fails the start
            self._start_error = f"cannot describe the activation: {exc}"
            self._kill()

    def _on_activated(self, worker: WorkerHandle, result: Any) -> None:
        if self.state != STARTING or self.worker is not worker:
            return                         # it ended meanwhile; the exit path decided
        if isinstance(result, WorkerError):
            self._start_error = f"the worker refused activation: {result}"
            self._kill()                   # its end completes the failed start
            return
        self._set_state(ACTIVE)
        done, self._start_done = self._start_done, None
        if done is not None:
            done(None)

    def _start_failed(self, why: str) -> None:
        self.last_exit = why
        done, self._start_done = self._start_done, None
        if done is not None:               # a first start: the caller decides what next
            self._set_state(IDLE)
            done(WorkerError(f"the worker failed to activate: {why}"))
            return
        self.log.error("restarting the worker failed: %s", why)
        self._schedule_restart()

    # -- stopping --------------------------------------------------------------------------------

    def _on_kill_reply(self, result: Any) -> None:
        if self.state != STOPPING:
            return
        if isinstance(result, WorkerError):
            self.log.warning("graceful stop failed (%s); killing the worker", result)
            self._kill()
            return
        self._stop_state = result
        # It exits right after replying; if it does not, it is killed at the deadline.
        self._arm_kill_timer()

    def _finish_stop(self) -> None:
        state, self._stop_state = self._stop_state, {}
        waiters, self._stop_done = self._stop_done, []
        for done in waiters:
            done(state)

    # -- ending ------------------------------------------------------------------------------

    def _kill(self) -> None:
        """End the worker now; its exit fd then completes whatever transition is under way."""
        worker = self.worker
        if worker is None:
            return
        worker.kill()
        if not self.options.jail and self._channel is not None:
            self._channel.close()          # a thread worker ends on EOF
        self._arm_kill_timer()

    def _arm_kill_timer(self) -> None:
        if self._kill_timer is None or not self._kill_timer.pending:
            self._kill_timer = self.loop.call_later(self.options.kill_grace, self._kill_overdue)

    def _kill_overdue(self) -> None:
        worker = self.worker
        if worker is not None:
            self.log.warning("worker %d has not ended %.1f s after it was told to: SIGKILL",
                        worker.pid, self.options.kill_grace)
            worker.kill()
            if self._channel is not None and not self.options.jail:
                self._channel.close()

    def _on_exit(self) -> None:
        worker = self.worker
        if worker is None:
            return
        if self._channel is not None:
            self._channel.drain()          # its last replies and events
        how = worker.reap()
        if how is None:
            return                         # not quite gone yet: the fd stays readable
        self._forget_worker(worker, how)
        pending = self._take_pending()
        state = self.state
        unresponsive, self._unresponsive = self._unresponsive, None
        start_error, self._start_error = self._start_error, None
        if state == STOPPING:
            self._set_state(IDLE)
            self._finish_stop()
        elif state == STARTING:
            self._start_failed(start_error or how)
        elif state in (ACTIVE, UNRESPONSIVE):
            if unresponsive is not None:
                how = f"{unresponsive}: {how}"
            self.last_exit = how
            self.log.warning("worker %d ended: %s", worker.pid, how)
            self._schedule_restart()
        self._fail(pending, how)

    def _forget_worker(self, worker: WorkerHandle, how: str) -> None:
        if self._exit_fd >= 0:
            self.loop.unwatch(self._exit_fd)
            self._exit_fd = -1
        worker.release()
        worker_ids.release(self._worker_id)
        self._worker_id = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        self.worker = None
        seen = worker.denials()
        if seen:
            for name, count in seen.items():
                self._denied[name] = self._denied.get(name, 0) + count
            self.log.warning("seccomp log mode: the worker used syscalls outside its policy: %s",
                        ", ".join(f"{name} x{count}" for name, count in sorted(seen.items())))
        final = self._stop_state.get("counters") if self._stop_state else None
        for name, value in (final or self.counters_current).items():
            if type(value) is int and name not in GAUGES:
                self.counters_base[name] = self.counters_base.get(name, 0) + value
        self.counters_current = {}

    def _take_pending(self) -> list[_Pending]:
        pending, self._pending = list(self._pending.values()), {}
        for item in pending:
            item.timer.cancel()
        return pending

    @staticmethod
    def _fail(pending: list[_Pending], how: str) -> None:
        """Tell the callers of requests the worker will never answer. Called only after
        the state says the worker is gone: a caller may at once ask for more."""
        for item in pending:
            item.done(WorkerError(f"the worker ended ({how})"))

    def _schedule_restart(self) -> None:
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times
                               if now - t < self.options.restart_window] + [now]
        if len(self._restart_times) > self.options.max_restarts:
            self.log.error("worker died %d times in %.0f s: not restarting",
                      len(self._restart_times), self.options.restart_window)
            self._set_state(FAILED)
            return
        self.restarts += 1
        self._set_state(RESTARTING)
        # The first restart is immediate (the guest may be waiting on a buffer); then back
        # off, so a passing failure (fork under memory pressure) does not use up the whole
        # budget in milliseconds.
        recent = len(self._restart_times)
        delay = 0.0 if recent <= 1 else min(1.0, 0.05 * 2 ** (recent - 2))
        self._restart_timer = self.loop.call_later(delay, lambda: self._spawn(resume=True))

    # -- talking to the worker ---------------------------------------------------------------

    def _request(self, message: Message, done: Done, timeout: float | None,
                 fds: tuple[int, ...] = ()) -> None:
        ident = self._next_id
        self._next_id += 1
        data = encode(message, ident)      # raises ProtocolError before anything is pending
        timer = self.loop.call_later(self.options.request_timeout if timeout is None else timeout,
                                     lambda: self._on_timeout(ident))
        self._pending[ident] = _Pending(message.TYPE, done, timer)
        if not self._channel.send(data, fds):
            pending = self._pending.pop(ident, None)
            if pending is not None:
                timer.cancel()
                done(WorkerError(f"cannot send {message.TYPE!r} to the worker"))

    def _on_timeout(self, ident: int) -> None:
        pending = self._pending.pop(ident, None)
        if pending is None:
            return
        pending.done(WorkerError(f"the worker did not answer {pending.kind!r} in time"))
        if self.state == ACTIVE:
            what = "a liveness check" if pending.kind == "ping" else repr(pending.kind)
            self._declare_unresponsive(f"unresponsive: did not answer {what} in "
                                       f"{self.options.request_timeout:g} s")

    def _on_queue_full(self) -> None:
        if self.state == ACTIVE:
            self._declare_unresponsive(f"unresponsive: left {MAX_OUTGOING} commands unread")

    def _declare_unresponsive(self, why: str) -> None:
        worker = self.worker
        self._unresponsive = why
        self._set_state(UNRESPONSIVE)
        self.log.error("worker %s is %s: replacing it", getattr(worker, "pid", "?"), why)
        self._kill()                       # its end is handled like any death

    def _on_message(self, envelope: Envelope) -> None:
        match envelope.message:
            case Reply(ok=ok, error=error, result=result):
                pending = self._pending.pop(envelope.id, None)
                if pending is None:
                    return
                pending.timer.cancel()
                if ok:
                    pending.done(result or {})
                else:
                    pending.done(WorkerError(f"the worker refused {pending.kind!r}: {error}"))
            case LogEvent(level=level, message=text):
                log.log(level, "worker: %s", text)
            case ErrorEvent(queue=queue, message=text):
                self.log.warning("guest error on %s queue: %s", queue, text)
            case CountersEvent(values=values):
                self.counters_current = dict(values)
                self.on_event("counters", {"values": values})
            case StatsEvent(values=values, updated=updated):
                self.on_event("stats_event", {"values": values, "updated": updated})
            case other:
                self.log.warning("worker sent a %s, which only the parent sends", other.TYPE)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.on_event("state", {"state": state})


def _discard(spawned: tuple[WorkerHandle, int | None]) -> None:
    """End a worker nobody wants any more (its spawn finished too late) and free its id."""
    worker, ident = spawned
    worker.kill()
    worker.release()
    worker_ids.release(ident)


def read_ring_bases(loop: EventLoop, options: ProxyOptions, activation: Activation,
                    done: Done, logger: logging.LoggerAdapter | logging.Logger = log) -> None:
    """Have a fresh worker read where each ring stands (its used index in guest memory),
    for when the serving one could not say: ``done({queue: index})`` or
    ``done(WorkerError)``, within ``request_timeout``. The parent never maps guest memory."""
    _Probe(loop, options, activation, done, logger).start()


class _Probe:
    def __init__(self, loop: EventLoop, options: ProxyOptions, activation: Activation,
                 done: Done, logger: logging.LoggerAdapter | logging.Logger = log) -> None:
        self.loop = loop
        self.log = logger
        self.options = options
        self.activation = activation
        self.done: Done | None = done
        self.worker: WorkerHandle | None = None
        self.channel: _Channel | None = None
        self.exit_fd = -1
        self.timer: Timer | None = None
        self.worker_id: int | None = None

    def start(self) -> None:
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._finish(WorkerError(f"cannot make a socket to read the rings: {exc}"))
            return
        keep = sorted({r.fd for r in self.activation.regions} | {child_end.fileno()})
        try:
            self.worker_id = self.options.acquire_id()
            self.worker = spawn_worker(child_end, keep, self.options, self.worker_id)
        except (WorkerError, OSError) as exc:
            parent_end.close()
            worker_ids.release(self.worker_id)
            self._finish(WorkerError(f"cannot start a worker to read the rings: {exc}"))
            return
        finally:
            child_end.close()
        self.channel = _Channel(self.loop, parent_end, self._on_message, lambda: None, self.log)
        self.exit_fd = self.worker.exit_fd()
        self.loop.watch(self.exit_fd, reader=self._on_exit)
        self.timer = self.loop.call_later(self.options.request_timeout, self._on_timeout)
        self.channel.send(encode(self.activation.ring_bases_message(), 1))

    def _on_message(self, envelope: Envelope) -> None:
        reply = envelope.message
        if not isinstance(reply, Reply) or envelope.id != 1:
            return
        if not reply.ok:
            self._finish(WorkerError(f"reading the ring bases failed: {reply.error}"))
            return
        bases = (reply.result or {}).get("ring_bases", {})
        self.log.info("ring bases read from guest memory by a fresh worker: %s", bases)
        self._finish({str(name): int(base) for name, base in bases.items()})

    def _on_timeout(self) -> None:
        self._finish(WorkerError("the worker reading the ring bases did not answer in time"))
        if self.worker is not None:
            self.worker.kill()
            if self.channel is not None and not self.options.jail:
                self.channel.close()

    def _on_exit(self) -> None:
        if self.channel is not None:
            self.channel.drain()
        how = self.worker.reap()
        if how is None:
            return
        self.loop.unwatch(self.exit_fd)
        self.worker.release()
        worker_ids.release(self.worker_id)
        if self.channel is not None:
            self.channel.close()
        if self.timer is not None:
            self.timer.cancel()
        self._finish(WorkerError(f"the worker reading the ring bases ended: {how}"))

    def _finish(self, result: Any) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(result)
        if not isinstance(result, WorkerError) and self.channel is not None and not self.options.jail:
            self.channel.close()           # a thread worker ends on EOF
