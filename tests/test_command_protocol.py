"""The worker command protocol: every message validated, nothing but our own error raised,
and a worker that gets garbage answers with an error and keeps serving."""

from __future__ import annotations

import os
import socket
import threading

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.command import (MAX_MESSAGE, MESSAGES, Activate, CountersEvent, Envelope,
                            ErrorEvent, GetState, Kill, LogEvent, Ping, ProtocolError, RegionSpec,
                            Reply, RequestStats, RingBases, RingSpec, SetCallFd, SetPoison, StatsEvent,
                            UsedRing,
                            decode, encode, reply_error)
from device.worker import run_worker

GOOD_QUEUE = {"size": 128, "desc": 0, "avail": 4096, "used": 8192, "event_idx": True,
              "indirect": True, "kick_fd": 4, "call_fd": 5}


@pytest.mark.parametrize("wire", [
    {"v": 2, "type": "ping", "id": 1},                       # wrong version
    {"v": 1, "type": "reboot", "id": 1},                     # unknown type
    {"v": 1, "type": "ping", "id": -1},                      # bad id
    {"v": 1, "type": "ping", "id": True},                    # bool is not an id
    {"v": 1, "type": "ping", "id": 1, "extra": 0},           # unknown field
    {"v": 1, "type": "ring_bases", "id": 1, "features": -1, "regions": [],
     "queues": []},                                                          # out of range
    {"v": 1, "type": "ring_bases", "id": 1, "features": "1", "regions": [],
     "queues": []},                                                          # wrong type
    {"v": 1, "type": "ring_bases", "id": 1, "features": 1, "regions": []},   # missing field
    {"v": 1, "type": "activate", "id": 1, "features": 0, "stats_interval": 0.0,
     "regions": [], "queues": [GOOD_QUEUE]},                                # no regions
    {"v": 1, "type": "activate", "id": 1, "features": 0, "stats_interval": 0.0,
     "regions": [{"guest_addr": 0, "size": 4096, "fd": 3, "file_offset": 0,
                  "page_size": 4096}], "queues": [GOOD_QUEUE] * 6},        # too many queues
    {"v": 1, "type": "stats_event", "id": 0, "values": {str(i): 1 for i in range(17)},
     "updated": 0.0},                                                       # too many stats
])
def test_malformed_and_out_of_range_messages_are_refused(wire):
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(wire))


def test_oversized_message_is_refused():
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({"v": 1, "type": "ping", "id": 1, "pad": "x" * MAX_MESSAGE}))
    with pytest.raises(ProtocolError):
        encode(LogEvent(20, "x" * 5000))


def test_huge_container_header_is_refused_without_allocating():
    # A map header claiming 2**32-1 entries in a few bytes.
    with pytest.raises(ProtocolError):
        decode(b"\xdf\xff\xff\xff\xff")


@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_or_raise_own_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


plain = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.text(max_size=20)
                     | st.floats(allow_nan=False), lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)


@given(st.dictionaries(st.sampled_from(["v", "type", "id", "ok", "error", "result", "values",
                                        "level", "message", "queue", "updated"]), plain))
def test_decode_arbitrary_maps_or_raise_own_error(wire):
    try:
        data = msgpack.packb(wire)
    except (OverflowError, ValueError):
        return
    try:
        decode(data)
    except ProtocolError:
        pass


def test_worker_answers_garbage_with_errors_and_keeps_serving():
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    thread = threading.Thread(target=run_worker, args=(child.fileno(), False), daemon=True)
    thread.start()
    parent.settimeout(5)
    bad_activate = Activate(0, 0.0, [RegionSpec(0, 4096, 999, 0, None, 4096)],
                            [RingSpec(**GOOD_QUEUE, next_avail=0)] * 2)
    for garbage in (b"\xc1", b"x" * (MAX_MESSAGE + 10), msgpack.packb([1, 2, 3]),
                    encode(bad_activate, 7)):
        parent.send(garbage)
        reply = decode(parent.recv(MAX_MESSAGE)).message
        assert isinstance(reply, Reply) and reply.ok is False
    parent.send(encode(LogEvent(20, "not a request")))
    assert decode(parent.recv(MAX_MESSAGE)).message.ok is False
    parent.send(encode(Ping(), 8))
    reply = decode(parent.recv(MAX_MESSAGE))
    assert (reply.id, reply.message.ok) == (8, True)
    parent.send(encode(Kill(), 9))
    assert decode(parent.recv(MAX_MESSAGE)).message == Reply(ok=True, result={"active": False})
    thread.join(5)
    assert not thread.is_alive()
    parent.close()
    child.close()


def test_encode_round_trips():
    for data in (encode(RequestStats(), 3), reply_error(4, "no"),
                 encode(ErrorEvent("inflate", "bad"))):
        envelope = decode(data)
        assert encode(envelope.message, envelope.id) == data


def test_every_message_type_round_trips_through_its_schema():
    """The schema is the dataclasses: each type decodes exactly what it encodes."""
    region = RegionSpec(0, 4096, 3, 0, None, 4096)
    samples = [Activate(1, 0.5, [region], [RingSpec(**GOOD_QUEUE, next_avail=None)]),
               Activate(1, 0.5, [region], [RingSpec(**GOOD_QUEUE, next_avail=7)], poison_val=0xAAAAAAAA),
               Kill(), RingBases(1, [region], [UsedRing(8192)]), SetCallFd("inflate"),
               SetPoison(0), RequestStats(), GetState(),
               Ping(), Reply(ok=True, result={"ring_bases": {"inflate": 3}}),
               Reply(ok=False, error="no"), StatsEvent({"free_memory": 1}, 2.0),
               CountersEvent({"kicks": 3}), LogEvent(20, "hello"), ErrorEvent("inflate", "bad")]
    assert {type(m) for m in samples} == set(MESSAGES.values())
    for message in samples:
        assert decode(encode(message, 5)) == Envelope(5, message)


def test_fds_come_only_with_the_message_that_carries_one():
    """An fd with any other command, or a set_call_fd without exactly one, is refused and
    the fds are closed (the worker does not keep what it may not have)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    thread = threading.Thread(target=run_worker, args=(child.fileno(), False), daemon=True)
    thread.start()
    parent.settimeout(5)
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/fd"))
    for data, fds in ((encode(Ping(), 3), [r]), (encode(SetCallFd("inflate"), 4), []),
                      (encode(SetCallFd("inflate"), 5), [r, w]),
                      (encode(SetCallFd("inflate"), 6), [r])):    # no queues: refused too
        socket.send_fds(parent, [data], fds)
        assert decode(parent.recv(MAX_MESSAGE)).message.ok is False
    assert set(os.listdir("/proc/self/fd")) <= before
    parent.send(encode(Kill(), 9))
    decode(parent.recv(MAX_MESSAGE))
    thread.join(5)
    os.close(r)
    os.close(w)
    parent.close()
    child.close()
