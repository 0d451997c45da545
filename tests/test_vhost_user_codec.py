"""Tests for control/vhost_user.py, the sans-I/O vhost-user codec.

Like h11's tests, most pair the two ends (FrontendConnection -> BackendConnection) without a
socket; one test runs the documented I/O recipe over a real socketpair with SCM_RIGHTS.
Fds are real pipe ends, so "closed" is checked with os.fstat, not assumed.
"""

import dataclasses
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.vhost_user import (
    ANCILLARY_SIZE,
    MAX_FDS_PER_MESSAGE,
    RECV_SIZE,
    REQUESTS_WITH_REPLY,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_PROTOCOL_F_BACKEND_REQ,
    VHOST_USER_PROTOCOL_F_CONFIG,
    VHOST_USER_PROTOCOL_F_REPLY_ACK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    Ack,
    AddMemReg,
    BackendConnection,
    BackendRequest,
    BackendRequestReceiver,
    BackendRequestSender,
    BadBackendMessage,
    BadConfigAccess,
    BadMemRegion,
    BadPayloadSize,
    BadReplyFlag,
    BadVersion,
    BadVringBase,
    BadVringIndex,
    BadVringNum,
    ConfigChangeMsg,
    ConfigReply,
    ConfigReplyFailed,
    ConnectionClosed,
    ConnectionUnusable,
    FrontendConnection,
    FrontendRequest,
    GetConfig,
    GetFeatures,
    GetMaxMemSlots,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    InvalidField,
    MemRegion,
    MissingFds,
    NEED_DATA,
    OversizedMessage,
    ReceiveBufferFull,
    RejectedRequest,
    RemMemReg,
    ReplyMismatch,
    ReplyNotOwed,
    ReplyOwed,
    ReplyPending,
    Request,
    ReservedBitsSet,
    ReservedFlagsSet,
    ResetDevice,
    ResetOwner,
    SetBackendReqFd,
    SetConfig,
    SetFeatures,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    TooManyRegions,
    TruncatedMessage,
    U64Reply,
    UnexpectedFds,
    UnexpectedReply,
    UnknownRequest,
    UnsupportedRequest,
    VhostUserError,
    VringStateReply,
    encode_message,
    fds_from_ancillary,
)

