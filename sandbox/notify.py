"""Log mode: let denied syscalls through, but tell the parent each one.

In log mode the worker's filter has SECCOMP_RET_USER_NOTIF as its default action
instead of KILL_PROCESS. The kernel then suspends the worker at each syscall the
policy does not allow and queues a notification on a listener fd, which the
worker hands to the parent during the hand-shake. A `DenialLog` thread in the
parent answers each notification with SECCOMP_USER_NOTIF_FLAG_CONTINUE (run the
syscall as if allowed) after counting it by name.

This is a tool for writing policies, not a security boundary: CONTINUE means the
call really happens. The thread ends by itself when the worker dies (the
listener then reports POLLHUP), so it needs no stopping.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading

import pyseccomp

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data
# { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; } }
_NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
_RESP = struct.Struct("=QqiI")
_IOC_READ_WRITE = 3


def _iowr(number: int, size: int) -> int:
    return (_IOC_READ_WRITE << 30) | (size << 16) | (ord("!") << 8) | number


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, _NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, _RESP.size)
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
MAX_EXAMPLES = 4
"""Distinct argument tuples remembered per syscall, to help write arg filters."""


class DenialLog:
    """Counts, by syscall name, the calls the policy would have denied.

    Owns `listener` (closes it when the worker is gone). Thread-safe readers.
    """

    def __init__(self, listener: int) -> None:
        self._listener = listener
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[tuple[int, ...]]] = {}
        self._thread = threading.Thread(target=self._serve, name=f"seccomp-log-{listener}", daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        """Syscall name -> number of calls let through so far."""
        with self._lock:
            return dict(self._counts)

    def examples(self) -> dict[str, list[tuple[int, ...]]]:
        """Syscall name -> up to MAX_EXAMPLES distinct (arg0..arg5) seen."""
        with self._lock:
            return {name: list(args) for name, args in self._examples.items()}

    def join(self, timeout: float) -> bool:
        """Wait for the thread to finish (the worker is gone); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                mask = events[0][1] if events else 0
                if mask & select.POLLIN:
                    self._answer_one()
                elif mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return  # no process uses the filter any more
        finally:
            os.close(self._listener)
            self._listener = -1

    def _answer_one(self) -> None:
        request = bytearray(_NOTIF.size)  # the kernel insists on a zeroed buffer
        try:
            fcntl.ioctl(self._listener, SECCOMP_IOCTL_NOTIF_RECV, request, True)
        except OSError as exc:
            # ENOENT: the caller was killed between poll and receive.
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return
            raise
        notif_id, _pid, _flags, number, _arch, _ip, *args = _NOTIF.unpack(request)
        self._record(_syscall_name(number), tuple(args))
        response = bytearray(_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))
        try:
            fcntl.ioctl(self._listener, SECCOMP_IOCTL_NOTIF_SEND, response, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller died meanwhile
                raise

    def _record(self, name: str, args: tuple[int, ...]) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            seen = self._examples.setdefault(name, [])
            if len(seen) < MAX_EXAMPLES and args not in seen:
                seen.append(args)


def _syscall_name(number: int) -> str:
    try:
        return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode()
    except ValueError:
        return f"syscall_{number}"
