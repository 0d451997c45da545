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


def drain_fd(fd: int) -> bool | None:
    """Consume pending events on a non-blocking kick fd with one read: True if there were
    any, False if none, None if the fd reached end of file (a socket or pipe whose writer
    closed: it will never kick again, and stays readable for ever).

    An eventfd gives every pending kick in one read. A socket or pipe gives at most 64
    bytes a call; what is left keeps it readable, so the caller's next poll comes back for
    it, one bounded read per pass however hard a peer floods.
    """
    while True:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        return True if data else None
