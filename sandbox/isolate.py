"""Run a function in a forked helper process, with a deadline.

For library code that may never return (libseccomp 2.5 can loop forever on some
rule combinations): the caller gets the result, the helper's error, or a timeout
after which the helper is killed. Nothing the function does outlives the helper.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import time
import traceback
from typing import Callable

import msgpack

MAX_RESULT = 16 << 20


class IsolatedError(Exception):
    """The function raised in the helper: `kind` is "expected" for an exception
    of one of the types the caller named, else "crash"; `fields` describe it."""

    def __init__(self, kind: str, fields: list[object]) -> None:
        self.kind = kind
        self.fields = fields
        super().__init__(kind, *fields)


def run_isolated(
    function: Callable[[], bytes],
    timeout: float,
    expected: tuple[type[Exception], ...] = (),
    describe: Callable[[Exception], list[object]] = lambda exc: [str(exc)],
) -> bytes:
    """`function()` run in a forked helper; its bytes result.

    Raises IsolatedError("expected", describe(exc)) when it raised one of
    `expected`, IsolatedError("crash", [traceback]) for anything else, and
    TimeoutError (after killing the helper) when it did not finish in `timeout`.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _helper(function, expected, describe, read_fd, write_fd)
    os.close(write_fd)
    data: bytes | None = None
    try:
        data = _read_all(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
        if data is None:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if data is None:
        raise TimeoutError(f"did not finish within {timeout} s (or answered more than {MAX_RESULT} bytes)")
    kind, *fields = msgpack.unpackb(data)
    if kind == "ok":
        return fields[0]
    raise IsolatedError(kind, fields)


def _helper(
    function: Callable[[], bytes],
    expected: tuple[type[Exception], ...],
    describe: Callable[[Exception], list[object]],
    read_fd: int,
    write_fd: int,
) -> None:
    reply = msgpack.packb(["crash", "helper ended without a result"])
    try:
        gc.freeze()  # the parent's garbage is not ours to finalise
        os.close(read_fd)
        reply = msgpack.packb(["ok", function()])
    except expected as exc:
        reply = msgpack.packb(["expected", *describe(exc)])
    except Exception:  # noqa: BLE001 - reported to the parent as a crash, then _exit
        reply = msgpack.packb(["crash", traceback.format_exc()])
    finally:
        _write_all(write_fd, reply)
        os._exit(0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything until EOF, or None at the deadline."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESULT:
            return None
        chunks.append(chunk)
