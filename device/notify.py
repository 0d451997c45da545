"""Queue notifications through file descriptors.

A kick fd (driver -> device) is an eventfd. A call fd (device -> driver) may be an eventfd
or, as User-Mode Linux passes it, one end of a socketpair; writing 8 bytes works for both.
"""

from __future__ import annotations

import errno
import os

_ONE = (1).to_bytes(8, "little")


def signal_fd(fd: int) -> None:
    """Write one event to ``fd``. A full eventfd or socket buffer already means "pending"."""
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass


def drain_fd(fd: int) -> bool:
    """Consume pending events on a non-blocking kick fd; True if there were any.

    Reads at most 8 bytes a call and at most 64 calls, so a peer flooding a socket cannot
    keep the worker here.
    """
    got = False
    for _ in range(64):
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return got
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not data:
            return got
        got = True
    return got
