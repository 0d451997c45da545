"""A strict, sans-I/O codec for the vhost-user protocol (backend side first).

vballoon is a vhost-user *back-end*: a VMM (User-Mode Linux's virtio_uml, QEMU, crosvm, or a
Python VMM) is the *front-end*. The wire format is QEMU's ``docs/interop/vhost-user.rst``:
a 12-byte little-endian header ``request u32, flags u32, size u32`` and ``size`` payload
bytes, with file descriptors riding alongside in SCM_RIGHTS ancillary data.

Nothing here touches a socket. Four objects turn bytes and fds into typed events and
typed replies into bytes, one per end of the two streams vhost-user uses:

======================  ==============================  ===================================
stream                  our end (production)            the peer's end (tests, Python VMM)
======================  ==============================  ===================================
main socket             :class:`BackendConnection`      :class:`FrontendConnection`
backend-request socket  :class:`BackendRequestSender`   :class:`BackendRequestReceiver`
======================  ==============================  ===================================

The backend-request socket is the one the front-end hands over with SET_BACKEND_REQ_FD; the
back-end sends BACKEND_CONFIG_CHANGE_MSG on it and the front-end acknowledges.

Lifecycle of a :class:`BackendConnection` (the other three follow the same shape)::

      receive_data(data, fds) / receive_eof()
                 |
                 v
      next_event() / events()  ---> Request event ---> reply_*()  (when event.reply_expected)
                 |          \\--> RejectedRequest ----> reply_ack(ok=False), or close
                 |           \\-> NEED_DATA: receive more     ConnectionClosed: done
                 v
      FramingError / ReceiveBufferFull: fatal. Every fd still held is closed, the object
      raises ConnectionUnusable from then on; the caller closes the socket.

How the I/O layer drives a BackendConnection
--------------------------------------------
::

    conn = BackendConnection(max_queues=N)
    while True:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            RECV_SIZE, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
        fds = fds_from_ancillary(ancdata)
        if not data:
            conn.receive_eof()
        else:
            conn.receive_data(data, fds, fds_truncated=bool(msg_flags & socket.MSG_CTRUNC))
        for event in conn.events():
            ...                              # act on it; it owns the fds it carries
            if event.reply_expected:
                sock.sendall(conn.reply_...(...))

- Read at most :data:`RECV_SIZE` bytes and :data:`MAX_FDS_PER_MESSAGE` fds per call
  (:data:`ANCILLARY_SIZE` bounds the ancillary buffer). ``MSG_CMSG_CLOEXEC`` keeps received
  fds out of any child we fork unless it is given them on purpose. Call ``sock.recvmsg``
  itself: Python 3.11's ``socket.recv_fds`` accepts ``flags`` but never passes them on
  (CPython gh-128881), so the fds would arrive inheritable. If the kernel reports
  ``MSG_CTRUNC`` the peer sent more fds than any message may carry; the kernel dropped the
  excess, and ``fds_truncated=True`` makes the codec refuse the message they belong to.
- Drain :meth:`BackendConnection.events` after every ``receive_data``. The buffers are bounded
  (:class:`ReceiveBufferFull` if not drained), so must the caller's loop be.
- **Which message owns which fds.** On a SOCK_STREAM unix socket the fds sent with a message
  ride with its first byte, and Linux ends a ``recvmsg`` right after the chunk of data that
  carried fds, but it *does* glue the tail of the previous message (no fds) in front of it.
  So a single ``recvmsg`` can return "end of message A, then message B, then B's fds". The rule
  this codec applies is therefore: *the fds of one receive_data call belong to the message that
  contains the last byte of that call's data* (with empty data: the next byte to arrive). That
  equals "fds received since the previous message boundary" when nothing is glued, and stays
  right when something is. Fds that arrive while a message's header or payload is still
  incomplete belong to that message.

Ownership of fds
----------------
``receive_data`` takes ownership of every fd it is given. Each fd ends up in exactly one of two
places: inside one event (the receiver of the event owns it then and must close it), or closed
by the codec. Fds attached to a message that may not carry them, surplus fds, fds beyond
:data:`MAX_FDS_PER_MESSAGE` in one call, fds of a refused message, and fds still held when the
connection fails or is closed are all closed at once (crosvm's ``check_attached_files`` rule).

Errors
------
One base, :class:`VhostUserError`, split by who is at fault (as h11 splits
Local/RemoteProtocolError):

- :class:`FrontendProtocolError`: the front-end (the VMM, our peer) broke the protocol.
  :class:`FramingError` and its subclasses are fatal (the byte stream cannot be trusted);
  every other subclass describes one refused message, delivered as a
  :class:`RejectedRequest` event while the connection keeps going.
- :class:`BackendProtocolError`: our side is at fault, either our code misused a codec object
  (replying when nothing is owed, not draining, ...) or, seen from the frontend-side helpers,
  our back-end sent a malformed message (:class:`BadBackendMessage`).
"""

import array
import enum
import os
import socket
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn, TypeAlias

# --------------------------------------------------------------------------------------
# Constants (spec names)
# --------------------------------------------------------------------------------------

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_VRING_F_LOG = 0x1

VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1