MAX_QUEUES = 4
MakeFd = Callable[[], int]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def new_fd() -> int:
    """A real, otherwise unused fd: the read end of a pipe whose write end is closed."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        assert error.errno == errno.EBADF
        return False
    return True


def close_quietly(fds: list[int]) -> None:
    for fd in fds:
        if is_open(fd):
            os.close(fd)


@pytest.fixture
def make_fd() -> Iterator[MakeFd]:
    """Creates pipe fds and closes, at teardown, those neither the codec nor the test closed."""
    created: list[int] = []

    def make() -> int:
        fd = new_fd()
        created.append(fd)
        return fd

    yield make
    close_quietly(created)


def event_fds(event: object) -> list[int]:
    """The fds an event hands to its receiver."""
    if isinstance(event, SetMemTable):
        return list(event.fds)
    fd = getattr(event, "fd", None)
    return [] if fd is None else [fd]


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def new_backend(**kwargs: int) -> BackendConnection:
    return BackendConnection(max_queues=MAX_QUEUES, **kwargs)


def feed_one(backend: BackendConnection, data: bytes, fds: tuple[int, ...] | list[int] = ()):
    backend.receive_data(data, fds)
    return backend.next_event()


def rejected(backend: BackendConnection, data: bytes, fds=(), error=VhostUserError):
    """Feed one whole message and check it is refused with ``error``."""
    event = feed_one(backend, data, fds)
    assert isinstance(event, RejectedRequest), event
    assert isinstance(event.error, error), event.error
    return event


def answer(backend: BackendConnection, event: Request):
    """The reply the back-end sends for ``event`` and the event the front-end must decode."""
    if event.REQUEST in (
        FrontendRequest.GET_FEATURES,
        FrontendRequest.GET_PROTOCOL_FEATURES,
        FrontendRequest.GET_QUEUE_NUM,
        FrontendRequest.GET_MAX_MEM_SLOTS,
    ):
        return backend.reply_u64(event.REQUEST, 0x1234), U64Reply(event.REQUEST, 0x1234)
    if isinstance(event, GetVringBase):
        return backend.reply_vring_state(event.index, 7), VringStateReply(event.index, 7)
    if isinstance(event, GetConfig):
        data = bytes(range(event.size))
        reply = backend.reply_config(event.offset, event.size, event.flags, data)
        return reply, ConfigReply(event.offset, event.size, event.flags, data)
    return backend.reply_ack(event.REQUEST, True), Ack(event.REQUEST, 0)


REGION = MemRegion(guest_phys_addr=0x100000, memory_size=0x1F00000, userspace_addr=0x100000,
                   mmap_offset=0x100000)  # fmt: skip
REGION_BYTES = struct.pack("<QQQQ", 0x100000, 0x1F00000, 0x100000, 0x100000)

# Every supported request, as a front-end builds it (fds made on demand).
SAMPLES: list[Callable[[MakeFd], Request]] = [
    lambda fd: GetFeatures(),
    lambda fd: SetFeatures((1 << 30) | (1 << 32)),
    lambda fd: SetOwner(),
    lambda fd: ResetOwner(),
    lambda fd: SetMemTable((REGION,), (fd(),)),
    lambda fd: SetMemTable(
        tuple(MemRegion(i << 30, 1 << 30, i << 40, 0) for i in range(8)),
        tuple(fd() for _ in range(8)),
    ),
    lambda fd: SetVringNum(1, 256),
    lambda fd: SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 2**64 - 1),
    lambda fd: SetVringBase(2, 0xFFFF),
    lambda fd: GetVringBase(3),
    lambda fd: SetVringKick(0, fd()),
    lambda fd: SetVringKick(1, None),
    lambda fd: SetVringCall(2, fd()),
    lambda fd: SetVringErr(3, None),
    lambda fd: GetProtocolFeatures(),
    lambda fd: SetProtocolFeatures(1 << VHOST_USER_PROTOCOL_F_REPLY_ACK),
    lambda fd: GetQueueNum(),
    lambda fd: SetVringEnable(1, True),
    lambda fd: SetVringEnable(0, False),
    lambda fd: SetBackendReqFd(fd()),
    lambda fd: GetConfig(0, 8),
    lambda fd: GetConfig(248, 8, 1),
    lambda fd: SetConfig(4, b"\x01\x02\x03\x04"),
    lambda fd: ResetDevice(),
    lambda fd: GetMaxMemSlots(),
    lambda fd: AddMemReg(REGION, fd()),
    lambda fd: RemMemReg(REGION),
]


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_reply", [False, True])
@pytest.mark.parametrize("sample", range(len(SAMPLES)))
def test_every_request_round_trips_with_its_reply(sample: int, need_reply: bool, make_fd: MakeFd):
    frontend, backend = FrontendConnection(), new_backend()
    request = dataclasses.replace(SAMPLES[sample](make_fd), need_reply=need_reply)

    data, fds = frontend.send(request)
    backend.receive_data(data, fds)
    event = backend.next_event()

    assert event == request
    assert event_fds(event) == list(fds)
    assert all(is_open(fd) for fd in fds)
    assert event.reply_expected == (need_reply or request.REQUEST in REQUESTS_WITH_REPLY)
    if event.reply_expected:
        reply, expected = answer(backend, event)
        frontend.receive_data(reply)
        assert frontend.next_event() == expected
    assert backend.next_event() is NEED_DATA
    assert frontend.next_event() is NEED_DATA


def test_config_failure_reply_round_trips():
    frontend, backend = FrontendConnection(), new_backend()
    backend.receive_data(*frontend.send(GetConfig(0, 8)))
    assert isinstance(backend.next_event(), GetConfig)
    frontend.receive_data(backend.reply_config_failure())
    assert frontend.next_event() == ConfigReplyFailed()


def test_messages_fed_one_byte_at_a_time_parse(make_fd: MakeFd):
    frontend, backend = FrontendConnection(), new_backend()
    for build in SAMPLES:
        request = build(make_fd)
        data, fds = frontend.send(request)
        for i in range(len(data)):
            # The fds ride with the first byte, as they do on a unix stream socket.
            backend.receive_data(data[i : i + 1], fds if i == 0 else ())
            if i < len(data) - 1:
                assert backend.next_event() is NEED_DATA
        event = backend.next_event()
        assert event == request
        if event.reply_expected:
            frontend.receive_data(answer(backend, event)[0])
            frontend.next_event()


def test_end_of_stream_at_a_boundary_is_connection_closed():
    backend = new_backend()
    backend.receive_data(encode_message(FrontendRequest.SET_OWNER))
    backend.receive_eof()
    assert backend.next_event() == SetOwner()
    assert backend.next_event() == ConnectionClosed()
    assert list(backend.events()) == [ConnectionClosed()]
    with pytest.raises(ConnectionUnusable):
        backend.receive_data(b"x")


# ----------------------------------------------------------------------------------------
# The sequence User-Mode Linux's virtio_uml sends (DESIGN.md, arch/um/drivers/virtio_uml.c)
# ----------------------------------------------------------------------------------------


def uml_message(request: FrontendRequest, payload: bytes = b"", *, ack: bool = True) -> bytes:
    """A message as virtio_uml builds it: VERSION, plus NEED_REPLY once REPLY_ACK is on
    for every message that has no reply of its own."""
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if ack else 0)
    return encode_message(request, payload, flags=flags)


def uml_sequence(queues: int = 2) -> list[tuple[bytes, int]]:
    """(bytes, number of fds) per message, in UML's order. UML's SET_MEM_TABLE payload is its
    fixed 2-slot array (72 bytes) even with one region; GET_CONFIG carries size zero bytes."""
    req = FrontendRequest
    protocol = (
        1 << VHOST_USER_PROTOCOL_F_REPLY_ACK
        | 1 << VHOST_USER_PROTOCOL_F_BACKEND_REQ
        | 1 << VHOST_USER_PROTOCOL_F_CONFIG
    )
    mem_table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0x200000, 0x1FE00000, 0x200000,
                                                       0x200000) + bytes(32)  # fmt: skip
    sequence = [
        (uml_message(req.SET_OWNER, ack=False), 0),  # before REPLY_ACK is negotiated
        (uml_message(req.GET_FEATURES, ack=False), 0),
        (uml_message(req.GET_PROTOCOL_FEATURES, ack=False), 0),
        (uml_message(req.SET_PROTOCOL_FEATURES, u64(protocol)), 0),
        (uml_message(req.SET_BACKEND_REQ_FD), 1),
        (uml_message(req.SET_FEATURES, u64(1 << 32 | 1 << 30 | 1)), 0),
        (uml_message(req.SET_MEM_TABLE, mem_table), 1),
    ]
    for q in range(queues):
        desc = 0x1000000 + q * 0x10000
        sequence += [
            (uml_message(req.SET_VRING_CALL, u64(q)), 1),
            (uml_message(req.SET_VRING_NUM, struct.pack("<II", q, 256)), 0),
            (uml_message(req.SET_VRING_BASE, struct.pack("<II", q, 0)), 0),
            (uml_message(req.SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, desc, desc + 0x2000,
                                                         desc + 0x1000, 2**64 - 1)), 0),
        ]  # fmt: skip
    for q in range(queues):
        sequence += [
            (uml_message(req.SET_VRING_KICK, u64(q)), 1),
            (uml_message(req.SET_VRING_ENABLE, struct.pack("<II", q, 1)), 0),
        ]
    config_get = struct.pack("<III", 0, 8, 0) + bytes(8)
    config_set = struct.pack("<III", 4, 4, 0) + struct.pack("<I", 256)
    sequence += [
        (uml_message(req.GET_CONFIG, config_get, ack=False), 0),
        (uml_message(req.SET_CONFIG, config_set), 0),
    ]
    return sequence


UML_EVENT_TYPES = (
    [SetOwner, GetFeatures, GetProtocolFeatures, SetProtocolFeatures, SetBackendReqFd]
    + [SetFeatures, SetMemTable]
    + [SetVringCall, SetVringNum, SetVringBase, SetVringAddr] * 2
    + [SetVringKick, SetVringEnable] * 2
    + [GetConfig, SetConfig]
)


def check_uml_reply(reply: bytes, request: int) -> None:
    """UML's vhost_user_recv_resp: flags must be exactly REPLY|VERSION, request echoed."""
    got_request, flags, size = struct.unpack_from("<III", reply)
    assert (got_request, flags) == (request, VHOST_USER_REPLY_MASK | VHOST_USER_VERSION)
    assert size == len(reply) - 12


