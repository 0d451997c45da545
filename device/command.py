"""The command protocol between the parent and the jailed worker: typed messages, msgpack,
sans-I/O.

Every message is a frozen dataclass below; its fields, their types and the bounds in their
metadata are the whole schema, and one encoder/decoder (``encode``/``decode``) is derived
from them. On the wire a message is one msgpack map in one SOCK_SEQPACKET datagram of at
most ``MAX_MESSAGE`` bytes: ``{"v": 1, "type": TYPE, "id": int, **fields}``.

    parent -> worker requests      Activate, Kill, RingBases, SetCallFd (+1 fd), RequestStats,
                                   GetState, Ping
    worker -> parent replies       Reply(ok, error, result) with the request's id
    worker -> parent events (id 0) StatsEvent, CountersEvent, LogEvent, ErrorEvent

``RingBases`` is sent to a fresh worker to read where each ring stands (its used index in
guest memory) when the serving one could not say; the worker answers and ends. Config space
is the parent's alone: the worker needs none of it.

``decode`` checks every field against its type and bounds and raises ``ProtocolError`` for
anything else (never another exception); ``encode`` refuses to send what ``decode`` would
refuse. Adding a field is adding it to its dataclass (with bounds) and using it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


def bounds(low: float | None = None, high: float | None = None, *, items: tuple | None = None,
           default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field's bounds: a number's value, a string's or a list's length, a map's entry
    count; ``items`` bounds a map's integer values."""
    metadata = {"low": low, "high": high, "items": items}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Message:
    """Base of every message; ``TYPE`` is its name on the wire."""

    TYPE: ClassVar[str] = ""


# -- parts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegionSpec:
    guest_addr: int = bounds(0, U64)
    size: int = bounds(1, U64)
    fd: int = bounds(0, MAX_FD)
    file_offset: int = bounds(0, U64)
    user_addr: int | None = bounds(0, U64)
    page_size: int = bounds(4096, 1 << 30)


@dataclass(frozen=True)
class RingSpec:
    size: int = bounds(1, 32768)
    desc: int = bounds(0, U64)
    avail: int = bounds(0, U64)
    used: int = bounds(0, U64)
    event_idx: bool = bounds()
    indirect: bool = bounds()
    kick_fd: int = bounds(0, MAX_FD)
    call_fd: int = bounds(0, MAX_FD)
    next_avail: int | None = bounds(0, U16)     # None: resume at the used index in memory


@dataclass(frozen=True)
class PartialPage:
    """Small pages of one huge page already in the balloon (hugetlbfs), as a hex bitmap."""

    addr: int = bounds(0, U64)
    bits: str = bounds(1, MAX_TEXT)


@dataclass(frozen=True)
class UsedRing:
    used: int = bounds(0, U64)


# -- requests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Activate(Message):
    TYPE: ClassVar[str] = "activate"
    features: int = bounds(0, U64)
    stats_interval: float = bounds(0, 86400)
    regions: list[RegionSpec] = bounds(1, 8)
    queues: list[RingSpec] = bounds(1, 5)
    # The previous worker's partial huge pages, when the same driver carries on (fd swaps,
    # a new memory table); never after the driver may have gone away.
    partial_pages: list[PartialPage] = bounds(0, 64, default_factory=list)
    # What the driver wrote to poison_val (PAGE_POISON), None if nothing yet.
    poison_val: int | None = bounds(0, U32, default=None)


@dataclass(frozen=True)
class Kill(Message):
    TYPE: ClassVar[str] = "kill"


@dataclass(frozen=True)
class RingBases(Message):
    TYPE: ClassVar[str] = "ring_bases"
    features: int = bounds(0, U64)
    regions: list[RegionSpec] = bounds(1, 8)
    queues: list[UsedRing] = bounds(1, 5)


@dataclass(frozen=True)
class SetCallFd(Message):
    """Signal ``queue``'s used buffers on the fd that comes with this message (SCM_RIGHTS)
    from now on: the VMM swapped it (QEMU does at every start), no restart needed."""

    TYPE: ClassVar[str] = "set_call_fd"
    queue: str = bounds(1, 32)


@dataclass(frozen=True)
class SetPoison(Message):
    """The driver wrote ``poison_val`` (PAGE_POISON): free page reports are released only
    when it is 0 (``device.balloon.reports_may_release``)."""

    TYPE: ClassVar[str] = "set_poison"
    poison_val: int = bounds(0, U32)


@dataclass(frozen=True)
class RequestStats(Message):
    TYPE: ClassVar[str] = "stats"


@dataclass(frozen=True)
class GetState(Message):
    TYPE: ClassVar[str] = "state"


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


# -- replies and events ----------------------------------------------------------------------

@dataclass(frozen=True)
class Reply(Message):
    """``result`` is plain data whose shape depends on the request (see the worker)."""

    TYPE: ClassVar[str] = "reply"
    ok: bool = bounds()
    error: str | None = bounds(0, MAX_TEXT, default=None)
    result: dict | None = bounds(default=None)


