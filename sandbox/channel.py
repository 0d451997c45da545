"""The set-up channel: how the forked processes tell the parent how jailing went.

A SOCK_SEQPACKET socketpair (message boundaries kept, fds passed with
SCM_RIGHTS). Messages, each a msgpack array of at most MAX_MESSAGE bytes:

    ["userns"]                          from the set-up process, when the parent maps its user
                                        namespace (subordinate ids); it then waits for
    ["mapped"]                          from the parent, the maps written
    ["pid", host_pid]                   from the set-up process, with a pidfd of the worker
    ["ready"]                           from the worker, jailed; in log mode with
                                        the seccomp listener fd
    ["error", step, errno, detail]      from either, then it exits

The parent reads with a deadline; anything malformed, oversized or carrying
unexpected fds is a protocol error, and fds that came with it are closed at once.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from dataclasses import dataclass

import msgpack

from sandbox.errors import JailSetupError

MAX_MESSAGE = 1024
MAX_FDS = 1
MAX_DETAIL = 300


@dataclass(frozen=True)
class Message:
    kind: str
    fields: tuple[object, ...]
    fds: tuple[int, ...]


def encode_pid(pid: int) -> bytes:
    return msgpack.packb(["pid", pid])


def encode_ready() -> bytes:
    return msgpack.packb(["ready"])


def encode_userns() -> bytes:
    return msgpack.packb(["userns"])


def encode_mapped() -> bytes:
    return msgpack.packb(["mapped"])


def encode_error(step: str, err: int, detail: str) -> bytes:
    return msgpack.packb(["error", step, err, detail[:MAX_DETAIL]])


def send(sock: socket.socket, payload: bytes, fds: tuple[int, ...] = ()) -> None:
    """One message, with fds attached by SCM_RIGHTS."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([payload], ancillary)


_SHAPES = {"pid": (int,), "ready": (), "error": (str, int, str), "userns": (), "mapped": ()}


def _protocol_error(detail: str, fds: list[int]) -> JailSetupError:
    for fd in fds:
        _close_quietly(fd)
    return JailSetupError("handshake", errno.EPROTO, detail)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # the fd was ours to close; EBADF here cannot leak anything


def _decode(data: bytes, fds: list[int], flags: int) -> Message:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise _protocol_error("oversized set-up message", fds)
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)  # data is at most MAX_MESSAGE bytes
    except (ValueError, msgpack.UnpackException) as exc:
        raise _protocol_error(f"undecodable set-up message: {exc}", fds) from None
    if not isinstance(items, list) or not items or items[0] not in _SHAPES:
        raise _protocol_error(f"unknown set-up message {items!r:.80}", fds)
    kind, fields = items[0], tuple(items[1:])
    shape = _SHAPES[kind]
    if len(fields) != len(shape) or not all(type(f) is t for f, t in zip(fields, shape)):
        raise _protocol_error(f"malformed {kind!r} message", fds)
    return Message(kind, fields, tuple(fds))


def receive(sock: socket.socket, deadline: float) -> Message | None:
    """The next message, or None at end of stream (every sender has closed).

    Raises JailSetupError("handshake", ETIMEDOUT) at `deadline` (time.monotonic())
    and JailSetupError("handshake", EPROTO) on a malformed message.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JailSetupError("handshake", errno.ETIMEDOUT, "the child did not finish jailing in time")
        if poller.poll(remaining * 1000):
            break
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
    fds = _fds_from(ancdata)
    if not data and not fds:
        return None
    return _decode(data, fds, flags)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return list(fds)