@pytest.mark.parametrize("chunking", ["per-message", "byte-at-a-time"])
def test_uml_sequence_parses(chunking: str, make_fd: MakeFd):
    backend = new_backend()
    seen: list[Request] = []
    handed: list[int] = []
    for data, nfds in uml_sequence():
        fds = [make_fd() for _ in range(nfds)]
        whole = chunking == "per-message"
        pieces = [data] if whole else [data[i : i + 1] for i in range(len(data))]
        for i, piece in enumerate(pieces):
            backend.receive_data(piece, fds if i == 0 else ())
            for event in backend.events():
                assert isinstance(event, Request), event
                seen.append(event)
                handed += event_fds(event)
                if event.reply_expected:
                    reply, _ = answer(backend, event)
                    check_uml_reply(reply, event.REQUEST)

    assert [type(event) for event in seen] == UML_EVENT_TYPES
    mem_table = seen[6]
    assert isinstance(mem_table, SetMemTable) and len(mem_table.regions) == 1
    assert mem_table.regions[0].mmap_offset == mem_table.regions[0].guest_phys_addr
    assert seen[-2] == GetConfig(0, 8)
    assert seen[-1] == SetConfig(4, struct.pack("<I", 256), need_reply=True)
    assert all(event.need_reply for event in seen[3:-2] if not isinstance(event, GetConfig))
    assert all(is_open(fd) for fd in handed) and len(handed) == 6


def test_uml_get_config_reply_has_the_size_uml_checks():
    """virtio_uml rejects the reply unless header size == 12 + cfg_size and config size echoes."""
    backend = new_backend()
    event = feed_one(backend, uml_message(FrontendRequest.GET_CONFIG, struct.pack("<III", 0, 24, 0)
                                          + bytes(24), ack=False))  # fmt: skip
    reply = backend.reply_config(event.offset, event.size, event.flags, bytes(24))
    check_uml_reply(reply, FrontendRequest.GET_CONFIG)
    assert struct.unpack_from("<III", reply, 12) == (0, 24, 0)
    assert len(reply) == 12 + 12 + 24


# ----------------------------------------------------------------------------------------
# Refused messages: the connection keeps going
# ----------------------------------------------------------------------------------------

R = FrontendRequest


