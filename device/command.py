"""The command protocol between the parent (proxy) and the jailed worker: msgpack, sans-I/O.

One message is one msgpack map in one SOCK_SEQPACKET datagram of at most ``MAX_MESSAGE``
bytes. Every message carries the protocol version ``v``, a ``type`` and a request ``id``:

    parent -> worker requests      activate, kill, ring_bases, stats, state, ping
    worker -> parent replies       reply  {id, ok: true, ...} | {id, ok: false, error: "..."}
    worker -> parent events (id 0) stats_event, counters, log, error

``ring_bases`` is sent to a fresh worker to read where each ring stands (its used index in
guest memory) when the serving one could not say; the worker answers and ends. Config space
is the parent's alone: the worker needs none of it.

``decode`` validates every field against the schema below (type, range, size) and raises
``ProtocolError`` for anything else; the caller answers a bad request with an error reply
and changes nothing. ``encode`` refuses to send what ``decode`` would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from device.errors import DeviceError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_ID = 2**53
U16, U32, U64 = 0xFFFF, 0xFFFF_FFFF, 2**64 - 1
MAX_FD = 1 << 20
MAX_TEXT = 4096


class ProtocolError(DeviceError):
    """A command message that cannot be decoded or does not match the schema."""


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    low: int | float | None = None
    high: int | float | None = None
    optional: bool = False
    items: "dict[str, Field] | Field | None" = None
    max_items: int = 64


def _int(low: int, high: int, optional: bool = False) -> Field:
    return Field(int, low, high, optional)


_REGION = {"guest_addr": _int(0, U64), "size": _int(1, U64), "fd": _int(0, MAX_FD),
           "file_offset": _int(0, U64), "user_addr": _int(0, U64, optional=True),
           "page_size": _int(4096, 1 << 30)}
_QUEUE = {"size": _int(1, 32768), "desc": _int(0, U64), "avail": _int(0, U64),
          "used": _int(0, U64), "event_idx": Field(bool), "indirect": Field(bool),
          "kick_fd": _int(0, MAX_FD), "call_fd": _int(0, MAX_FD),
          "next_avail": _int(0, U16, optional=True)}
_STATS = Field(dict, items=_int(0, U64), max_items=16)
_TEXT = Field(str, 0, MAX_TEXT)

SCHEMAS: dict[str, dict[str, Field]] = {
    # requests
    "activate": {"features": _int(0, U64), "stats_interval": Field((int, float), 0, 86400),
                 "regions": Field(list, 1, 8, items=Field(dict, items=_REGION)),
                 "queues": Field(list, 1, 5, items=Field(dict, items=_QUEUE))},
    "kill": {},
    "ring_bases": {"features": _int(0, U64),
                   "regions": Field(list, 1, 8, items=Field(dict, items=_REGION)),
                   "queues": Field(list, 1, 5, items=Field(dict, items={"used": _int(0, U64)}))},
    "stats": {},
    "state": {},
    "ping": {},
    # replies: the payload depends on the request; each value is checked by ``_check_any``
    "reply": {"ok": Field(bool), "error": Field(str, 0, MAX_TEXT, optional=True),
              "result": Field(dict, optional=True)},
    # events
    "stats_event": {"values": _STATS, "updated": Field(float, 0, None)},
    "counters": {"values": Field(dict, items=_int(0, U64), max_items=32)},
    "log": {"level": _int(0, 100), "message": _TEXT},
    "error": {"queue": Field(str, 0, 32), "message": _TEXT},
}
REQUESTS = frozenset({"activate", "kill", "ring_bases", "stats", "state", "ping"})
EVENTS = frozenset({"stats_event", "counters", "log", "error"})


@dataclass(frozen=True)
class Message:
    type: str
    id: int
    body: dict[str, Any]


def encode(message: Message) -> bytes:
    """Serialise ``message``; raises ``ProtocolError`` if it would not decode."""
    wire = {"v": PROTOCOL_VERSION, "type": message.type, "id": message.id, **message.body}
    data = msgpack.packb(wire, use_bin_type=True)
    decode(data)
    return data


def decode(data: bytes) -> Message:
    """Parse and validate one datagram; raises ``ProtocolError`` and nothing else."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        wire = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_TEXT,
                               max_bin_len=0, max_array_len=256, max_map_len=64,
                               max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise ProtocolError(f"not a msgpack message: {exc}") from exc
    if not isinstance(wire, dict):
        raise ProtocolError("a message must be a map")
    version = wire.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    kind = wire.pop("type", None)
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    ident = wire.pop("id", None)
    if type(ident) is not int or not 0 <= ident < MAX_ID:
        raise ProtocolError(f"bad request id {ident!r}")
    _check_map(kind, wire, SCHEMAS[kind])
    return Message(kind, ident, wire)


def _check_map(where: str, value: dict, schema: dict[str, Field]) -> None:
    unknown = set(value) - set(schema)
    if unknown:
        raise ProtocolError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    for name, field in schema.items():
        if name not in value or value[name] is None:
            if not field.optional:
                raise ProtocolError(f"{where}: missing field {name!r}")
            continue
        _check(f"{where}.{name}", value[name], field)


def _check(where: str, value: Any, field: Field) -> None:
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    # bool is an int in Python; an int field must not accept True.
    if not any(type(value) is k for k in kinds):
        raise ProtocolError(f"{where}: expected {'/'.join(k.__name__ for k in kinds)}, "
                            f"got {type(value).__name__}")
    size = len(value) if isinstance(value, (str, list, dict)) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool) or \
            isinstance(value, (str, list)):
        if field.low is not None and size < field.low or \
                field.high is not None and size > field.high:
            raise ProtocolError(f"{where}: {size} is outside {field.low}..{field.high}")
    if isinstance(value, list) and isinstance(field.items, Field):
        for i, item in enumerate(value):
            _check(f"{where}[{i}]", item, field.items)
    elif isinstance(value, dict):
        if len(value) > field.max_items:
            raise ProtocolError(f"{where}: more than {field.max_items} entries")
        if isinstance(field.items, dict):
            _check_map(where, value, field.items)
        elif isinstance(field.items, Field):
            for key, item in value.items():
                _check(f"{where}[{key!r}]", key, Field(str, 0, 64))
                _check(f"{where}[{key!r}]", item, field.items)
        else:
            _check_any(where, value, depth=0)


def _check_any(where: str, value: Any, depth: int) -> None:
    """Reply results are free-form plain data: bounded depth, no exotic types."""
    if depth > 4:
        raise ProtocolError(f"{where}: nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where}: non-string key")
            _check_any(f"{where}.{key}", item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_any(where, item, depth + 1)
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ProtocolError(f"{where}: {type(value).__name__} is not plain data")


def request(kind: str, ident: int, **body: Any) -> bytes:
    return encode(Message(kind, ident, body))


def reply_ok(ident: int, result: dict | None = None) -> bytes:
    body: dict[str, Any] = {"ok": True}
    if result is not None:
        body["result"] = result
    return encode(Message("reply", ident, body))


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (msgpack's limits count bytes)."""
    return text.encode()[:limit].decode(errors="ignore")


def reply_error(ident: int, error: str) -> bytes:
    return encode(Message("reply", ident, {"ok": False, "error": clip(error)}))


def event(kind: str, **body: Any) -> bytes:
    return encode(Message(kind, 0, body))
