"""The guest console as seen from the host: a bounded, searchable byte log.

A background thread drains the read end of the console pipe as fast as the guest
writes it. Draining matters: UML writes its console synchronously, so a full pipe
would stall every guest process that prints, including the kernel. The log keeps
the newest ``limit`` bytes; offsets are absolute (bytes since boot) so a reader
can remember "where I was" across the oldest bytes being dropped.
"""

from __future__ import annotations

import os
import re
import threading
import time

from guest.errors import ConsoleOverrun

READ_CHUNK = 64 * 1024
DEFAULT_LIMIT = 8 * 1024 * 1024


class ConsoleLog:
    """Reads ``fd`` until EOF on a daemon thread and keeps the newest bytes.

    Guarantees: at most ``limit`` bytes are held; ``fd`` is read in chunks of at
    most ``READ_CHUNK``; every wait takes a deadline. Takes ownership of ``fd``:
    the reader thread closes it when it reaches EOF or an error, so no other
    thread ever closes a number this one may still read.
    """

    def __init__(self, fd: int, limit: int = DEFAULT_LIMIT, name: str = "console") -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self._fd = fd
        self._limit = limit
        self._buf = bytearray()
        self._base = 0  # absolute offset of self._buf[0]
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)

    def start(self) -> None:
        """Starts the reader thread (once)."""
        self._thread.start()

    def _drain(self) -> None:
        try:
            self._read_until_eof()
        finally:
            os.close(self._fd)
            self._fd = -1
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _read_until_eof(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, READ_CHUNK)
            except OSError:  # EIO and the like: nothing more will come; the log says the rest
                return
            if not chunk:
                return
            with self._cond:
                self._buf += chunk
                excess = len(self._buf) - self._limit
                if excess > 0:
                    del self._buf[:excess]
                    self._base += excess
                self._cond.notify_all()

    @property
    def end(self) -> int:
        """Absolute offset just past the newest byte received."""
        with self._cond:
            return self._base + len(self._buf)

    @property
    def eof(self) -> bool:
        """True once the guest side of the pipe is closed (the guest has exited)."""
        with self._cond:
            return self._eof

    def wait_for(self, pattern: re.Pattern[bytes], start: int, deadline: float) -> re.Match[bytes] | None:
        """Waits until ``pattern`` matches the bytes from absolute offset ``start``.

        Returns the match (positions relative to ``start``), or None when the
        deadline (a ``time.monotonic()`` value) passes or the console reaches EOF
        without a match. Raises :class:`ConsoleOverrun` if bytes at ``start`` were
        already dropped to respect the size limit.
        """
        with self._cond:
            while True:
                if start < self._base:
                    raise ConsoleOverrun(f"console bytes from offset {start} were dropped (limit {self._limit})")
                match = pattern.search(bytes(self._buf[start - self._base :]))
                if match is not None:
                    return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def text(self, start: int = 0, tail: int | None = None) -> str:
        """The log from absolute offset ``start`` (or its last ``tail`` bytes), decoded leniently."""
        with self._cond:
            data = bytes(self._buf[max(start - self._base, 0) :])
        if tail is not None:
            data = data[-tail:]
        return data.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def join(self, timeout: float) -> bool:
        """Waits for the reader thread to end (EOF: every writer of the pipe is gone).

        Returns False if it is still running after ``timeout`` seconds; the fd then
        stays open with the thread rather than being closed under it.
        """
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