@pytest.mark.parametrize(
    "request_, payload",
    [
        (R.GET_FEATURES, u64(0)),
        (R.SET_OWNER, b"\0"),
        (R.SET_FEATURES, b"\0" * 4),
        (R.SET_FEATURES, b"\0" * 12),
        (R.SET_VRING_NUM, b"\0" * 4),
        (R.SET_VRING_ADDR, b"\0" * 39),
        (R.SET_VRING_ADDR, b"\0" * 41),
        (R.SET_VRING_KICK, struct.pack("<I", VHOST_USER_VRING_NOFD_MASK)),
        (R.SET_MEM_TABLE, b"\0" * 4),
        (R.SET_MEM_TABLE, struct.pack("<II", 2, 0) + b"\0" * 32),  # 2 regions, 1 slot
        (R.SET_MEM_TABLE, struct.pack("<II", 0, 0) + b"\0" * 33),  # not whole slots
        (R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + b"\0" * 32 * 9),  # more than 8 slots
        (R.GET_CONFIG, struct.pack("<III", 0, 8, 0) + b"\0" * 7),
        (R.SET_CONFIG, struct.pack("<II", 0, 8)),
        (R.ADD_MEM_REG, b"\0" * 32),
        (R.SET_BACKEND_REQ_FD, u64(0)),
    ],
)
def test_wrong_payload_size_is_refused_and_the_next_message_parses(request_, payload):
    backend = new_backend()
    backend.receive_data(encode_message(request_, payload) + encode_message(R.SET_OWNER))
    event = backend.next_event()
    assert isinstance(event, RejectedRequest) and isinstance(event.error, BadPayloadSize)
    assert event.request == request_
    if event.reply_expected:
        # A refused GET_* still owes its reply body, which cannot be faked: close instead
        # (GET_CONFIG alone has an error reply).
        assert request_ in REQUESTS_WITH_REPLY
        with pytest.raises(ReplyOwed):
            backend.next_event()
        if request_ != R.GET_CONFIG:
            return
        backend.reply_config_failure()
    assert backend.next_event() == SetOwner()


@pytest.mark.parametrize(
    "message",
    [
        encode_message(R.SET_FEATURES, u64(1)),
        encode_message(R.GET_FEATURES),
        encode_message(R.SET_VRING_NUM, struct.pack("<II", 0, 256)),
        encode_message(R.SET_VRING_KICK, u64(VHOST_USER_VRING_NOFD_MASK)),  # NOFD: no fd allowed
        encode_message(R.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(4)),
        encode_message(99),  # unknown requests carry no fds either
    ],
)
def test_fds_on_a_message_that_may_not_carry_them_are_closed(message: bytes, make_fd: MakeFd):
    backend = new_backend()
    fds = [make_fd(), make_fd()]
    event = rejected(backend, message, fds)
    assert isinstance(event.error, (UnexpectedFds, UnknownRequest))
    assert not any(is_open(fd) for fd in fds)


@pytest.mark.parametrize(
    "message, count",
    [
        (encode_message(R.SET_VRING_KICK, u64(0)), 2),
        (encode_message(R.SET_VRING_CALL, u64(1)), 3),
        (encode_message(R.SET_BACKEND_REQ_FD), 2),
    ],
)
def test_too_many_fds_are_all_closed_and_the_message_refused(message, count, make_fd: MakeFd):
    backend = new_backend()
    fds = [make_fd() for _ in range(count)]
    rejected(backend, message, fds, UnexpectedFds)
    assert not any(is_open(fd) for fd in fds)


def test_mem_table_with_more_fds_than_regions_is_refused(make_fd: MakeFd):
    frontend, backend = FrontendConnection(), new_backend()
    data, _ = frontend.send(SetMemTable((REGION,), ()))
    fds = [make_fd(), make_fd()]
    rejected(backend, data, fds, UnexpectedFds)
    assert not any(is_open(fd) for fd in fds)


def test_more_fds_in_one_receive_than_any_message_carries_are_closed_on_arrival(make_fd: MakeFd):
    backend = new_backend()
    message = encode_message(R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + REGION_BYTES)
    fds = [make_fd() for _ in range(MAX_FDS_PER_MESSAGE + 1)]
    backend.receive_data(message[:5], fds)
    assert not any(is_open(fd) for fd in fds)  # closed before the message is even complete
    backend.receive_data(message[5:])
    assert isinstance(backend.next_event().error, UnexpectedFds)


