"""The balloon worker: the loop that runs in the jailed child.

It owns the only mapping of guest memory and is the only code that reads guest-controlled
data. It talks to the parent through one SOCK_SEQPACKET command socket (``device.command``)
and to the guest through the queues' kick and call fds. It uses ``poll`` (no extra fd),
``recvmsg`` on the socket (a ``set_call_fd`` command brings an fd) and plain ``write``, so
its syscall set stays small (``balloon.policy``). Every command waiting is handled in one
pass (at most ``MAX_COMMANDS_PER_PASS``), and a pass over a queue stops after
``MAX_RANGES_PER_PASS`` released ranges, so the parent is never kept waiting for long.
Counters go to the parent while they move, at most every ``COUNTERS_INTERVAL``.

Lifecycle::

    started --activate--> serving --kill--> (reply with state) exit
       |         |           |
       |         +--ring_bases--> (reply with the used indices) exit
       +---- socket EOF -----+--> exit (the parent is gone)

Guest errors never end the loop; they are counted and reported as ``error`` events, at
most ``MAX_ERROR_EVENTS_PER_SECOND`` a second so a hostile guest cannot flood the parent.
"""

from __future__ import annotations

import logging
import os
import array
import select
import socket
import time
from dataclasses import asdict

from device.balloon import BalloonQueues, QueueSpec, build_queues, queue_layout
from device.command import (FD_MESSAGES, MAX_MESSAGE, Activate, CountersEvent, ErrorEvent,
                            GetState, Kill, LogEvent, Message, Ping, ProtocolError, RegionSpec,
                            RequestStats, RingBases, SetCallFd, SetPoison, StatsEvent, clip,
                            decode, encode, reply_error, reply_ok)
from device.errors import DeviceError, GuestError, InvalidQueueConfig
from device.kicks import KickBudget
from device.memory import GuestMemory, MemoryRegion
from device.notify import drain_fd, signal_fd
from device.stats import StatsSnapshot
from device.virtqueue import QueueConfig

MAX_ERROR_EVENTS_PER_SECOND = 20
MAX_COMMANDS_PER_PASS = 64
COUNTERS_INTERVAL = 0.2          # seconds between counter reports while they move
MAX_PARTIAL_PAGES = 64           # partial huge pages handed to the next worker, at most ...
PARTIAL_PAGES_BUDGET = 32 * 1024  # ... and this many hex digits of bitmap in all
_POLL_IN = select.POLLIN | select.POLLPRI
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)   # room for a few; one is used


