"""The one event loop: fds, timers and calls from other threads, and nothing that waits.

Everything the parent does happens in callbacks of one ``EventLoop``: a peer's fd became
readable or writable, a timer is due, another thread asked for something. A callback must
never block; work that takes time is a state with a deadline, not a wait.

Timers exist only while something is pending (a deadline, a retry): an idle loop sleeps in
one ``select`` with no timeout and wakes for nothing.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Callback = Callable[[], None]
log = logging.getLogger("vballoon.loop")


@dataclass(order=True)
class Timer:
    """A pending call; ``cancel()`` it when what it waited for happened."""

    when: float
    seq: int
    callback: Callback | None = field(compare=False)

    def cancel(self) -> None:
        self.callback = None

    @property
    def pending(self) -> bool:
        return self.callback is not None


class Registration:
    """What is watched on one fd: the object given, the epoll events and the callbacks.
    A new object each time an fd starts being watched, so a batch can tell a stale event
    (for an fd stopped and reused meanwhile) from a current one."""

    __slots__ = ("fileobj", "events", "reader", "writer")

    def __init__(self, fileobj: Any, events: int, reader: Callback | None,
                 writer: Callback | None) -> None:
        self.fileobj = fileobj
        self.events = events
        self.reader = reader
        self.writer = writer


def _fileno(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, int) and a == b)


class EventLoop:
    """epoll plus timers plus a thread-safe call queue; see the module docstring.

    (epoll is used directly rather than through ``selectors``: the loop runs twice for every
    MiB a guest inflates, and the wrapper's bookkeeping cost about as much as the poll.)
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, Registration] = {}
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._soon: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.watch(self._wake_r, reader=self._drain_wake)
        self.thread: threading.Thread | None = None
        self.closed = False

    # -- fds -------------------------------------------------------------------------------

    def watch(self, fileobj: Any, reader: Callback | None = None,
              writer: Callback | None = None) -> None:
        """Call ``reader`` when ``fileobj`` is readable and ``writer`` when writable;
        both None stops watching it. Replaces what was watched for it before. A closed
        object can still be stopped watching."""
        events = (select.EPOLLIN if reader else 0) | (select.EPOLLOUT if writer else 0)
        fd, current = self._lookup(fileobj)
        if current is not None and not _same(current[1].fileobj, fileobj):
            # Another object with this fd number: the one watched was closed while still
            # watched (the kernel dropped it from epoll). Forget it; watch the new one.
            self.watch(current[1].fileobj)
            current = None
        if not events:
            if current is not None:
                del self._registered[current[0]]
                try:
                    self._epoll.unregister(current[0])
                except OSError:
                    pass            # already closed: the kernel dropped it from epoll
            return
        if current is None:
            if fd < 0:
                raise ValueError(f"cannot watch a closed file ({fileobj!r})")
            self._epoll.register(fd, events)
            self._registered[fd] = Registration(fileobj, events, reader, writer)
            return
        registration = current[1]
        if registration.events != events:
            self._epoll.modify(current[0], events)
            registration.events = events
        # (Bound methods compare equal when they are the same method of the same object:
        # re-watching with the same callbacks, the hot path, changes nothing.)
        registration.fileobj = fileobj
        registration.reader = reader
        registration.writer = writer

    def _lookup(self, fileobj: Any) -> tuple[int, tuple[int, Registration] | None]:
        """``fileobj``'s fd and its registration as ``(fd, registration)``, if watched.
        A closed object (fileno -1) is found by identity."""
        fd = _fileno(fileobj)
        if fd >= 0:
            registration = self._registered.get(fd)
            return fd, ((fd, registration) if registration is not None else None)
        for number, registration in self._registered.items():
            if registration.fileobj is fileobj:
                return fd, (number, registration)
        return fd, None

    def unwatch(self, fileobj: Any) -> None:
        self.watch(fileobj)

    def watching(self, fileobj: Any) -> bool:
        return self._lookup(fileobj)[1] is not None

    def registration(self, fileobj: Any) -> Registration | None:
        """What is watched on ``fileobj`` now (for tests and diagnostics)."""
        found = self._lookup(fileobj)[1]
        return None if found is None else found[1]

    def registrations(self) -> list[Registration]:
        return list(self._registered.values())

    # -- time ------------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` after the callbacks of this batch (from the loop's thread)."""
        self._soon.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback`` in the loop's thread, soon (from any thread)."""
        self._soon.append(callback)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass            # a wake-up is already pending, or the loop is closed

    def call_sync(self, function: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``function`` in the loop's thread and return its result (or raise what it
        raised). From the loop's own thread it simply runs. Raises ``TimeoutError``."""
        if self.thread is None or threading.current_thread() is self.thread:
            return function()
        done = threading.Event()
        outcome: list = []

        def run() -> None:
            try:
                outcome.append((True, function()))
            except BaseException as exc:      # handed to the calling thread, not swallowed
                outcome.append((False, exc))
            done.set()
        self.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise TimeoutError("the event loop did not run the call in time")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    # -- running -----------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        while self._timers and not self._timers[0].pending:
            heapq.heappop(self._timers)
        if self._soon:
            return 0.0
        if not self._timers:
            return None
        return max(0.0, self._timers[0].when - time.monotonic())

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for the next event (at most ``timeout``, None: as long as it takes) and run
        every callback that is due."""
        due = self.next_timeout()
        if timeout is None or (due is not None and due < timeout):
            timeout = due
        if timeout is None:
            timeout = -1                                 # epoll: wait as long as it takes
        elif timeout <= 0:
            timeout = 0                                  # (a negative one would mean that)
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3     # epoll counts whole milliseconds
        registered = self._registered
        # Each event with the registration it was for: a callback earlier in this batch may
        # stop watching an fd, and its number may even be reused by a new registration at
        # once. Only what is still watched, as it is now, is called.
        ready = [(fd, mask, registered.get(fd)) for fd, mask in
                 self._epoll.poll(timeout, max(len(registered), 1))]
        for fd, mask, registration in ready:
            if registration is None or registered.get(fd) is not registration:
                continue
            if mask & ~select.EPOLLIN and registration.writer is not None:  # out, err, hup
                self._call(registration.writer)
                if registered.get(fd) is not registration:
                    continue
            if mask & ~select.EPOLLOUT and registration.reader is not None:
                self._call(registration.reader)
        self._run_timers()
        for _ in range(len(self._soon)):
            self._call(self._soon.popleft())

    def _call(self, callback: Callback) -> None:
        """The loop's last failure domain: the server and the peers catch their own
        errors; one that still escapes a callback (a bug) is logged with its traceback and
        the loop goes on serving everyone else."""
        try:
            callback()
        except Exception:
            log.exception("unexpected error in an event loop callback")

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            callback, timer.callback = timer.callback, None
            if callback is not None:
                self._call(callback)

    def run_forever(self, running: Callable[[], bool]) -> None:
        """Run until ``running()`` is false (checked after every batch)."""
        self.thread = threading.current_thread()
        while running():
            self.run_once()

    def wakeup_fd(self) -> int:
        """An fd whose writes wake the loop (for ``signal.set_wakeup_fd``)."""
        return self._wake_w.fileno()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._epoll.close()
        self._registered.clear()
        self._wake_r.close()
        self._wake_w.close()