def test_fds_cut_by_msg_ctrunc_refuse_their_message(make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    backend.receive_data(encode_message(R.SET_VRING_KICK, u64(0)), [fd], fds_truncated=True)
    event = backend.next_event()
    assert isinstance(event, RejectedRequest) and isinstance(event.error, UnexpectedFds)
    assert not is_open(fd)


def test_fds_beyond_the_held_bound_are_closed_and_refuse_their_message(make_fd: MakeFd):
    backend = new_backend(max_held_fds=2)
    message = encode_message(R.SET_VRING_CALL, u64(0))
    first, second = [make_fd(), make_fd()], [make_fd()]
    backend.receive_data(message[:3], first)
    backend.receive_data(message[3:6], second)
    assert not is_open(second[0]) and all(is_open(fd) for fd in first)
    backend.receive_data(message[6:])
    assert isinstance(backend.next_event().error, UnexpectedFds)
    assert not any(is_open(fd) for fd in first)


def test_missing_fd_is_refused():
    rejected(new_backend(), encode_message(R.SET_VRING_CALL, u64(1)), error=MissingFds)
    rejected(new_backend(), encode_message(R.SET_BACKEND_REQ_FD), error=MissingFds)
    mem_table = struct.pack("<II", 1, 0) + REGION_BYTES
    rejected(new_backend(), encode_message(R.SET_MEM_TABLE, mem_table), error=MissingFds)


def test_nofd_flag_means_no_fd(make_fd: MakeFd):
    backend = new_backend()
    for request, cls in [(R.SET_VRING_KICK, SetVringKick), (R.SET_VRING_CALL, SetVringCall),
                         (R.SET_VRING_ERR, SetVringErr)]:  # fmt: skip
        event = feed_one(backend, encode_message(request, u64(2 | VHOST_USER_VRING_NOFD_MASK)))
        assert event == cls(2, None)
    fd = make_fd()
    rejected(backend, encode_message(R.SET_VRING_KICK, u64(2 | VHOST_USER_VRING_NOFD_MASK)), [fd],
             UnexpectedFds)  # fmt: skip
    assert not is_open(fd)
    rejected(backend, encode_message(R.SET_VRING_KICK, u64(1 << 9)), error=ReservedBitsSet)


def test_rem_mem_reg_closes_the_fd_old_frontends_attach(make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    event = feed_one(backend, encode_message(R.REM_MEM_REG, u64(0) + REGION_BYTES), [fd])
    assert event == RemMemReg(REGION)
    assert not is_open(fd)


@pytest.mark.parametrize("num", [0, 3, 6, 255, 32769, 65536, 2**32 - 1])
def test_vring_num_that_is_not_a_power_of_two_up_to_32768_is_refused(num: int):
    message = encode_message(R.SET_VRING_NUM, struct.pack("<II", 0, num))
    rejected(new_backend(), message, error=BadVringNum)


@pytest.mark.parametrize("num", [1, 2, 256, 32768])
def test_vring_num_power_of_two_is_accepted(num: int):
    message = encode_message(R.SET_VRING_NUM, struct.pack("<II", 0, num))
    assert feed_one(new_backend(), message) == SetVringNum(0, num)


@pytest.mark.parametrize(
    "message",
    [
        encode_message(R.SET_VRING_NUM, struct.pack("<II", MAX_QUEUES, 256)),
        encode_message(R.SET_VRING_BASE, struct.pack("<II", 2**32 - 1, 0)),
        encode_message(R.GET_VRING_BASE, struct.pack("<II", MAX_QUEUES, 0)),
        encode_message(R.SET_VRING_ENABLE, struct.pack("<II", 200, 1)),
        encode_message(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", MAX_QUEUES, 0, 0, 0, 0, 0)),
        encode_message(R.SET_VRING_KICK, u64(MAX_QUEUES | VHOST_USER_VRING_NOFD_MASK)),
    ],
)
def test_vring_index_beyond_the_queue_count_is_refused(message: bytes):
    rejected(new_backend(), message, error=BadVringIndex)


def test_other_field_checks():
    backend = new_backend()
    rejected(backend, encode_message(R.SET_VRING_BASE, struct.pack("<II", 0, 0x10000)),
             error=BadVringBase)  # fmt: skip
    rejected(backend, encode_message(R.SET_VRING_ENABLE, struct.pack("<II", 0, 2)),
             error=InvalidField)  # fmt: skip
    rejected(backend, encode_message(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0)),
             error=ReservedBitsSet)  # fmt: skip


@pytest.mark.parametrize(
    "payload, error",
    [
        (struct.pack("<II", 9, 0) + bytes(32 * 9), TooManyRegions),
        (struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0, 0, 0), BadMemRegion),
        (struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 2**64 - 4096, 8192, 0, 0), BadMemRegion),
        (struct.pack("<II", 1, 0) + REGION_BYTES + b"\1" + bytes(31), ReservedBitsSet),
    ],
)
def test_bad_memory_tables_are_refused(payload: bytes, error: type, make_fd: MakeFd):
    fd = make_fd()
    rejected(new_backend(), encode_message(R.SET_MEM_TABLE, payload), [fd], error)
    assert not is_open(fd)


@pytest.mark.parametrize(
    "offset, size, flags",
    [(0, 0, 0), (0, 257, 0), (250, 8, 0), (2**32 - 4, 8, 0), (0, 8, 2)],
)
def test_bad_config_accesses_are_refused(offset: int, size: int, flags: int):
    payload = struct.pack("<III", offset, size, flags) + bytes(size)
    for request in (R.GET_CONFIG, R.SET_CONFIG):
        rejected(new_backend(), encode_message(request, payload), error=BadConfigAccess)


