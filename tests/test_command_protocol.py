"""The worker command protocol: every message validated, nothing but our own error raised,
and a worker that gets garbage answers with an error and keeps serving."""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.command import (MAX_MESSAGE, Message, ProtocolError, decode, encode, event,
                            reply_error, request)
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
        encode(Message("log", 0, {"level": 20, "message": "x" * 5000}))


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
    for garbage in (b"\xc1", b"x" * (MAX_MESSAGE + 10), msgpack.packb([1, 2, 3]),
                    request("activate", 7, features=0, stats_interval=0.0,
                            regions=[{"guest_addr": 0, "size": 4096, "fd": 999,
                                      "file_offset": 0, "page_size": 4096}],
                            queues=[GOOD_QUEUE, GOOD_QUEUE])):
        parent.send(garbage)
        reply = decode(parent.recv(MAX_MESSAGE))
        assert reply.type == "reply" and reply.body["ok"] is False
    parent.send(event("log", level=20, message="not a request"))
    assert decode(parent.recv(MAX_MESSAGE)).body["ok"] is False
    parent.send(request("ping", 8))
    reply = decode(parent.recv(MAX_MESSAGE))
    assert (reply.id, reply.body["ok"]) == (8, True)
    parent.send(request("kill", 9))
    assert decode(parent.recv(MAX_MESSAGE)).body == {
        "ok": True, "result": {"active": False}}
    thread.join(5)
    assert not thread.is_alive()
    parent.close()
    child.close()


def test_encode_round_trips():
    for data in (request("stats", 3), reply_error(4, "no"), event("error", queue="inflate",
                                                                    message="bad")):
        assert encode(decode(data)) == data