#: Largest queue size the virtio spec allows (and the largest power of two we accept).
VIRTQUEUE_MAX_SIZE = 32768
#: Size of the message header.
VHOST_USER_HDR_SIZE = 12
#: Largest payload accepted. The largest legitimate one is 12 + 256 (GET/SET_CONFIG);
#: anything above this bound is a framing error, detected as soon as the header arrives.
MAX_PAYLOAD_SIZE = 4096
#: Most fds one message may carry (SET_MEM_TABLE with VHOST_MEMORY_BASELINE_NREGIONS regions).
MAX_FDS_PER_MESSAGE = VHOST_MEMORY_BASELINE_NREGIONS
#: Suggested ``recvmsg`` size: one whole message of the largest accepted size.
RECV_SIZE = VHOST_USER_HDR_SIZE + MAX_PAYLOAD_SIZE
#: ``recvmsg`` ancillary buffer size for MAX_FDS_PER_MESSAGE fds (no room for more).
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
#: Default bound on buffered, not yet parsed bytes (the caller drains between receives).
DEFAULT_MAX_BUFFER_SIZE = 64 * 1024
#: Default bound on fds held for messages not yet complete; surplus fds are closed on arrival.
DEFAULT_MAX_HELD_FDS = 2 * MAX_FDS_PER_MESSAGE


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket (``VHOST_USER_<name>`` in the spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the backend-request socket
    (``VHOST_USER_BACKEND_<name>`` in the spec)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (``VHOST_USER_PROTOCOL_F_<name>``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


VHOST_USER_PROTOCOL_F_MQ = ProtocolFeature.MQ
VHOST_USER_PROTOCOL_F_LOG_SHMFD = ProtocolFeature.LOG_SHMFD
VHOST_USER_PROTOCOL_F_RARP = ProtocolFeature.RARP
VHOST_USER_PROTOCOL_F_REPLY_ACK = ProtocolFeature.REPLY_ACK
VHOST_USER_PROTOCOL_F_MTU = ProtocolFeature.MTU
VHOST_USER_PROTOCOL_F_BACKEND_REQ = ProtocolFeature.BACKEND_REQ
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = ProtocolFeature.CROSS_ENDIAN
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = ProtocolFeature.CRYPTO_SESSION
VHOST_USER_PROTOCOL_F_PAGEFAULT = ProtocolFeature.PAGEFAULT
VHOST_USER_PROTOCOL_F_CONFIG = ProtocolFeature.CONFIG
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = ProtocolFeature.BACKEND_SEND_FD
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = ProtocolFeature.HOST_NOTIFIER
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = ProtocolFeature.INFLIGHT_SHMFD
VHOST_USER_PROTOCOL_F_RESET_DEVICE = ProtocolFeature.RESET_DEVICE
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = ProtocolFeature.INBAND_NOTIFICATIONS
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = ProtocolFeature.CONFIGURE_MEM_SLOTS
VHOST_USER_PROTOCOL_F_STATUS = ProtocolFeature.STATUS
VHOST_USER_PROTOCOL_F_XEN_MMAP = ProtocolFeature.XEN_MMAP
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = ProtocolFeature.SHARED_OBJECT
VHOST_USER_PROTOCOL_F_DEVICE_STATE = ProtocolFeature.DEVICE_STATE

#: Requests whose reply carries a body (the spec's "reply payload"); need_reply changes
#: nothing for them, and they can never be answered with a bare ack.
REQUESTS_WITH_REPLY: frozenset[FrontendRequest] = frozenset(
    {
        FrontendRequest.GET_FEATURES,
        FrontendRequest.GET_PROTOCOL_FEATURES,
        FrontendRequest.GET_VRING_BASE,
        FrontendRequest.GET_QUEUE_NUM,
        FrontendRequest.GET_CONFIG,
        FrontendRequest.GET_MAX_MEM_SLOTS,
        FrontendRequest.GET_INFLIGHT_FD,
        FrontendRequest.POSTCOPY_ADVISE,
        FrontendRequest.POSTCOPY_END,
        FrontendRequest.GET_STATUS,
        FrontendRequest.IOTLB_MSG,
    }
)
_U64_REPLY_REQUESTS = frozenset(
    {
        FrontendRequest.GET_FEATURES,
        FrontendRequest.GET_PROTOCOL_FEATURES,
        FrontendRequest.GET_QUEUE_NUM,
        FrontendRequest.GET_MAX_MEM_SLOTS,
    }
)

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class VhostUserError(Exception):
    """Base of every error this module raises or reports."""


class FrontendProtocolError(VhostUserError):
    """The front-end (our peer) broke the protocol."""


class FramingError(FrontendProtocolError):
    """The byte stream cannot be split into messages any more. Fatal: the connection that
    raised it has closed every fd it held and is unusable; close the socket."""


class BadVersion(FramingError):
    """The header's version bits are not 1."""


class BadReplyFlag(FramingError):
    """The reply bit is set on a request, or clear on a reply."""


class ReservedFlagsSet(FramingError):
    """Header flag bits the spec does not define (or need_reply on a reply) are set."""


class OversizedMessage(FramingError):
    """The header announces a payload larger than the connection accepts."""


class TruncatedMessage(FramingError):
    """The stream ended (or fds arrived) in the middle of a message."""


class UnknownRequest(FrontendProtocolError):
    """The request number is not one the spec defines."""


class UnsupportedRequest(FrontendProtocolError):
    """A request the spec defines but this back-end never offers (e.g. SET_LOG_BASE: we do
    not offer LOG_SHMFD)."""


class BadPayloadSize(FrontendProtocolError):
    """The payload is not the exact size the request requires."""


class UnexpectedFds(FrontendProtocolError):
    """More fds came with a message than it may carry (any fd, for most requests). They
    were closed."""


class MissingFds(FrontendProtocolError):
    """Fewer fds came with a message than it must carry."""


class UnexpectedReply(FrontendProtocolError):
    """A reply arrived that no request was waiting for, or for another request, or that does
    not echo the request it answers."""


class InvalidField(FrontendProtocolError):
    """A payload field holds a value the spec (or our bounds) do not allow."""


class BadVringIndex(InvalidField):
    """A vring index is not below the configured number of queues."""


class BadVringNum(InvalidField):
    """A vring size is not a power of two in 1..VIRTQUEUE_MAX_SIZE."""


class BadVringBase(InvalidField):
    """A vring base does not fit a split ring's 16-bit index."""


class ReservedBitsSet(InvalidField):
    """Bits the spec reserves in a payload field are set."""


class TooManyRegions(InvalidField):
    """A memory table has more than VHOST_MEMORY_BASELINE_NREGIONS regions."""


class BadMemRegion(InvalidField):
    """A memory region is empty or wraps around the 64-bit address space."""


class BadConfigAccess(InvalidField):
    """A config-space access is empty, reaches past VHOST_USER_MAX_CONFIG_SIZE, or has
    unknown flags."""


class BackendProtocolError(VhostUserError):
    """Our side is at fault: our code misused a codec object, or (seen from the frontend-side
    helpers) our back-end sent a malformed message."""


class ConnectionUnusable(BackendProtocolError):
    """The object was used after a fatal error, after close(), or after end of stream."""


class ReceiveBufferFull(BackendProtocolError):
    """More bytes were fed than the buffer bound allows: the caller did not drain events
    between receives. Fatal."""


class ReplyOwed(BackendProtocolError):
    """next_event() was called while the previous request still waits for its reply."""


class ReplyNotOwed(BackendProtocolError):
    """A reply was encoded while no request waits for one."""


class ReplyMismatch(BackendProtocolError):
    """A reply does not fit the request that waits for it (other request, other kind, or
    config fields that do not echo the request)."""


class ReplyPending(BackendProtocolError):
    """A request that expects a reply was encoded while an earlier one still waits for its
    reply (vhost-user is strictly one request at a time)."""


class ValueOutOfRange(BackendProtocolError, ValueError):
    """A value given to an encoder does not fit its wire field."""


class BadBackendMessage(BackendProtocolError):
    """A frontend-side helper received a malformed message from the back-end; the
    ``__cause__`` names the condition. Fatal for that helper."""


# --------------------------------------------------------------------------------------
# Wire structures
# --------------------------------------------------------------------------------------

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_TABLE_HEADER = struct.Struct("<II")  # nregions, padding
_MEM_REGION = struct.Struct("<QQQQ")
_MEM_REG_MSG = struct.Struct("<QQQQQ")  # padding, then one region
_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
_CONFIG_REPLY_HEADER = struct.Struct("<IIIIII")  # message header, then the config header
_ACK_REPLY = struct.Struct("<IIIQ")             # message header, then the u64 status

_U64_LIMIT = 1 << 64


def _pack(layout: struct.Struct, *values: int) -> bytes:
    """Pack ``values``; raise ValueOutOfRange (not struct.error) if one does not fit."""
    try:
        return layout.pack(*values)
    except struct.error as error:
        raise ValueOutOfRange(f"{values!r} do not fit {layout.format!r}: {error}") from error


def _encode(request: int, flags: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueOutOfRange(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return _pack(_HEADER, request, flags, len(payload)) + payload


def encode_message(
    request: int, payload: bytes = b"", *, flags: int = VHOST_USER_VERSION, size: int | None = None
) -> bytes:
    """Frame one message *without any check*: tests use it to build malformed input.

    ``size`` overrides the header's size field (default: ``len(payload)``).
    Raises ValueOutOfRange if a header field does not fit 32 bits.
    """
    return _pack(_HEADER, request, flags, len(payload) if size is None else size) + payload


def fds_from_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The fds in ``recvmsg``'s ancillary data (SCM_RIGHTS), in order; other control
    messages are ignored. Pure: it parses, it does not close anything."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            # A cut-off trailing int cannot be an fd the kernel installed: drop it.
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _close_all(fds: Sequence[int]) -> None:
    """Close every fd, even if one fails; then re-raise the first failure.

    A failure means an fd we were handed was not open (a bug in the caller): it must not
    be hidden, and it must not stop the remaining fds from being closed.
    """
    first_error: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error


# --------------------------------------------------------------------------------------
# Framing: bytes + fds in, whole messages with their fds out (shared by all four ends)
# --------------------------------------------------------------------------------------


class _Frame:
    """One whole message. ``lost_fds`` counts fds that came with it but were closed on
    arrival (over a bound, or cut off by MSG_CTRUNC); such a message is always refused.
    (A plain class with slots: one is made per message, two per MiB a guest inflates.)"""

    __slots__ = ("request", "flags", "payload", "fds", "lost_fds", "names")

    def __init__(self, request: int, flags: int, payload: bytes, fds: tuple[int, ...],
                 lost_fds: int, names: type[enum.IntEnum]) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds
        self.lost_fds = lost_fds
        self.names = names

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        """The request's spec name, or its number if the spec has none."""
        try:
            return self.names(self.request).name
        except ValueError:
            return str(self.request)


@dataclass(frozen=True)
class _FdBatch:
    anchor: int  # stream offset of the byte these fds belong with (see module docstring)
    fds: tuple[int, ...]
    lost: int


class _Framer:
    """Splits one direction of one stream into frames; owns the fds until it hands them out.

    Guarantees: at most ``max_buffer_size`` bytes and ``max_held_fds`` fds are held; a frame is
    produced only after its header passed every check; after a FramingError or close() no fd
    is held and every call raises ConnectionUnusable.
    """

    def __init__(
        self,
        *,
        names: type[enum.IntEnum],
        replies: bool,
        max_payload_size: int = MAX_PAYLOAD_SIZE,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
        max_held_fds: int = DEFAULT_MAX_HELD_FDS,
    ) -> None:
        self._names = names
        self._replies = replies
        self._max_payload_size = max_payload_size
        self._max_buffer_size = max_buffer_size
        self._max_held_fds = max_held_fds
        self._buffer = bytearray()
        self._start = 0  # stream offset of self._buffer[0]
        self._batches: deque[_FdBatch] = deque()
        self._held = 0
        self._eof = False
        self._unusable: VhostUserError | None = None

    @property
    def at_clean_eof(self) -> bool:
        return self._eof and not self._buffer and not self._batches

    def receive_data(self, data: bytes, fds: Sequence[int], fds_truncated: bool) -> None:
        if not fds and not fds_truncated and self._unusable is None and not self._eof \
                and len(self._buffer) + len(data) <= self._max_buffer_size:
            self._buffer += data          # the usual case: bytes alone, room for them
            return
        fds = tuple(fds)
        if self._unusable is not None or self._eof:
            _close_all(fds)
            self._raise_unusable()
        if len(self._buffer) + len(data) > self._max_buffer_size:
            _close_all(fds)
            self.fail(
                ReceiveBufferFull(
                    f"{len(self._buffer)} bytes buffered + {len(data)} received exceeds "
                    f"{self._max_buffer_size}: drain events between receives"
                )
            )
        lost = int(fds_truncated)
        if len(fds) > MAX_FDS_PER_MESSAGE or self._held + len(fds) > self._max_held_fds:
            # No message may carry these: close them now rather than hold them, and let the
            # message they belong to be refused (lost > 0) instead of failing the connection.
            _close_all(fds)
            lost, fds = lost + len(fds), ()
        if fds or lost:
            anchor = self._start + len(self._buffer) + max(len(data), 1) - 1
            self._batches.append(_FdBatch(anchor, fds, lost))
            self._held += len(fds)
        self._buffer += data

    def receive_eof(self) -> None:
        if self._unusable is not None:
            self._raise_unusable()
        self._eof = True

    def next_frame(self) -> _Frame | None:
        """The next whole message, or None if more data is needed (or the stream ended
        cleanly). Raises a FramingError subclass (fatal) on a bad header or truncation."""
        if self._unusable is not None:
            self._raise_unusable()
        buffer = self._buffer
        if len(buffer) < VHOST_USER_HDR_SIZE:
            return self._incomplete()
        request, flags, size = _HEADER.unpack_from(buffer)
        self._check_header(request, flags, size)
        end = VHOST_USER_HDR_SIZE + size
        if len(buffer) < end:
            return self._incomplete()
        payload = bytes(buffer[VHOST_USER_HDR_SIZE:end])
        fds, lost = self._claim_fds(self._start + end) if self._batches else ((), 0)
        del buffer[:end]
        self._start += end
        return _Frame(request, flags, payload, fds, lost, self._names)

    def close(self) -> None:
        """Close every fd held; the framer is unusable afterwards. Idempotent."""
        held = [fd for batch in self._batches for fd in batch.fds]
        self._batches.clear()
        self._held = 0
        self._buffer.clear()
        if self._unusable is None:
            self._unusable = ConnectionUnusable("connection closed")
        _close_all(held)

    def fail(self, error: VhostUserError, cause: VhostUserError | None = None) -> NoReturn:
        """Make the framer unusable (closing every fd held) and raise ``error``."""
        self.close()
        self._unusable = error
        raise error from cause

    def _raise_unusable(self) -> NoReturn:
        if self._unusable is None:  # only end of stream so far
            raise ConnectionUnusable("data received after end of stream")
        raise ConnectionUnusable(f"connection unusable: {self._unusable}") from self._unusable

    def _incomplete(self) -> None:
        if self._eof and (self._buffer or self._batches):
            self.fail(
                TruncatedMessage(
                    f"stream ended with {len(self._buffer)} bytes of an incomplete message"
                )
            )
        return None

    def _check_header(self, request: int, flags: int, size: int) -> None:
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            self.fail(BadVersion(f"request {request}: version {flags & VHOST_USER_VERSION_MASK}"))
        if bool(flags & VHOST_USER_REPLY_MASK) != self._replies:
            expected = "set" if self._replies else "clear"
            self.fail(BadReplyFlag(f"request {request}: reply flag must be {expected}"))
        allowed = VHOST_USER_VERSION_MASK | (
            VHOST_USER_REPLY_MASK if self._replies else VHOST_USER_NEED_REPLY_MASK
        )
        if flags & ~allowed:
            self.fail(ReservedFlagsSet(f"request {request}: flags {flags:#x}"))
        if size > self._max_payload_size:
            limit = self._max_payload_size
            self.fail(OversizedMessage(f"request {request}: size {size} > {limit}"))

    def _claim_fds(self, end: int) -> tuple[tuple[int, ...], int]:
        # Anchors only grow, so the batches of this message are a prefix of the queue.
        fds: list[int] = []
        lost = 0
        while self._batches and self._batches[0].anchor < end:
            batch = self._batches.popleft()
            fds.extend(batch.fds)
            lost += batch.lost
        self._held -= len(fds)
        return tuple(fds), lost


# --------------------------------------------------------------------------------------
# Payload checks shared by the decoders
# --------------------------------------------------------------------------------------


def _name(request: int) -> str:
    try:
        return FrontendRequest(request).name
    except ValueError:
        return str(request)


_KNOWN_REQUESTS = frozenset(FrontendRequest)


def _expect_size(frame: _Frame, size: int) -> None:
    if len(frame.payload) != size:
        raise BadPayloadSize(f"{frame.name}: payload {len(frame.payload)} bytes, need {size}")


def _unpack(frame: _Frame, layout: struct.Struct) -> tuple[int, ...]:
    _expect_size(frame, layout.size)
    return layout.unpack(frame.payload)


def _expect_fds(frame: _Frame, count: int) -> None:
    if frame.lost_fds:
        raise UnexpectedFds(f"{frame.name}: {frame.lost_fds} fds over a bound were closed")
    if len(frame.fds) > count:
        raise UnexpectedFds(f"{frame.name}: {len(frame.fds)} fds, may carry {count}")
    if len(frame.fds) < count:
        raise MissingFds(f"{frame.name}: {len(frame.fds)} fds, needs {count}")


def _check_vring_index(index: int, max_queues: int) -> None:
    if index >= max_queues:
        raise BadVringIndex(f"vring index {index} >= {max_queues} queues")


def _check_config_access(offset: int, size: int, flags: int) -> None:
    if size == 0 or offset + size > VHOST_USER_MAX_CONFIG_SIZE:
        limit = VHOST_USER_MAX_CONFIG_SIZE
        raise BadConfigAccess(f"config offset {offset} size {size} (limit {limit})")
    if flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
        raise BadConfigAccess(f"config flags {flags:#x}")


# --------------------------------------------------------------------------------------
# Events produced by BackendConnection (and encoded by FrontendConnection)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemRegion:
    """One guest memory region as the front-end describes it (not yet validated against the
    other regions: that is guest memory's job)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def _pack(self) -> bytes:
        fields = (self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)
        return _pack(_MEM_REGION, *fields)


def _decode_region(values: Sequence[int]) -> MemRegion:
    region = MemRegion(*values)
    starts = (region.guest_phys_addr, region.userspace_addr, region.mmap_offset)
    if region.memory_size == 0 or any(start + region.memory_size > _U64_LIMIT for start in starts):
        raise BadMemRegion(f"{region}")
    return region


@dataclass(frozen=True)
class Request:
    """Base of the request events: one frozen subclass per supported front-end request.

    The same classes are decoded by BackendConnection and encoded by FrontendConnection.
    Decoded events are fully checked (sizes, fds, fields, bounds). An event that carries fds
    owns them: whoever takes the event closes them.
    """

    REQUEST: ClassVar[FrontendRequest]
    need_reply: bool = field(default=False, kw_only=True)

    @property
    def reply_expected(self) -> bool:
        """True if the front-end now waits for a reply (a body, or an ack)."""
        return self.need_reply or self.REQUEST in REQUESTS_WITH_REPLY

    def _payload(self) -> bytes:
        return b""

    def _attached_fds(self) -> tuple[int, ...]:
        return ()

    @property
    def carried_fds(self) -> tuple[int, ...]:
        """The fds this event carries (and its receiver owns)."""
        return self._attached_fds()

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> "Request":
        _expect_size(frame, 0)
        _expect_fds(frame, 0)
        return cls(need_reply=frame.need_reply)


@dataclass(frozen=True)
class GetFeatures(Request):
    REQUEST = FrontendRequest.GET_FEATURES


@dataclass(frozen=True)
class SetOwner(Request):
    REQUEST = FrontendRequest.SET_OWNER


@dataclass(frozen=True)
class ResetOwner(Request):
    REQUEST = FrontendRequest.RESET_OWNER


@dataclass(frozen=True)
class GetProtocolFeatures(Request):
    REQUEST = FrontendRequest.GET_PROTOCOL_FEATURES


@dataclass(frozen=True)
class GetQueueNum(Request):
    REQUEST = FrontendRequest.GET_QUEUE_NUM


@dataclass(frozen=True)
class ResetDevice(Request):
    REQUEST = FrontendRequest.RESET_DEVICE


@dataclass(frozen=True)
class GetMaxMemSlots(Request):
    REQUEST = FrontendRequest.GET_MAX_MEM_SLOTS


@dataclass(frozen=True)
class _FeaturesRequest(Request):
    features: int

    def _payload(self) -> bytes:
        return _pack(_U64, self.features)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        (features,) = _unpack(frame, _U64)
        _expect_fds(frame, 0)
        return cls(features, need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetFeatures(_FeaturesRequest):
    REQUEST = FrontendRequest.SET_FEATURES


@dataclass(frozen=True)
class SetProtocolFeatures(_FeaturesRequest):
    REQUEST = FrontendRequest.SET_PROTOCOL_FEATURES


def _decode_vring_state(frame: _Frame, max_queues: int) -> tuple[int, int]:
    index, num = _unpack(frame, _VRING_STATE)
    _expect_fds(frame, 0)
    _check_vring_index(index, max_queues)
    return index, num


@dataclass(frozen=True)
class SetVringNum(Request):
    """Queue size: guaranteed a power of two in 1..VIRTQUEUE_MAX_SIZE (split rings only)."""

    REQUEST = FrontendRequest.SET_VRING_NUM
    index: int
    num: int

    def _payload(self) -> bytes:
        return _pack(_VRING_STATE, self.index, self.num)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        index, num = _decode_vring_state(frame, max_queues)
        if num == 0 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise BadVringNum(f"vring {index}: size {num}")
        return cls(index, num, need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetVringBase(Request):
    """First available-ring index to read: guaranteed to fit 16 bits."""

    REQUEST = FrontendRequest.SET_VRING_BASE
    index: int
    num: int

    def _payload(self) -> bytes:
        return _pack(_VRING_STATE, self.index, self.num)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        index, num = _decode_vring_state(frame, max_queues)
        if num > 0xFFFF:
            raise BadVringBase(f"vring {index}: base {num}")
        return cls(index, num, need_reply=frame.need_reply)


@dataclass(frozen=True)
class GetVringBase(Request):
    """Stop the ring and report its base. The state's num field is unused and ignored."""

    REQUEST = FrontendRequest.GET_VRING_BASE
    index: int

    def _payload(self) -> bytes:
        return _pack(_VRING_STATE, self.index, 0)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        index, _ = _decode_vring_state(frame, max_queues)
        return cls(index, need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetVringEnable(Request):
    REQUEST = FrontendRequest.SET_VRING_ENABLE
    index: int
    enable: bool

    def _payload(self) -> bytes:
        return _pack(_VRING_STATE, self.index, int(self.enable))

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        index, num = _decode_vring_state(frame, max_queues)
        if num not in (0, 1):
            raise InvalidField(f"vring {index}: enable {num}")
        return cls(index, bool(num), need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetVringAddr(Request):
    """Ring addresses in the front-end's user address space; ``flags`` is 0 or
    VHOST_VRING_F_LOG. Alignment and mapping are the queue's checks, not the codec's."""

    REQUEST = FrontendRequest.SET_VRING_ADDR
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def _payload(self) -> bytes:
        fields = (self.index, self.flags, self.desc, self.used, self.avail, self.log)
        return _pack(_VRING_ADDR, *fields)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        index, flags, desc, used, avail, log = _unpack(frame, _VRING_ADDR)
        _expect_fds(frame, 0)
        _check_vring_index(index, max_queues)
        if flags & ~VHOST_VRING_F_LOG:
            raise ReservedBitsSet(f"vring {index}: address flags {flags:#x}")
        return cls(index, flags, desc, used, avail, log, need_reply=frame.need_reply)


@dataclass(frozen=True)
class _VringFdRequest(Request):
    """``fd`` is None when the front-end set the NOFD bit (poll instead of an fd)."""

    index: int
    fd: int | None

    def _payload(self) -> bytes:
        nofd = VHOST_USER_VRING_NOFD_MASK if self.fd is None else 0
        return _pack(_U64, self.index | nofd)

    def _attached_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        (value,) = _unpack(frame, _U64)
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ReservedBitsSet(f"{frame.name}: payload {value:#x}")
        nofd = bool(value & VHOST_USER_VRING_NOFD_MASK)
        _expect_fds(frame, 0 if nofd else 1)
        index = value & VHOST_USER_VRING_IDX_MASK
        _check_vring_index(index, max_queues)
        return cls(index, None if nofd else frame.fds[0], need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetVringKick(_VringFdRequest):
    REQUEST = FrontendRequest.SET_VRING_KICK


@dataclass(frozen=True)
class SetVringCall(_VringFdRequest):
    REQUEST = FrontendRequest.SET_VRING_CALL


@dataclass(frozen=True)
class SetVringErr(_VringFdRequest):
    REQUEST = FrontendRequest.SET_VRING_ERR


@dataclass(frozen=True)
class SetMemTable(Request):
    """The guest memory table, with one fd per region (same order).

    Accepted layout: ``nregions`` (<= VHOST_MEMORY_BASELINE_NREGIONS), padding, then
    ``k`` region slots with nregions <= k <= 8, where the unused slots are all zero. QEMU
    sends exactly nregions slots; User-Mode Linux sends its fixed-size array (2 slots) even
    for one region. Every used region is non-empty and does not wrap 64 bits.
    """

    REQUEST = FrontendRequest.SET_MEM_TABLE
    regions: tuple[MemRegion, ...]
    fds: tuple[int, ...]

    def _payload(self) -> bytes:
        header = _pack(_MEM_TABLE_HEADER, len(self.regions), 0)
        return header + b"".join(region._pack() for region in self.regions)

    def _attached_fds(self) -> tuple[int, ...]:
        return self.fds

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        payload = frame.payload
        if len(payload) < _MEM_TABLE_HEADER.size:
            raise BadPayloadSize(f"SET_MEM_TABLE: payload {len(payload)} bytes")
        nregions, _padding = _MEM_TABLE_HEADER.unpack_from(payload)
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise TooManyRegions(f"SET_MEM_TABLE: {nregions} regions")
        slots, remainder = divmod(len(payload) - _MEM_TABLE_HEADER.size, _MEM_REGION.size)
        if remainder or not nregions <= slots <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise BadPayloadSize(f"SET_MEM_TABLE: {len(payload)} bytes for {nregions} regions")
        used_end = _MEM_TABLE_HEADER.size + nregions * _MEM_REGION.size
        if any(payload[used_end:]):
            raise ReservedBitsSet("SET_MEM_TABLE: unused region slots are not zero")
        _expect_fds(frame, nregions)
        offsets = range(_MEM_TABLE_HEADER.size, used_end, _MEM_REGION.size)
        regions = tuple(_decode_region(_MEM_REGION.unpack_from(payload, at)) for at in offsets)
        return cls(regions, frame.fds, need_reply=frame.need_reply)


@dataclass(frozen=True)
class AddMemReg(Request):
    REQUEST = FrontendRequest.ADD_MEM_REG
    region: MemRegion
    fd: int

    def _payload(self) -> bytes:
        return _pack(_U64, 0) + self.region._pack()

    def _attached_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        _padding, *values = _unpack(frame, _MEM_REG_MSG)
        _expect_fds(frame, 1)
        return cls(_decode_region(values), frame.fds[0], need_reply=frame.need_reply)


@dataclass(frozen=True)
class RemMemReg(Request):
    """A region to unmap. The spec lets old front-ends attach one fd here; the back-end must
    close it unused, so the codec does and the event never carries it."""

    REQUEST = FrontendRequest.REM_MEM_REG
    region: MemRegion

    def _payload(self) -> bytes:
        return _pack(_U64, 0) + self.region._pack()

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        _padding, *values = _unpack(frame, _MEM_REG_MSG)
        _expect_fds(frame, min(len(frame.fds), 1))
        event = cls(_decode_region(values), need_reply=frame.need_reply)
        _close_all(frame.fds)
        return event


@dataclass(frozen=True)
class SetBackendReqFd(Request):
    """The socket for back-end initiated requests (BACKEND_CONFIG_CHANGE_MSG)."""

    REQUEST = FrontendRequest.SET_BACKEND_REQ_FD
    fd: int

    def _attached_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        _expect_size(frame, 0)
        _expect_fds(frame, 1)
        return cls(frame.fds[0], need_reply=frame.need_reply)


def _decode_config(frame: _Frame) -> tuple[int, int, int, bytes]:
    if len(frame.payload) < _CONFIG_HEADER.size:
        raise BadPayloadSize(f"{frame.name}: payload {len(frame.payload)} bytes")
    offset, size, flags = _CONFIG_HEADER.unpack_from(frame.payload)
    _expect_size(frame, _CONFIG_HEADER.size + size)
    _check_config_access(offset, size, flags)
    return offset, size, flags, frame.payload[_CONFIG_HEADER.size :]


@dataclass(frozen=True)
class GetConfig(Request):
    """Read ``size`` bytes of config space at ``offset``; 1 <= size, offset + size <= 256.

    The request carries ``size`` bytes of (ignored) data, as QEMU and UML send it."""

    REQUEST = FrontendRequest.GET_CONFIG
    offset: int
    size: int
    flags: int = VHOST_SET_CONFIG_TYPE_FRONTEND

    def _payload(self) -> bytes:
        return _pack(_CONFIG_HEADER, self.offset, self.size, self.flags) + bytes(self.size)

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        offset, size, flags, _ = _decode_config(frame)
        _expect_fds(frame, 0)
        return cls(offset, size, flags, need_reply=frame.need_reply)


@dataclass(frozen=True)
class SetConfig(Request):
    """Write ``data`` to config space at ``offset``; 1 <= len(data), offset + len <= 256."""

    REQUEST = FrontendRequest.SET_CONFIG
    offset: int
    data: bytes
    flags: int = VHOST_SET_CONFIG_TYPE_FRONTEND

    def _payload(self) -> bytes:
        return _pack(_CONFIG_HEADER, self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def _decode(cls, frame: _Frame, max_queues: int) -> Request:
        offset, _, flags, data = _decode_config(frame)
        _expect_fds(frame, 0)
        return cls(offset, data, flags, need_reply=frame.need_reply)


_REQUEST_TYPES: dict[int, type[Request]] = {
    cls.REQUEST: cls
    for cls in (
        GetFeatures, SetFeatures, SetOwner, ResetOwner, SetMemTable, SetVringNum, SetVringAddr,
        SetVringBase, GetVringBase, SetVringKick, SetVringCall, SetVringErr, GetProtocolFeatures,
        SetProtocolFeatures, GetQueueNum, SetVringEnable, SetBackendReqFd, GetConfig, SetConfig,
        ResetDevice, GetMaxMemSlots, AddMemReg, RemMemReg,
    )
}  # fmt: skip


@dataclass(frozen=True)
class RejectedRequest:
    """A whole message that was refused; its fds are already closed.

    ``error`` names why (UnknownRequest, UnsupportedRequest, BadPayloadSize, UnexpectedFds,
    MissingFds, an InvalidField subclass). The connection keeps working: reply_ack(request,
    False) if reply_expected and the request has no reply body, reply_config_failure() for
    GET_CONFIG, otherwise close the connection.
    """

    request: int
    need_reply: bool
    error: FrontendProtocolError

    @property
    def reply_expected(self) -> bool:
        return self.need_reply or self.request in REQUESTS_WITH_REPLY


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer ended the stream at a message boundary."""

    @property
    def reply_expected(self) -> bool:
        """Always False: lets a loop ask every BackendEvent the same question."""
        return False


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel."""

    NEED_DATA = "NEED_DATA"


#: next_event() result when no whole message is buffered: receive more first.
NEED_DATA = NeedData.NEED_DATA

BackendEvent: TypeAlias = Request | RejectedRequest | ConnectionClosed


def _decode_request(frame: _Frame, max_queues: int) -> Request | RejectedRequest:
    """Decode one frame; on any FrontendProtocolError close its fds and reject it."""
    try:
        if frame.request not in _KNOWN_REQUESTS:
            raise UnknownRequest(f"request {frame.request}")
        cls = _REQUEST_TYPES.get(frame.request)
        if cls is None:
            raise UnsupportedRequest(f"{frame.name} is not supported")
        return cls._decode(frame, max_queues)
    except FrontendProtocolError as error:
        _close_all(frame.fds)
        return RejectedRequest(frame.request, frame.need_reply, error)


class _Endpoint:
    """What all four ends share: a framer, and feeding it. See the module docstring."""

    _framer: _Framer

    def receive_data(
        self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False
    ) -> None:
        """Buffer bytes and the fds that came with them; ownership of the fds passes here.

        ``fds_truncated``: recvmsg reported MSG_CTRUNC (the kernel dropped fds); the message
        they belonged to will be refused. Raises ReceiveBufferFull (fatal) if events were not
        drained between receives, and ConnectionUnusable after a fatal error, close() or
        receive_eof(); in every failure case the fds given are closed.
        """
        self._framer.receive_data(data, fds, fds_truncated)

    def receive_eof(self) -> None:
        """The peer ended the stream: next_event() returns ConnectionClosed once the buffer is
        empty, or raises TruncatedMessage (fatal) if it ends inside a message."""
        self._framer.receive_eof()

    def close(self) -> None:
        """Close every fd still held for incomplete messages; the object is unusable after.
        Idempotent."""
        self._framer.close()


# --------------------------------------------------------------------------------------
# BackendConnection: our end of the main socket
# --------------------------------------------------------------------------------------


_REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK


def _reply(request: int, payload: bytes = b"") -> bytes:
    return _encode(request, _REPLY_FLAGS, payload)


class BackendConnection(_Endpoint):
    """The back-end's end of the main vhost-user socket (sans-I/O).

    Feed what the socket delivers with receive_data()/receive_eof(); take events with
    next_event() or events(); encode replies with the reply_* methods. See the module
    docstring for the I/O recipe and the fd-ownership rule.

    Guarantees: every decoded event passed the checks its class documents; at most
    ``max_buffer_size`` bytes and ``max_held_fds`` fds are held; every fd received is either
    inside exactly one event or closed; vhost-user's one-request-at-a-time discipline is
    enforced on our side (ReplyOwed, ReplyNotOwed, ReplyMismatch).
    """

    def __init__(
        self,
        *,
        max_queues: int,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
        max_held_fds: int = DEFAULT_MAX_HELD_FDS,
    ) -> None:
        """``max_queues``: vring indices must be below it (1..256: fd messages carry 8 bits)."""
        if not 1 <= max_queues <= VHOST_USER_VRING_IDX_MASK + 1:
            raise ValueOutOfRange(f"max_queues {max_queues} not in 1..256")
        self._max_queues = max_queues
        self._framer = _Framer(
            names=FrontendRequest,
            replies=False,
            max_buffer_size=max_buffer_size,
            max_held_fds=max_held_fds,
        )
        self._owed: Request | RejectedRequest | None = None

    @property
    def idle(self) -> bool:
        """Nothing buffered and no reply owed: ``next_event`` would say NEED_DATA (unless
        the stream ended). A cheap check for a loop that answers one message per read."""
        framer = self._framer
        return self._owed is None and not framer._buffer and not framer._eof

    def next_event(self) -> BackendEvent | NeedData:
        """The next event, NEED_DATA, or ConnectionClosed (repeatedly) after a clean end.

        Raises ReplyOwed if the previous event still waits for its reply, a FramingError
        subclass (fatal) on a broken header or truncation, ConnectionUnusable afterwards.
        A message that is whole but wrong is not raised: it becomes a RejectedRequest.
        """
        if self._owed is not None:
            raise ReplyOwed(f"{_name(self._owed_request)} still waits for its reply")
        frame = self._framer.next_frame()
        if frame is None:
            return ConnectionClosed() if self._framer.at_clean_eof else NEED_DATA
        event = _decode_request(frame, self._max_queues)
        if event.reply_expected:
            self._owed = event
        return event

    def events(self) -> Iterator[BackendEvent]:
        """Yield events until NEED_DATA (not yielded) or ConnectionClosed (yielded last).
        Reply to each event that expects it before asking for the next."""
        while True:
            event = self.next_event()
            if isinstance(event, NeedData):
                return
            yield event
            if isinstance(event, ConnectionClosed):
                return

    def close(self) -> None:
        self._owed = None
        super().close()

    # Replies. Each checks it answers the request that waits (else ReplyNotOwed or
    # ReplyMismatch, nothing changed) and raises ValueOutOfRange if a value does not fit.

    def reply_u64(self, request: int, value: int) -> bytes:
        """Reply to GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM or GET_MAX_MEM_SLOTS."""
        owed = self._check_owed(request)
        if not isinstance(owed, Request) or request not in _U64_REPLY_REQUESTS:
            raise ReplyMismatch(f"{_name(request)} is not answered with a u64 value")
        return self._settle(_reply(request, _pack(_U64, value)))

    def reply_ack(self, request: int, ok: bool) -> bytes:
        """The REPLY_ACK status (0 = success, 1 = failure) of a request sent with need_reply.
        Refused for requests with a reply body: the front-end would read it as the value."""
        self._check_owed(request)
        if request in REQUESTS_WITH_REPLY:
            raise ReplyMismatch(f"{_name(request)} has a reply body; it cannot be acked")
        self._owed = None
        return _ACK_REPLY.pack(request, _REPLY_FLAGS, _U64.size, 0 if ok else 1)

    def reply_vring_state(self, index: int, num: int) -> bytes:
        """Reply to GET_VRING_BASE for vring ``index`` with its base ``num``."""
        owed = self._check_owed(FrontendRequest.GET_VRING_BASE)
        if not isinstance(owed, GetVringBase) or owed.index != index:
            raise ReplyMismatch(f"GET_VRING_BASE reply for vring {index} does not match {owed}")
        return self._settle(_reply(FrontendRequest.GET_VRING_BASE, _pack(_VRING_STATE, index, num)))

    def reply_config(self, offset: int, size: int, flags: int, data: bytes) -> bytes:
        """Reply to GET_CONFIG, echoing its offset, size and flags exactly (UML and QEMU
        both refuse anything else) with ``size`` bytes of data."""
        owed = self._check_owed(FrontendRequest.GET_CONFIG)
        echo = (offset, size, flags)
        if not isinstance(owed, GetConfig) or (owed.offset, owed.size, owed.flags) != echo:
            raise ReplyMismatch(f"GET_CONFIG reply {echo} does not echo {owed}")
        if len(data) != size:
            raise ReplyMismatch(f"GET_CONFIG reply carries {len(data)} bytes, not {size}")
        # Header and config header in one pack: a guest reads config space once per MiB.
        self._owed = None
        return _CONFIG_REPLY_HEADER.pack(FrontendRequest.GET_CONFIG, _REPLY_FLAGS,
                                         _CONFIG_HEADER.size + size, offset, size, flags) + data

    def reply_config_failure(self) -> bytes:
        """Fail a GET_CONFIG (accepted or rejected): the spec's zero-length reply."""
        self._check_owed(FrontendRequest.GET_CONFIG)
        return self._settle(_reply(FrontendRequest.GET_CONFIG))

    @property
    def _owed_request(self) -> int:
        assert self._owed is not None
        return self._owed.REQUEST if isinstance(self._owed, Request) else self._owed.request

    def _check_owed(self, request: int) -> Request | RejectedRequest:
        if self._owed is None:
            raise ReplyNotOwed(f"no request waits for a reply ({_name(request)} given)")
        if self._owed_request != request:
            raise ReplyMismatch(f"{_name(self._owed_request)} waits, not {_name(request)}")
        return self._owed

    def _settle(self, reply: bytes) -> bytes:
        self._owed = None
        return reply


# --------------------------------------------------------------------------------------
# FrontendConnection: the peer's end of the main socket (tests, a Python VMM)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class U64Reply:
    """The value answering GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS."""

    request: int
    value: int


@dataclass(frozen=True)
class Ack:
    """A REPLY_ACK status: 0 is success."""

    request: int
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass(frozen=True)
class VringStateReply:
    index: int
    num: int


@dataclass(frozen=True)
class ConfigReply:
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class ConfigReplyFailed:
    """The back-end answered GET_CONFIG with the zero-length error reply."""


FrontendEvent: TypeAlias = (
    U64Reply | Ack | VringStateReply | ConfigReply | ConfigReplyFailed | ConnectionClosed
)


def _decode_reply(frame: _Frame, expected: Request | None) -> FrontendEvent:
    _expect_fds(frame, 0)
    if expected is None or frame.request != expected.REQUEST:
        raise UnexpectedReply(f"reply to {frame.name} while waiting for {expected}")
    if isinstance(expected, GetVringBase):
        index, num = _unpack(frame, _VRING_STATE)
        if index != expected.index:
            raise UnexpectedReply(f"GET_VRING_BASE reply for vring {index}, asked {expected.index}")
        return VringStateReply(index, num)
    if isinstance(expected, GetConfig):
        if not frame.payload:
            return ConfigReplyFailed()
        offset, size, flags, data = _decode_config(frame)
        if (offset, size, flags) != (expected.offset, expected.size, expected.flags):
            raise UnexpectedReply(f"GET_CONFIG reply ({offset}, {size}, {flags}) for {expected}")
        return ConfigReply(offset, size, flags, data)
    (value,) = _unpack(frame, _U64)
    if expected.REQUEST in _U64_REPLY_REQUESTS:
        return U64Reply(expected.REQUEST, value)
    return Ack(expected.REQUEST, value)


class FrontendConnection(_Endpoint):
    """The front-end's end of the main socket, so tests (or a Python VMM) can drive a
    BackendConnection without a socket, as h11's tests pair two connections.

    send() encodes a Request event exactly as a front-end would; the replies fed back come
    out of next_event() as typed reply events. Every malformed reply raises
    BadBackendMessage (fatal): on this side a broken message is our back-end's fault.
    """

    def __init__(self, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._framer = _Framer(names=FrontendRequest, replies=True, max_buffer_size=max_buffer_size)
        self._awaiting: Request | None = None

    def send(self, request: Request) -> tuple[bytes, tuple[int, ...]]:
        """The bytes and the fds to send for ``request`` (fds go with the first byte).

        No field is checked against the back-end's bounds, so tests can send bad values.
        Raises ReplyPending if it expects a reply while another one is awaited, and
        ValueOutOfRange if a field does not fit the wire.
        """
        if request.reply_expected and self._awaiting is not None:
            raise ReplyPending(f"{self._awaiting} still waits for its reply")
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if request.need_reply else 0)
        data = _encode(request.REQUEST, flags, request._payload())
        if request.reply_expected:
            self._awaiting = request
        return data, request._attached_fds()

    def next_event(self) -> FrontendEvent | NeedData:
        """The next reply, NEED_DATA, or ConnectionClosed. Raises BadBackendMessage (fatal)
        if the back-end's message is malformed or answers nothing that was asked."""
        try:
            frame = self._framer.next_frame()
        except FramingError as error:
            raise BadBackendMessage(str(error)) from error
        if frame is None:
            return ConnectionClosed() if self._framer.at_clean_eof else NEED_DATA
        try:
            event = _decode_reply(frame, self._awaiting)
        except FrontendProtocolError as error:
            _close_all(frame.fds)
            self._framer.fail(BadBackendMessage(str(error)), cause=error)
        self._awaiting = None
        return event


# --------------------------------------------------------------------------------------
# The backend-request socket (SET_BACKEND_REQ_FD)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChangeMsg:
    """BACKEND_CONFIG_CHANGE_MSG as the front-end receives it: re-read the config space."""

    need_reply: bool = False


class BackendRequestSender(_Endpoint):
    """The back-end's end of the backend-request socket: encodes BACKEND_CONFIG_CHANGE_MSG
    and decodes the front-end's acks. Any malformed or unsolicited message from the front-end
    raises its FrontendProtocolError subclass and is fatal (this channel carries nothing else).
    """

    def __init__(self, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._framer = _Framer(names=BackendRequest, replies=True, max_buffer_size=max_buffer_size)
        self._awaiting: BackendRequest | None = None

    def config_change_msg(self, need_reply: bool = True) -> bytes:
        """Tell the front-end the config space changed. With need_reply (REPLY_ACK
        negotiated), the front-end answers with an Ack. Raises ReplyPending while an
        earlier message still waits for its ack."""
        if self._awaiting is not None:
            raise ReplyPending(f"{self._awaiting.name} still waits for its ack")
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        if need_reply:
            self._awaiting = BackendRequest.CONFIG_CHANGE_MSG
        return _encode(BackendRequest.CONFIG_CHANGE_MSG, flags)

    def next_event(self) -> Ack | ConnectionClosed | NeedData:
        """The front-end's Ack, NEED_DATA or ConnectionClosed. Raises FramingError,
        UnexpectedReply, BadPayloadSize or UnexpectedFds (all fatal)."""
        frame = self._framer.next_frame()
        if frame is None:
            return ConnectionClosed() if self._framer.at_clean_eof else NEED_DATA
        try:
            _expect_fds(frame, 0)
            if self._awaiting is None or frame.request != self._awaiting:
                raise UnexpectedReply(f"ack for {frame.name}, awaiting {self._awaiting!r}")
            (status,) = _unpack(frame, _U64)
        except FrontendProtocolError as error:
            _close_all(frame.fds)
            self._framer.fail(error)
        self._awaiting = None
        return Ack(frame.request, status)


class BackendRequestReceiver(_Endpoint):
    """The front-end's end of the backend-request socket (tests): decodes the back-end's
    requests and encodes acks. Anything malformed raises BadBackendMessage (fatal)."""

    def __init__(self, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._framer = _Framer(names=BackendRequest, replies=False, max_buffer_size=max_buffer_size)
        self._owed: ConfigChangeMsg | None = None

    def next_event(self) -> ConfigChangeMsg | ConnectionClosed | NeedData:
        if self._owed is not None:
            raise ReplyOwed("BACKEND_CONFIG_CHANGE_MSG still waits for its ack")
        try:
            frame = self._framer.next_frame()
        except FramingError as error:
            raise BadBackendMessage(str(error)) from error
        if frame is None:
            return ConnectionClosed() if self._framer.at_clean_eof else NEED_DATA
        try:
            if frame.request != BackendRequest.CONFIG_CHANGE_MSG:
                raise UnsupportedRequest(f"backend request {frame.name}")
            _expect_size(frame, 0)
            _expect_fds(frame, 0)
        except FrontendProtocolError as error:
            _close_all(frame.fds)
            self._framer.fail(BadBackendMessage(str(error)), cause=error)
        event = ConfigChangeMsg(need_reply=frame.need_reply)
        if event.need_reply:
            self._owed = event
        return event

    def reply_ack(self, request: int, ok: bool) -> bytes:
        """The ack for the backend request that waits (as UML sends it: request echoed,
        flags VERSION|REPLY, u64 status)."""
        if self._owed is None:
            raise ReplyNotOwed("no backend request waits for an ack")
        if request != BackendRequest.CONFIG_CHANGE_MSG:
            raise ReplyMismatch(f"BACKEND_CONFIG_CHANGE_MSG waits, not {request}")
        self._owed = None
        return _reply(request, _pack(_U64, 0 if ok else 1))