def test_unknown_request_is_an_event_and_can_be_refused_with_an_ack():
    backend = new_backend()
    flags = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK
    event = rejected(backend, encode_message(99, b"abc", flags=flags), error=UnknownRequest)
    assert event.request == 99 and event.reply_expected
    reply = backend.reply_ack(99, False)
    assert reply == header(99, VHOST_USER_REPLY_MASK | VHOST_USER_VERSION, 8) + u64(1)
    assert feed_one(backend, encode_message(R.SET_OWNER)) == SetOwner()


@pytest.mark.parametrize("request_, nfds", [(R.SET_LOG_BASE, 1), (R.SET_LOG_FD, 1),
                                            (R.POSTCOPY_ADVISE, 0), (R.SET_STATUS, 0)])  # fmt: skip
def test_requests_we_never_offer_are_refused_and_their_fds_closed(request_, nfds, make_fd):
    fds = [make_fd() for _ in range(nfds)]
    event = rejected(new_backend(), encode_message(request_, u64(0)), fds, UnsupportedRequest)
    assert event.request == request_
    assert not any(is_open(fd) for fd in fds)


# ----------------------------------------------------------------------------------------
# Framing errors: fatal
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, error",
    [
        (0, BadVersion),
        (2, BadVersion),
        (3, BadVersion),
        (VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, BadReplyFlag),
        (VHOST_USER_VERSION | 0x10, ReservedFlagsSet),
        (VHOST_USER_VERSION | 0x8000_0000, ReservedFlagsSet),
    ],
)
def test_bad_header_flags_are_fatal_and_close_held_fds(flags: int, error: type, make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    backend.receive_data(encode_message(R.SET_VRING_KICK, u64(0), flags=flags), [fd])
    with pytest.raises(error):
        backend.next_event()
    assert not is_open(fd)
    with pytest.raises(ConnectionUnusable):
        backend.next_event()
    other = make_fd()
    with pytest.raises(ConnectionUnusable):
        backend.receive_data(b"x", [other])
    assert not is_open(other)


def test_oversized_header_size_is_fatal_as_soon_as_the_header_arrives(make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    backend.receive_data(header(R.SET_CONFIG, VHOST_USER_VERSION, 4097), [fd])
    with pytest.raises(OversizedMessage):
        backend.next_event()
    assert not is_open(fd)


def test_end_of_stream_inside_a_message_is_fatal_and_closes_its_fds(make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    backend.receive_data(encode_message(R.SET_VRING_CALL, u64(0))[:15], [fd])
    assert backend.next_event() is NEED_DATA
    backend.receive_eof()
    with pytest.raises(TruncatedMessage):
        backend.next_event()
    assert not is_open(fd)


def test_undrained_buffer_overflow_is_our_fault_and_fatal(make_fd: MakeFd):
    backend = new_backend(max_buffer_size=100)
    backend.receive_data(bytes(60))
    fd = make_fd()
    with pytest.raises(ReceiveBufferFull):
        backend.receive_data(bytes(41), [fd])
    assert not is_open(fd)
    with pytest.raises(ConnectionUnusable):
        backend.next_event()


def test_close_releases_fds_of_an_incomplete_message(make_fd: MakeFd):
    backend = new_backend()
    fd = make_fd()
    backend.receive_data(encode_message(R.SET_BACKEND_REQ_FD)[:4], [fd])
    backend.close()
    assert not is_open(fd)
    backend.close()  # idempotent


# ----------------------------------------------------------------------------------------
# Reply discipline (our side)
# ----------------------------------------------------------------------------------------


def test_next_event_refuses_while_a_reply_is_owed():
    backend = new_backend()
    backend.receive_data(encode_message(R.GET_FEATURES) + encode_message(R.SET_OWNER))
    assert backend.next_event() == GetFeatures()
    with pytest.raises(ReplyOwed):
        backend.next_event()
    backend.reply_u64(R.GET_FEATURES, 1)
    assert backend.next_event() == SetOwner()


def test_replies_must_answer_the_request_that_waits():
    backend = new_backend()
    with pytest.raises(ReplyNotOwed):
        backend.reply_ack(R.SET_OWNER, True)
    feed_one(backend, encode_message(R.GET_FEATURES))
    with pytest.raises(ReplyMismatch):  # an ack would be read as the feature bits
        backend.reply_ack(R.GET_FEATURES, True)
    with pytest.raises(ReplyMismatch):
        backend.reply_u64(R.GET_PROTOCOL_FEATURES, 1)
    backend.reply_u64(R.GET_FEATURES, 1)

    feed_one(backend, encode_message(R.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)))
    with pytest.raises(ReplyMismatch):
        backend.reply_config(0, 4, 0, bytes(4))  # UML refuses a reply that does not echo
    with pytest.raises(ReplyMismatch):
        backend.reply_config(0, 8, 0, bytes(7))
    backend.reply_config(0, 8, 0, bytes(8))

    feed_one(backend, encode_message(R.GET_VRING_BASE, struct.pack("<II", 1, 0)))
    with pytest.raises(ReplyMismatch):
        backend.reply_vring_state(0, 5)
    backend.reply_vring_state(1, 5)


def test_rejected_get_config_can_still_be_failed():
    backend = new_backend()
    rejected(backend, encode_message(R.GET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(300)),
             error=BadConfigAccess)  # fmt: skip
    assert backend.reply_config_failure() == header(R.GET_CONFIG, 5, 0)


# ----------------------------------------------------------------------------------------
# The frontend helper and the backend-request channel
# ----------------------------------------------------------------------------------------


def test_frontend_refuses_replies_nobody_asked_for():
    frontend = FrontendConnection()
    frontend.receive_data(header(R.GET_FEATURES, 5, 8) + u64(1))
    with pytest.raises(BadBackendMessage) as info:
        frontend.next_event()
    assert isinstance(info.value.__cause__, UnexpectedReply)


def test_frontend_refuses_a_reply_of_the_wrong_size():
    frontend = FrontendConnection()
    frontend.send(GetFeatures())
    frontend.receive_data(header(R.GET_FEATURES, 5, 4) + bytes(4))
    with pytest.raises(BadBackendMessage) as info:
        frontend.next_event()
    assert isinstance(info.value.__cause__, BadPayloadSize)


def test_frontend_sends_one_reply_expecting_request_at_a_time():
    frontend = FrontendConnection()
    frontend.send(GetFeatures())
    frontend.send(SetOwner())  # expects nothing: fine
    with pytest.raises(ReplyPending):
        frontend.send(GetQueueNum())


def test_config_change_message_round_trips_with_its_ack():
    sender, receiver = BackendRequestSender(), BackendRequestReceiver()
    message = sender.config_change_msg()
    assert message == header(BackendRequest.CONFIG_CHANGE_MSG, VHOST_USER_VERSION
                             | VHOST_USER_NEED_REPLY_MASK, 0)  # fmt: skip
    receiver.receive_data(message)
    assert receiver.next_event() == ConfigChangeMsg(need_reply=True)
    with pytest.raises(ReplyPending):
        sender.config_change_msg()
    sender.receive_data(receiver.reply_ack(BackendRequest.CONFIG_CHANGE_MSG, True))
    assert sender.next_event() == Ack(BackendRequest.CONFIG_CHANGE_MSG, 0)
    assert sender.next_event() is NEED_DATA


def test_config_change_ack_as_uml_sends_it():
    """virtio_uml's vhost_user_reply: the request header echoed, need_reply cleared, reply set,
    a u64 status."""
    sender = BackendRequestSender()
    sender.config_change_msg(need_reply=True)
    sender.receive_data(header(2, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 8) + u64(0))
    assert sender.next_event().ok


def test_unsolicited_ack_on_the_backend_channel_is_fatal():
    sender = BackendRequestSender()
    sender.config_change_msg(need_reply=False)
    sender.receive_data(header(2, 5, 8) + u64(0))
    with pytest.raises(UnexpectedReply):
        sender.next_event()
    with pytest.raises(ConnectionUnusable):
        sender.next_event()


# ----------------------------------------------------------------------------------------
# The I/O recipe over a real socketpair with SCM_RIGHTS
# ----------------------------------------------------------------------------------------


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def recv_into(backend: BackendConnection, sock: socket.socket) -> None:
    """The recipe from the module docstring."""
    data, ancdata, msg_flags, _ = sock.recvmsg(RECV_SIZE, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancillary(ancdata)
    if not data:
        backend.receive_eof()
    else:
        backend.receive_data(data, fds, fds_truncated=bool(msg_flags & socket.MSG_CTRUNC))


def test_io_recipe_over_a_socketpair_with_scm_rights(make_fd: MakeFd):
    vmm_sock, our_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with vmm_sock, our_sock:
        frontend, backend = FrontendConnection(), new_backend()
        kick = make_fd()
        # Two messages before we read: Linux returns them in one recvmsg, the first (no fds)
        # glued in front of the second and its fd. The fd must go to the second.
        for request in (SetFeatures(1 << 30), SetVringKick(1, kick)):
            data, fds = frontend.send(request)
            socket.send_fds(vmm_sock, [data], list(fds))
        os.close(kick)  # the kernel holds its own reference in flight

        recv_into(backend, our_sock)
        first, second = backend.next_event(), backend.next_event()
        assert first == SetFeatures(1 << 30)
        assert isinstance(second, SetVringKick) and second.index == 1
        assert fcntl.fcntl(second.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(second.fd)

        # More fds than any message may carry: the kernel cuts them (MSG_CTRUNC).
        extra = [make_fd() for _ in range(MAX_FDS_PER_MESSAGE + 2)]
        fds_before = open_fd_count()
        socket.send_fds(vmm_sock, [encode_message(R.SET_VRING_CALL, u64(0))], extra)
        recv_into(backend, our_sock)
        event = backend.next_event()
        assert isinstance(event, RejectedRequest) and isinstance(event.error, UnexpectedFds)
        assert open_fd_count() == fds_before  # the 8 that did arrive were closed

        # The reply goes back on the same socket.
        socket.send_fds(vmm_sock, [frontend.send(GetFeatures())[0]], [])
        recv_into(backend, our_sock)
        event = backend.next_event()
        our_sock.sendall(backend.reply_u64(event.REQUEST, 1 << 30))
        frontend.receive_data(vmm_sock.recv(RECV_SIZE))
        assert frontend.next_event() == U64Reply(R.GET_FEATURES, 1 << 30)

        vmm_sock.close()
        recv_into(backend, our_sock)
        assert backend.next_event() == ConnectionClosed()


# ----------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(st.integers(0, len(SAMPLES) - 1), max_size=8), data=st.data())
def test_valid_streams_in_arbitrary_chunks_round_trip(samples: list[int], data: st.DataObject):
    created: list[int] = []

    def fd() -> int:
        created.append(new_fd())
        return created[-1]

    requests = [SAMPLES[i](fd) for i in samples]
    messages = [FrontendConnection().send(request) for request in requests]
    stream = b"".join(message for message, _ in messages)
    # Where the kernel may cut: anywhere, but a read that returns fds stops at the end of the
    # message that carried them; those fds come with the read holding its first byte.
    starts, ends, offset = [], [], 0
    for message, fds in messages:
        starts.append((offset, fds))
        offset += len(message)
        if fds:
            ends.append(offset)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10)) + ends
    backend = new_backend()
    events: list[object] = []
    position = 0
    try:
        for chunk in split(stream, cuts):
            fds = [f for start, group in starts if position <= start < position + len(chunk)
                   for f in group]  # fmt: skip
            backend.receive_data(chunk, fds)
            position += len(chunk)
            for event in backend.events():
                events.append(event)
                if event.reply_expected:
                    answer(backend, event)
        assert events == requests
    finally:
        close_quietly(created)


def raw_messages() -> st.SearchStrategy[bytes]:
    """Messages with plausible headers and arbitrary (often wrong) payloads and flags."""
    flags = st.one_of(st.sampled_from([1, 1 | VHOST_USER_NEED_REPLY_MASK]),
                      st.integers(0, 2**32 - 1))  # fmt: skip
    request = st.one_of(st.sampled_from(list(FrontendRequest)), st.integers(0, 2**32 - 1))
    small = st.integers(0, 300).map(lambda n: struct.pack("<II", n % 10, n))
    payload = st.one_of(st.binary(max_size=300), small, small.map(lambda b: b + bytes(64)))
    return st.builds(lambda r, f, p: encode_message(r, p, flags=f), request, flags, payload)


def valid_messages() -> st.SearchStrategy[bytes]:
    """Well-formed messages; the fds they need may or may not come along in the fuzz."""
    encode = lambda build: FrontendConnection().send(build(lambda: -1))[0]  # noqa: E731
    return st.sampled_from([encode(build) for build in SAMPLES])


class Stop(Exception):
    """Only closing the connection is right now (a refused request with a reply body)."""


def answer_or_stop(backend: BackendConnection, event) -> bool:
    """Answer what can be answered; False when only closing the connection is right."""
    if not event.reply_expected:
        return True
    if isinstance(event, Request):
        answer(backend, event)
    elif event.request == FrontendRequest.GET_CONFIG:
        backend.reply_config_failure()
    elif event.request in REQUESTS_WITH_REPLY:
        return False
    else:
        backend.reply_ack(event.request, False)
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.one_of(
        st.binary(max_size=600),
        st.lists(st.one_of(raw_messages(), valid_messages()), max_size=6).map(b"".join),
    ),
    data=st.data(),
)
def test_arbitrary_input_yields_events_or_our_errors_and_never_leaks_an_fd(stream, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = split(stream, cuts) or [b""]
    plan = [(chunk, data.draw(st.integers(0, 10)), data.draw(st.sampled_from([False] * 7 + [True])))
            for chunk in chunks]  # fmt: skip
    # Every fd exists before the codec closes any, so no fd number is reused mid-example.
    created = [new_fd() for _ in range(sum(count for _, count, _ in plan))]
    given: list[int] = []  # fds whose ownership passed to the codec
    handed: list[int] = []  # fds the codec handed back inside events
    backend = new_backend()
    pool = iter(created)
    try:
        for chunk, count, truncated in plan:
            fds = [next(pool) for _ in range(count)]
            given += fds
            backend.receive_data(chunk, fds, fds_truncated=truncated)
            for event in backend.events():
                handed += event_fds(event)
                if not answer_or_stop(backend, event):
                    raise Stop
        backend.receive_eof()
        for event in backend.events():
            handed += event_fds(event)
            if not answer_or_stop(backend, event):
                break
    except (VhostUserError, Stop):
        pass  # our own errors only: anything else fails the test
    backend.close()
    try:
        assert len(handed) == len(set(handed)) and set(handed) <= set(given)
        for fd in given:
            assert is_open(fd) == (fd in handed), f"fd {fd}: handed={fd in handed}"
    finally:
        close_quietly(handed + created[len(given) :])
