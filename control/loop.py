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
import selectors
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


@dataclass
class _Watch:
    reader: Callback | None
    writer: Callback | None


class EventLoop:
    """``selectors`` plus timers plus a thread-safe call queue; see the module docstring."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._soon: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ,
                               _Watch(self._drain_wake, None))
        self.thread: threading.Thread | None = None
        self.closed = False

    # -- fds -------------------------------------------------------------------------------

    def watch(self, fileobj: Any, reader: Callback | None = None,
              writer: Callback | None = None) -> None:
        """Call ``reader`` when ``fileobj`` is readable and ``writer`` when writable;
        both None stops watching it. Replaces what was watched for it before."""
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        try:
            key = self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            key = None
        if not events:
            if key is not None:
                self.selector.unregister(fileobj)
            return
        if key is None:
            self.selector.register(fileobj, events, _Watch(reader, writer))
        elif key.events != events or key.data.reader != reader or key.data.writer != writer:
            # (Bound methods compare equal when they are the same method of the same
            # object: re-watching with the same callbacks, the hot path, changes nothing.)
            self.selector.modify(fileobj, events, _Watch(reader, writer))

    def unwatch(self, fileobj: Any) -> None:
        self.watch(fileobj)

    def watching(self, fileobj: Any) -> bool:
        try:
            self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    # -- time ------------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

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
        for key, mask in self.selector.select(timeout):
            # A callback earlier in this batch may have stopped watching this fd (or its
            # number may even be reused): only call what is still watched, as it is now.
            current = self.selector.get_map().get(key.fd)
            if current is None or current.fileobj is not key.fileobj:
                continue
            watch: _Watch = current.data
            if mask & selectors.EVENT_WRITE and watch.writer is not None:
                self._call(watch.writer)
                current = self.selector.get_map().get(key.fd)
                if current is None or current.fileobj is not key.fileobj:
                    continue
                watch = current.data
            if mask & selectors.EVENT_READ and watch.reader is not None:
                self._call(watch.reader)
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
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