@dataclass(frozen=True)
class StatsEvent(Message):
    TYPE: ClassVar[str] = "stats_event"
    values: dict[str, int] = bounds(0, 16, items=(0, U64))
    updated: float = bounds(0, None)


@dataclass(frozen=True)
class CountersEvent(Message):
    TYPE: ClassVar[str] = "counters"
    values: dict[str, int] = bounds(0, 32, items=(0, U64))


@dataclass(frozen=True)
class LogEvent(Message):
    TYPE: ClassVar[str] = "log"
    level: int = bounds(0, 100)
    message: str = bounds(0, MAX_TEXT)


@dataclass(frozen=True)
class ErrorEvent(Message):
    TYPE: ClassVar[str] = "error"
    queue: str = bounds(0, 32)
    message: str = bounds(0, MAX_TEXT)


MESSAGES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    Activate, Kill, RingBases, SetCallFd, SetPoison, RequestStats, GetState, Ping,
    Reply, StatsEvent, CountersEvent, LogEvent, ErrorEvent)}
REQUESTS = frozenset({Activate, Kill, RingBases, SetCallFd, SetPoison, RequestStats, GetState,
                      Ping})
FD_MESSAGES = frozenset({SetCallFd})       # the only message that may carry an fd
# Requests without fields, by wire name: what a caller can ask for by name alone.
SIMPLE_REQUESTS: dict[str, type[Message]] = {cls.TYPE: cls for cls in (Kill, RequestStats,
                                                                        GetState, Ping)}


@dataclass(frozen=True)
class Envelope:
    """A decoded datagram: the request id (0 for events) and the message."""

    id: int
    message: Message


# -- the codec -----------------------------------------------------------------------------

def encode(message: Message, ident: int = 0) -> bytes:
    """Serialise ``message``; raises ``ProtocolError`` if it would not decode."""
    wire = {"v": PROTOCOL_VERSION, "type": message.TYPE, "id": ident, **_to_wire(message)}
    try:
        data = msgpack.packb(wire, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode {message.TYPE}: {exc}") from exc
    decode(data)
    return data


def decode(data: bytes) -> Envelope:
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
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    ident = wire.pop("id", None)
    if type(ident) is not int or not 0 <= ident < MAX_ID:
        raise ProtocolError(f"bad request id {ident!r}")
    return Envelope(ident, _from_wire(cls, wire, kind))


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_wire(item) for item in value]
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> tuple[tuple[str, Any, dict, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], dict(f.metadata),
                  f.default_factory if f.default_factory is not dataclasses.MISSING
                  else (lambda d=f.default: d) if f.default is not dataclasses.MISSING
                  else None)
                 for f in dataclasses.fields(cls))


def _from_wire(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a map")
    schema = _hints(cls)
    unknown = set(value) - {name for name, _, _, _ in schema}
    if unknown:
        raise ProtocolError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    kwargs = {}
    for name, hint, metadata, default in schema:
        if name not in value and default is not None:
            kwargs[name] = default()
            continue
        kwargs[name] = _check(f"{where}.{name}", value.get(name), hint, metadata)
    return cls(**kwargs)


def _check(where: str, value: Any, hint: Any, metadata: dict) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if value is None:
        raise ProtocolError(f"{where}: missing")
    low, high = metadata.get("low"), metadata.get("high")
    origin = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(hint):
        return _from_wire(hint, value, where)
    if hint is bool:
        if type(value) is not bool:
            raise ProtocolError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is int or hint is float:
        # bool is an int in Python; a number field must not accept True.
        kinds = (int,) if hint is int else (int, float)
        if type(value) not in kinds:
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        _within(where, value, low, high)
        return float(value) if hint is float else value
    if hint is str:
        if type(value) is not str:
            raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
        _within(where, len(value), low, high)
        return value
    if origin is list:
        if type(value) is not list:
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        _within(where, len(value), low, high)
        return [_check(f"{where}[{i}]", item, args[0], {}) for i, item in enumerate(value)]
    if origin is dict and args:
        if type(value) is not dict:
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        _within(where, len(value), low, high)
        item_low, item_high = metadata.get("items") or (None, None)
        for key, item in value.items():
            if type(key) is not str or len(key) > 64:
                raise ProtocolError(f"{where}: bad key {str(key)[:64]!r}")
            _check(f"{where}[{key!r}]", item, args[1], {"low": item_low, "high": item_high})
        return dict(value)
    if origin is dict:
        if type(value) is not dict:
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        _check_any(where, value, depth=0)
        return value
    raise ProtocolError(f"{where}: no rule for {hint!r}")      # a schema bug, caught in tests


def _within(where: str, size: float, low: float | None, high: float | None) -> None:
    if low is not None and size < low or high is not None and size > high:
        raise ProtocolError(f"{where}: {size} is outside {low}..{high}")


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


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (msgpack's limits count bytes)."""
    return text.encode()[:limit].decode(errors="ignore")


def reply_ok(ident: int, result: dict | None = None) -> bytes:
    return encode(Reply(ok=True, result=result), ident)


def reply_error(ident: int, error: str) -> bytes:
    return encode(Reply(ok=False, error=clip(error)), ident)