def _fds(ancillary: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    return fds


class _EventLogHandler(logging.Handler):
    """Forwards log records to the parent as ``log`` events."""

    def __init__(self, worker: "Worker") -> None:
        super().__init__()
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        self.worker.send(encode(LogEvent(record.levelno, clip(record.getMessage()))))


class Worker:
    """One worker: waits for ``activate``, then serves the queues until ``kill`` or EOF."""

    def __init__(self, command_fd: int, owns_fds: bool = True) -> None:
        self.command_fd = command_fd
        # A socket object only to receive fds with a command (recvmsg); writes stay os.write.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=command_fd)
        self.received_fds: set[int] = set()      # fds the parent sent us: ours to close
        self.owns_fds = owns_fds
        self.memory: GuestMemory | None = None
        self.queues: BalloonQueues | None = None
        self.kick_fds: dict[int, str] = {}
        self.again: set[str] = set()     # queues to process without waiting for a kick
        self.running = True
        self.poller = select.poll()
        self.poller.register(command_fd, _POLL_IN)
        self._errors_window = (0.0, 0)
        self.suppressed_errors = 0
        self.kicks = 0
        self.empty_kicks = 0              # kicks that found no buffer
        self.kick_pauses = 0              # times kicks went unwatched (empty-kick budget spent)
        self.unkicked: set[str] = set()   # queues whose kick fd hung up
        self._kick_budget = KickBudget()
        self._kicks_paused_until: float | None = None
        # Counters go to the parent at most every COUNTERS_INTERVAL, only when they moved
        # (no wake-ups when idle), so they survive this worker's death (issue 16.5).
        self._counters_dirty = False
        self._counters_sent_at = 0.0
        # A logger of its own, outside logging's registry: handlers inherited from the
        # parent would write to fd numbers that mean something else inside the jail, and
        # workers run as threads must not pile handlers onto one shared logger.
        self.log = logging.Logger("vballoon.worker", logging.INFO)
        self.log.addHandler(_EventLogHandler(self))

    def send(self, data: bytes) -> None:
        try:
            os.write(self.command_fd, data)
        except (BrokenPipeError, ConnectionResetError):
            self.running = False        # the parent is gone (or ended us): nothing to tell

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        # Queues are only looked at when kicked, or when a pass stopped at its budget with
        # buffers left (``self.again``): never on a command alone, since a driver that
        # went away without telling us may have freed and reused its rings' memory.
        while self.running:
            kicked = []
            for fd, mask in self.poller.poll(self._timeout()):
                if fd == self.command_fd:
                    if mask & _POLL_IN:
                        self._on_commands()
                    elif mask & _POLL_GONE:
                        self.running = False
                    continue
                name = self.kick_fds.get(fd)
                if name is None:
                    continue
                got = drain_fd(fd)
                if got is None or not got and mask & _POLL_GONE:
                    self._drop_kick_fd(fd, name)
                elif got:
                    kicked.append(name)
                    self.again.add(name)
            if kicked and self.unkicked:
                self.again |= self.unkicked      # looked at whenever another queue is kicked
            if self.queues is not None and self.running:
                found = 0
                for name in sorted(self.again):
                    handled = self.queues.process(name)
                    if name in kicked:
                        found += handled
                    if not self.queues.has_pending(name):
                        self.again.discard(name)
                now = time.monotonic()
                if kicked:
                    self._counted_kicks(len(kicked), found, now)
                elif self._kicks_paused_until is not None and now >= self._kicks_paused_until:
                    self._watch_kicks(True)
                self.queues.tick(now)
                if self._counters_dirty and now - self._counters_sent_at >= COUNTERS_INTERVAL:
                    self._send_counters(now)
        self._unmap()

    def _counted_kicks(self, count: int, found: int, now: float) -> None:
        self.kicks += count
        self._counters_dirty = True
        if found:
            self._kick_budget.found()
            return
        self.empty_kicks += count
        pause = self._kick_budget.spend(now)
        if pause:
            self.kick_pauses += 1
            self._kicks_paused_until = now + pause
            self._watch_kicks(False)

    def _watch_kicks(self, watch: bool) -> None:
        """Start or stop watching every kick fd (stopped: a kick waits in its eventfd)."""
        for fd in self.kick_fds:
            if watch:
                self.poller.register(fd, _POLL_IN)
            else:
                self.poller.unregister(fd)
        if watch:
            self._kicks_paused_until = None

    def _drop_kick_fd(self, fd: int, name: str) -> None:
        """A kick fd that hung up (a socket or pipe whose writer closed) would wake us for
        ever: stop watching it. Its queue is still looked at on the others' kicks."""
        self.poller.unregister(fd)
        del self.kick_fds[fd]
        self.unkicked.add(name)
        self.again.add(name)
        self.log.warning("the %s queue's kick fd hung up: it is looked at whenever another "
                         "queue is kicked", name)

    def counters(self) -> dict[str, int]:
        values = asdict(self.queues.counters) if self.queues is not None else {}
        return {**values, "kicks": self.kicks, "empty_kicks": self.empty_kicks,
                "kick_pauses": self.kick_pauses, "suppressed_errors": self.suppressed_errors}

    def _send_counters(self, now: float) -> None:
        self._counters_dirty = False
        self._counters_sent_at = now
        self.send(encode(CountersEvent(self.counters())))

    def _timeout(self) -> int | None:
        if self.queues is None:
            return None
        if self.again:
            return 0
        now = time.monotonic()
        due = self.queues.stats_timeout(now)
        if self._kicks_paused_until is not None:
            left = max(0.0, self._kicks_paused_until - now)
            due = left if due is None else min(due, left)
        if self._counters_dirty:
            left = max(0.0, self._counters_sent_at + COUNTERS_INTERVAL - now)
            due = left if due is None else min(due, left)
        return None if due is None else int(due * 1000) + 1

    def _on_commands(self) -> None:
        """Handle every command waiting (at most ``MAX_COMMANDS_PER_PASS``): a parent that
        sent several while a pass ran must not wait one pass per command."""
        ready = select.poll()
        ready.register(self.command_fd, _POLL_IN)
        for _ in range(MAX_COMMANDS_PER_PASS):
            self._on_command()
            if not self.running or not ready.poll(0):
                return

    def _on_command(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(MAX_MESSAGE + 1, _FD_SPACE,
                                                      socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            data, ancillary = b"", []    # the parent closed with commands unread: gone
        fds = _fds(ancillary)
        if not data:
            self._close_fds(fds)
            self.running = False
            return
        try:
            envelope = decode(data)
            if fds and type(envelope.message) not in FD_MESSAGES or \
                    type(envelope.message) in FD_MESSAGES and len(fds) != 1:
                raise ProtocolError(f"{envelope.message.TYPE} came with {len(fds)} fds")
        except ProtocolError as exc:
            self._close_fds(fds)
            self.send(reply_error(0, f"bad message: {exc}"))
            return
        try:
            result = self._handle(envelope.message, fds)
        except DeviceError as exc:
            self._close_fds(fds)
            self.send(reply_error(envelope.id, f"{type(exc).__name__}: {exc}"))
            return
        self.send(reply_ok(envelope.id, result))

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    def _handle(self, message: Message, fds: list[int]) -> dict:
        """One request's result; raises ``DeviceError`` to refuse it (the caller then
        closes ``fds``)."""
        match message:
            case SetCallFd(queue=queue):
                return self._set_call_fd(queue, fds[0])
            case Activate():
                return self._activate(message)
            case Kill():
                self.running = False
                return self._state()
            case RingBases():
                return self._ring_bases(message)
            case SetPoison(poison_val=value):
                if self.queues is not None:
                    self.queues.poison_val = value
                return {}
            case RequestStats():
                return {"requested": self.queues.request_stats() if self.queues else False}
            case GetState():
                return self._state()
            case Ping():
                return {"pid": os.getpid()}
        raise ProtocolError(f"{message.TYPE!r} is not a request")

    # -- requests ----------------------------------------------------------------------------

    @staticmethod
    def _regions(specs: list[RegionSpec]) -> list[MemoryRegion]:
        return [MemoryRegion(r.guest_addr, r.size, r.fd, r.file_offset, r.user_addr,
                             r.page_size) for r in specs]

    def _activate(self, message: Activate) -> dict:
        if self.queues is not None:
            raise ProtocolError("already active")
        regions = self._regions(message.regions)
        specs = [QueueSpec(QueueConfig(q.size, q.desc, q.avail, q.used, q.event_idx, q.indirect),
                           q.kick_fd, q.call_fd, q.next_avail) for q in message.queues]
        memory = GuestMemory(regions)
        try:
            built = build_queues(memory, message.features, specs)
        except DeviceError:
            memory.close()
            raise
        if self.owns_fds:
            # The mappings hold their own references: the passed fds are no longer needed,
            # and closing them keeps the jailed worker's fd set to one per kept object.
            for fd in sorted({r.fd for r in regions}):
                os.close(fd)
        self.memory = memory
        self.queues = BalloonQueues(memory, built,
                                    {name: s.call_fd for name, s in zip(built, specs)},
                                    message.stats_interval, self._on_guest_error, self._on_stats,
                                    features=message.features, poison_val=message.poison_val,
                                    logger=self.log)
        self.kick_fds = {s.kick_fd: name for name, s in zip(built, specs)}
        for fd in self.kick_fds:
            os.set_blocking(fd, False)
            self.poller.register(fd, _POLL_IN)
        for spec in specs:
            # A guest that stops draining its call fd (a paused VM, a full socketpair)
            # must not block the worker: a pending interrupt is as good as a new one.
            os.set_blocking(spec.call_fd, False)
        self.log.info("serving %s over %d MiB of guest memory%s", ", ".join(built),
                      memory.size >> 20,
                      " (resumed)" if any(s.next_avail is None for s in specs) else "")
        taken = self.queues.releaser.import_partial([(p.addr, p.bits) for p in message.partial_pages])
        if taken:
            self.log.info("took over %d partial huge pages from the previous worker", taken)
        self.again = set(built)          # buffers may be waiting already (a restart)
        for name, spec in zip(built, specs):
            built[name].enable_notification()
            if spec.next_avail is None:
                # A replacement worker: an interrupt the dead one owed may be lost.
                signal_fd(spec.call_fd)
        return {"queues": list(built)}

    def _set_call_fd(self, queue: str, fd: int) -> dict:
        if self.queues is None or queue not in self.queues.call_fds:
            raise InvalidQueueConfig(f"no queue {queue!r} to give a call fd to")
        os.set_blocking(fd, False)
        old = self.queues.call_fds[queue]
        self.queues.call_fds[queue] = fd
        self.received_fds.add(fd)
        if self.owns_fds or old in self.received_fds:
            self.received_fds.discard(old)
            os.close(old)
        # An interrupt may have gone to the old fd as the VMM swapped: one more is harmless.
        signal_fd(fd)
        return {"queue": queue}

    def _ring_bases(self, message: RingBases) -> dict:
        """Read each ring's used index from guest memory and end: what a replacement worker
        is started for when the one serving could not say where its rings stand."""
        self.running = False
        names = queue_layout(message.features)
        if len(names) != len(message.queues):
            raise InvalidQueueConfig(f"{len(message.queues)} queues given, the features "
                                     f"need {len(names)}")
        with GuestMemory(self._regions(message.regions)) as memory:
            return {"ring_bases": {name: memory.read_u16(q.used + 2)
                                   for name, q in zip(names, message.queues)}}

    def _state(self) -> dict:
        if self.queues is None:
            return {"active": False}
        return {"active": True, "ring_bases": self.queues.ring_bases(),
                "counters": self.counters(), "suppressed_errors": self.suppressed_errors,
                "partial_pages": [list(pair) for pair in self.queues.releaser.export_partial(
                    PARTIAL_PAGES_BUDGET)][:MAX_PARTIAL_PAGES]}

    # -- events ------------------------------------------------------------------------------

    def _on_guest_error(self, queue: str, exc: GuestError) -> None:
        now = time.monotonic()
        start, count = self._errors_window
        if now - start >= 1.0:
            start, count = now, 0
        if count >= MAX_ERROR_EVENTS_PER_SECOND:
            self.suppressed_errors += 1
        else:
            self.send(encode(ErrorEvent(queue, clip(f"{type(exc).__name__}: {exc}"))))
            count += 1
        self._errors_window = (start, count)

    def _on_stats(self, snapshot: StatsSnapshot) -> None:
        self.send(encode(StatsEvent(dict(snapshot.values), float(snapshot.updated_wall or 0.0))))

    def _unmap(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._close_fds(sorted(self.received_fds))
        self.received_fds.clear()
        self.sock.detach()               # the fd is the caller's to close


def run_worker(command_fd: int, owns_fds: bool = True) -> None:
    """Entry point for the worker: serve until told to stop or the parent is gone.

    ``owns_fds`` is True in a jailed child (its fds are its own copies) and False when the
    worker runs as a thread of the VMM, whose fds it must leave alone.
    """
    Worker(command_fd, owns_fds).run()
