"""A balloon whose queues are served by a jailed worker, driven like the in-process one.

``ProxyBalloon`` has the interface of ``device.balloon.Balloon`` (features, config space,
target, activate, reset, snapshot/restore), so a VMM cannot tell them apart. The parent
keeps everything that is not guest data: negotiated features, config space (``actual`` is
written on the guest's hot path, once per MiB inflated, and answered here without a round
trip to the worker), the target, the last stats. The worker, forked into the jail at
activation, is the only process that maps guest memory.

Supervision (a thread per activation, which is also the thread that forks, since
PDEATHSIG follows the forking thread)::

    activate -> spawn worker -> "activate" -> serving
                    ^                           | worker died (any reason)
                    +---- restart (resume) -----+  at most max_restarts per window,
                                                   else state "failed"
    reset/kill -> "kill" (graceful, returns state) -> SIGKILL after a deadline

A replacement worker resumes every queue at the used index in guest memory: buffers the
dead worker took but never returned are taken again, and releasing a page twice is
harmless.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from control.errors import RequestError, WorkerError
from control.workers import WorkerHandle, spawn_worker
from device.balloon import PAGE_SIZE, BalloonControl, BalloonOptions, QueueSpec
from device.command import MAX_MESSAGE, ProtocolError, decode, request
from device.errors import InvalidTarget
from device.memory import MemoryRegion, validate_regions
from device.stats import StatsSnapshot

log = logging.getLogger("vballoon.proxy")

IDLE, ACTIVE, RESTARTING, FAILED = "idle", "active", "restarting", "failed"
UNRESPONSIVE = "unresponsive"      # active, but a liveness check went unanswered: replaced


@dataclass(frozen=True)
class ProxyOptions:
    jail: bool = True                 # False: the worker runs in a thread (debug, benchmarks)
    seccomp_mode: str = "kill"        # "kill" or "log"
    policy: Path | None = None        # None: the device's own (device/balloon.policy)
    max_restarts: int = 5             # within restart_window seconds
    restart_window: float = 30.0
    request_timeout: float = 5.0
    kill_grace: float = 1.0           # seconds a graceful kill may take before SIGKILL


@dataclass
class Activation:
    regions: tuple[MemoryRegion, ...]
    queues: tuple[QueueSpec, ...]


@dataclass
class SettleResult:
    """How a wait for the balloon to reach its target ended."""

    outcome: str                      # "settled", "stalled" or "timeout"
    target_pages: int
    actual_pages: int


@dataclass
class SettleWatch:
    """Decides when a wait for ``actual == target`` is over, and how. Pure: fed readings."""

    deadline: float
    stall: float
    last_actual: int
    last_move: float

    def check(self, actual: int, target: int, now: float) -> str | None:
        """"settled", "stalled" (``actual`` still for ``stall`` s), "timeout", or None."""
        if actual != self.last_actual:
            self.last_actual, self.last_move = actual, now
        if actual == target:
            return "settled"
        if now - self.last_move >= self.stall:
            return "stalled"
        if now >= self.deadline:
            return "timeout"
        return None


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict | None = None


class ProxyBalloon(BalloonControl):
    """The balloon device, its queues served by a jailed child (see the module docstring).

    Negotiation and config space are ``BalloonControl``'s, answered here in the parent;
    size requests raise ``RequestError`` instead of ``InvalidTarget``.
    """

    def __init__(self, options: BalloonOptions = BalloonOptions(),
                 proxy: ProxyOptions = ProxyOptions(),
                 on_config_change: Callable[[], None] | None = None) -> None:
        super().__init__(options, on_config_change)
        self.proxy = proxy
        self.stats = StatsSnapshot()
        self.state = IDLE
        self.restarts = 0
        self.last_exit: str | None = None
        self.worker: WorkerHandle | None = None
        self._activation: Activation | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._settle = threading.Condition(self._lock)
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._restart_times: list[float] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._denied: dict[str, int] = {}
        self._ping: tuple[int, float] | None = None     # (request id, answer-by) in flight
        self._unresponsive: str | None = None            # why the last worker was replaced

    # -- the Balloon interface -------------------------------------------------------------

    def is_active(self) -> bool:
        return self.state != IDLE

    def config_changed(self) -> None:
        with self._settle:
            self._settle.notify_all()

    def set_target_pages(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` pages. Raises ``RequestError`` if out of range."""
        try:
            super().set_target_pages(pages)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc

    def activate(self, regions: list[MemoryRegion], queues: list[QueueSpec]) -> None:
        """Fork the jailed worker and start serving; raises ``WorkerError`` if it cannot.

        On failure nothing keeps running: the worker (if any) is killed.
        """
        if self.state != IDLE:
            raise WorkerError("the device is already active")
        validate_regions(regions)
        if len(queues) != len(self.queue_names()):
            raise RequestError(f"{len(queues)} queues given, the features need "
                               f"{len(self.queue_names())}")
        self._activation = Activation(tuple(regions), tuple(queues))
        self.guest_pages = sum(r.size for r in regions) // PAGE_SIZE
        self._stopping.clear()
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._supervise, name="vballoon-supervisor",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(self.proxy.request_timeout * 2):
            self._start_error = WorkerError("the worker did not start in time")
        if self._start_error is not None:
            error = self._start_error
            self.kill()          # nothing keeps running; the negotiation is kept
            raise error

    def reset(self) -> dict:
        """Stop the worker (gracefully, then SIGKILL) and go back to idle; returns its state."""
        state = self.kill()
        self.acked_features = 0
        self.config.actual = 0
        self.config_changed()
        self._activation = None
        self.state = IDLE
        return state

    def kill(self) -> dict:
        """Graceful stop: the worker replies with its state and exits; SIGKILL if it won't."""
        self._stopping.set()
        state: dict = {}
        if self.worker is not None and self.state == ACTIVE:
            try:
                state = self.request("kill", timeout=self.proxy.kill_grace)
            except WorkerError as exc:
                log.warning("graceful stop failed (%s); killing the worker", exc)
                kill = getattr(self.worker, "kill", None)
                if kill is not None:
                    kill()          # no second grace: it already had its chance
        if self._thread is not None:
            # The supervisor ends the worker (SIGKILL after kill_grace) and then itself.
            self._thread.join(self.proxy.kill_grace + self.proxy.request_timeout + 5)
            if self._thread.is_alive():
                raise WorkerError("the supervisor did not stop")
            self._thread = None
        self._end_worker()
        self.state = IDLE        # a failure stays visible in last_exit
        return state

    def read_ring_bases(self) -> dict[str, int]:
        """Where each ring stands (its used index in guest memory), read by a fresh jailed
        worker: for when the serving one could not say (dead, stopped, too slow). The
        parent never maps guest memory itself. Raises ``WorkerError``; bounded by
        ``request_timeout``."""
        activation = self._activation
        if activation is None:
            return {}
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = sorted({child_end.fileno()} | {r.fd for r in activation.regions})
        try:
            worker = spawn_worker(child_end, keep, self.proxy)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        try:
            body = self._activate_body(activation, resume=True)
            parent_end.send(request("ring_bases", 1, features=body["features"],
                                    regions=body["regions"],
                                    queues=[{"used": q["used"]} for q in body["queues"]]))
            deadline = time.monotonic() + self.proxy.request_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([parent_end], [], [], left)[0]:
                    raise WorkerError("the worker reading the ring bases did not answer")
                message = decode(parent_end.recv(MAX_MESSAGE + 1))
                if message.type == "reply" and message.id == 1:
                    break
            if not message.body.get("ok"):
                raise WorkerError(f"reading the ring bases failed: {message.body.get('error')}")
            bases = message.body["result"]["ring_bases"]
            log.info("ring bases read from guest memory by a fresh worker: %s", bases)
            return {str(name): int(base) for name, base in bases.items()}
        except (OSError, ProtocolError, KeyError, TypeError) as exc:
            raise WorkerError(f"reading the ring bases failed: {exc}") from exc
        finally:
            parent_end.close()
            worker.stop(self.proxy.kill_grace)

    def terminate(self) -> None:
        """Stop at once, without the graceful "kill" (``serve`` shutting down: nobody needs
        the worker's state, and a stopped worker must not delay the exit): SIGKILL, reap."""
        with self._lock:
            worker = self.worker
            if self.state == ACTIVE:
                self.state = RESTARTING      # no request is sent to it any more
        self._stopping.set()
        kill = getattr(worker, "kill", None)
        if kill is not None:
            kill()
        self.kill()

    def snapshot(self) -> dict:
        return {**super().snapshot(), "stats": asdict(self.stats), "restarts": self.restarts}

    def kick_fds(self) -> dict[int, str]:
        return {}     # the worker watches them

    # -- host API for the balloon size -------------------------------------------------------

    def set_target_bytes(self, size: int) -> int:
        try:
            return super().set_target_bytes(size)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc

    def adjust_pages(self, delta: int) -> int:
        try:
            return super().adjust_pages(delta)
        except InvalidTarget as exc:
            raise RequestError(str(exc)) from exc

    def wait_settled(self, timeout: float, stall: float = 5.0,
                     progress: Callable[[int, int], None] | None = None) -> SettleResult:
        """Wait until ``actual == target``, or ``actual`` has not moved for ``stall`` seconds
        (the guest stopped making progress), or ``timeout``; says which."""
        now = time.monotonic()
        watch = SettleWatch(now + timeout, stall, self.config.actual, now)
        with self._lock:
            while True:
                target, actual = self.config.num_pages, self.config.actual
                if progress:
                    progress(actual, target)
                now = time.monotonic()
                outcome = watch.check(actual, target, now)
                if outcome is not None:
                    return SettleResult(outcome, target, actual)
                self._settle.wait(min(watch.deadline - now,
                                      watch.last_move + stall - now, 0.2))

    def check_alive(self) -> None:
        """Start a liveness check unless one is in flight; never waits. A worker that does
        not answer within ``request_timeout`` is reported ``unresponsive`` and replaced
        (SIGKILL; its replacement resumes the rings). Called on every operator request."""
        with self._lock:
            if self._ping is not None or self._sock is None or self.state != ACTIVE:
                return
            ident = self._next_id
            self._next_id += 1
            try:
                self._sock.send(request("ping", ident))
            except BlockingIOError:
                pass            # its queue is full: it is not reading; the clock runs anyway
            except OSError:
                return          # it just died; the supervisor knows
            self._ping = (ident, time.monotonic() + self.proxy.request_timeout)

    def _check_ping(self, worker: WorkerHandle) -> None:
        """Supervisor thread: act on an overdue liveness check."""
        ping = self._ping
        if ping is None or time.monotonic() < ping[1] or self.state != ACTIVE:
            return
        self.state = UNRESPONSIVE
        self._ping = None
        self._unresponsive = f"did not answer a liveness check in {self.proxy.request_timeout:g} s"
        log.error("worker %d did not answer a liveness check in %.1f s: replacing it",
                  worker.pid, self.proxy.request_timeout)
        kill = getattr(worker, "kill", None)
        if kill is not None:
            kill()              # its exit is seen next and handled like any other death

    def request_stats(self, wait: bool = True) -> bool:
        """Ask the worker to hand the stats buffer back so the guest refreshes it.

        With ``wait`` False the request is sent and not waited for (the server's loop
        must not block on the worker); True is then "asked", not "done".
        """
        if not wait:
            return self.send("stats")
        return bool(self.request("stats").get("requested"))

    def send(self, kind: str, **body) -> bool:
        """Send a request whose reply nobody waits for; False if there is no worker."""
        with self._lock:
            if self._sock is None or self.state != ACTIVE:
                return False
            ident = self._next_id
            self._next_id += 1
            try:
                self._sock.send(request(kind, ident, **body))
            except OSError:
                return False                # the worker just died; the supervisor knows
        return True

    # -- talking to the worker -----------------------------------------------------------------

    def request(self, kind: str, timeout: float | None = None, **body) -> dict:
        """Send a request to the worker and wait for its reply; raises ``WorkerError``."""
        with self._lock:
            sock = self._sock
            if sock is None or self.state != ACTIVE:
                raise WorkerError(f"no worker to ask ({self.state})")
            ident, pending = self._register()
            try:
                sock.send(request(kind, ident, **body))
            except OSError as exc:          # the worker just died; the supervisor knows
                self._pending.pop(ident, None)
                raise WorkerError(f"cannot reach the worker: {exc}") from exc
        if not pending.done.wait(self.proxy.request_timeout if timeout is None else timeout):
            self._pending.pop(ident, None)
            raise WorkerError(f"the worker did not answer {kind!r} in time")
        reply = pending.reply or {}
        if not reply.get("ok"):
            raise WorkerError(f"the worker refused {kind!r}: {reply.get('error')}")
        return reply.get("result") or {}

    # -- supervision (runs in the supervisor thread) -------------------------------------------

    def _supervise(self) -> None:
        try:
            self._start_worker(resume=False)
        except (WorkerError, OSError) as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        stop_by = None
        while self.worker is not None:
            if self._stopping.is_set():
                # kill(): the worker was asked to stop; it gets kill_grace to do so.
                stop_by = stop_by or time.monotonic() + self.proxy.kill_grace
                if time.monotonic() >= stop_by:
                    self._end_worker()
                    break
            worker, sock = self.worker, self._sock
            self._check_ping(worker)
            timeout = 0.1 if stop_by else 0.5
            if self._ping is not None:
                timeout = max(0.0, min(timeout, self._ping[1] - time.monotonic()))
            ready = select.select([worker.exit_fd(), sock], [], [], timeout)[0]
            if sock in ready and not self._read_worker(sock):
                # The socket closed: the worker is ending; its exit is what to wait for.
                ready = select.select([worker.exit_fd()], [], [], self.proxy.kill_grace)[0] \
                    or [worker.exit_fd()]
            if worker.exit_fd() in ready:
                # Read what the worker said before it ended: its last replies and events.
                while select.select([sock], [], [], 0)[0] and self._read_worker(sock):
                    pass
                if self._stopping.is_set():
                    self._end_worker()
                else:
                    self._on_worker_exit(worker)

    def _start_worker(self, resume: bool) -> None:
        """Fork a jailed worker and activate it; raises ``WorkerError`` if it won't serve."""
        activation = self._activation
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = sorted({child_end.fileno()} | {r.fd for r in activation.regions}
                      | {q.kick_fd for q in activation.queues}
                      | {q.call_fd for q in activation.queues})
        try:
            worker = spawn_worker(child_end, keep, self.proxy)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        # Sends to the worker never block the caller (the serve loop): a worker that does
        # not read is found out by its deadlines, not by a caller stuck in send().
        parent_end.setblocking(False)
        with self._lock:
            self.worker, self._sock = worker, parent_end
            self._ping = None
        ident, pending = self._register()
        try:
            parent_end.send(request("activate", ident, **self._activate_body(activation, resume)))
        except OSError as exc:             # it died before we could even ask
            self._pending.pop(ident, None)
            self._end_worker()
            raise WorkerError(f"the worker failed to activate: {worker.describe_exit()}") from exc
        deadline = time.monotonic() + self.proxy.request_timeout
        while not pending.done.is_set():
            left = deadline - time.monotonic()
            ready = select.select([parent_end, worker.exit_fd()], [], [], max(0.0, left))[0]
            if parent_end in ready and self._read_worker(parent_end):
                continue
            if ready or left <= 0:          # the socket closed, the worker ended, or time
                self._end_worker()
                why = worker.describe_exit() if ready else "no answer in time"
                self._pending.pop(ident, None)
                raise WorkerError(f"the worker failed to activate: {why}")
        if not pending.reply.get("ok"):
            self._end_worker()
            raise WorkerError(f"the worker refused activation: {pending.reply.get('error')}")
        with self._lock:
            self.state = ACTIVE

    def _activate_body(self, activation: Activation, resume: bool) -> dict:
        regions = [{"guest_addr": r.guest_addr, "size": r.size, "fd": r.fd,
                    "file_offset": r.file_offset, "user_addr": r.user_addr,
                    "page_size": r.page_size} for r in activation.regions]
        queues = [{"size": q.config.size, "desc": q.config.desc_addr,
                   "avail": q.config.avail_addr, "used": q.config.used_addr,
                   "event_idx": q.config.event_idx, "indirect": q.config.indirect,
                   "kick_fd": q.kick_fd, "call_fd": q.call_fd,
                   "next_avail": None if resume else q.next_avail}
                  for q in activation.queues]
        return {"features": self.acked_features, "regions": regions, "queues": queues,
                "stats_interval": float(self.options.stats_interval)}

    def _register(self) -> tuple[int, _Pending]:
        with self._lock:
            ident = self._next_id
            self._next_id += 1
            pending = self._pending[ident] = _Pending()
        return ident, pending

    def _read_worker(self, sock: socket.socket) -> bool:
        """Handle one datagram from the worker; False on EOF."""
        try:
            data = sock.recv(MAX_MESSAGE + 1)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            message = decode(data)
        except ProtocolError as exc:
            log.warning("worker sent a bad message: %s", exc)
            return True
        if message.type == "reply":
            ping = self._ping
            if ping is not None and ping[0] == message.id:
                self._ping = None
            pending = self._pending.pop(message.id, None)
            if pending is not None:
                pending.reply = message.body
                pending.done.set()
        elif message.type == "stats_event":
            self.stats = StatsSnapshot(message.body["values"], time.monotonic(),
                                       message.body["updated"])
        elif message.type == "log":
            log.log(message.body["level"], "worker: %s", message.body["message"])
        elif message.type == "error":
            log.warning("guest error on %s queue: %s", message.body["queue"],
                        message.body["message"])
        return True

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        self.last_exit = worker.describe_exit()
        if self._unresponsive is not None:
            self.last_exit = f"{self._unresponsive}: {self.last_exit}"
            self._unresponsive = None
        log.warning("worker %d ended: %s", worker.pid, self.last_exit)
        self._fail_pending("the worker died")
        self._end_worker()
        if not self._count_restart():
            return
        self.state = RESTARTING
        for _ in range(self.proxy.max_restarts + 1):
            # The first restart is immediate (the guest may be waiting on a buffer); then
            # back off, so a passing failure (say, fork under memory pressure) does not
            # use up the whole restart budget in milliseconds. kill() interrupts the wait.
            if self._stopping.wait(self._backoff()):
                return
            try:
                self._start_worker(resume=True)
                return
            except (WorkerError, OSError) as exc:
                log.error("restarting the worker failed: %s", exc)
                self.last_exit = str(exc)
                if not self._count_restart():
                    return
        self.state = FAILED

    def _backoff(self) -> float:
        recent = len(self._restart_times)
        return 0.0 if recent <= 1 else min(1.0, 0.05 * 2 ** (recent - 2))

    def _count_restart(self) -> bool:
        """Record a restart; False (and state "failed") once the rate limit is passed."""
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times
                               if now - t < self.proxy.restart_window] + [now]
        if len(self._restart_times) > self.proxy.max_restarts:
            self.state = FAILED
            log.error("worker died %d times in %.0f s: not restarting",
                      len(self._restart_times), self.proxy.restart_window)
            return False
        self.restarts += 1
        return True

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for waiter in pending:
            waiter.reply = {"ok": False, "error": why}
            waiter.done.set()

    def _end_worker(self) -> None:
        with self._lock:
            worker, sock = self.worker, self._sock
            self.worker, self._sock = None, None
        if sock is not None:
            sock.close()
        if worker is not None:
            worker.stop(self.proxy.kill_grace)
            self._report_denials(worker)

    def denials(self) -> dict[str, int] | None:
        """``--seccomp log``: syscalls outside the policy so far, by name; else None."""
        if self.proxy.seccomp_mode != "log" or not self.proxy.jail:
            return None
        current = self.worker.denials() if self.worker is not None else {}
        return {name: self._denied.get(name, 0) + current.get(name, 0)
                for name in sorted(set(self._denied) | set(current))}

    def _report_denials(self, worker: WorkerHandle) -> None:
        seen = getattr(worker, "denials", lambda: {})()
        if seen:
            for name, count in seen.items():
                self._denied[name] = self._denied.get(name, 0) + count
            log.warning("seccomp log mode: the worker used syscalls outside its policy: %s",
                        ", ".join(f"{name} x{count}" for name, count in sorted(seen.items())))
