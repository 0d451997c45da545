"""The operator's control protocol framing: length-prefixed msgpack maps, sans-I/O.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map. A
length above ``MAX_FRAME`` is refused before anything is buffered, and msgpack's own
container limits stop a small frame that claims a huge array or map. ``FrameDecoder`` takes
bytes as they come and returns whole messages; it never holds more than one frame.

Requests: ``{"id": int, "cmd": str, ...arguments}``.
Replies:  ``{"id": int, "ok": true, ...result}`` or ``{"id": int, "ok": false, "error": str}``.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from control.errors import RequestError

MAX_FRAME = 64 * 1024
_LENGTH = struct.Struct(">I")


class FrameError(RequestError):
    """A frame that cannot be decoded: the connection it came on is closed."""


def encode_frame(message: dict[str, Any]) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise FrameError(f"message of {len(data)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


MAX_ERROR_TEXT = 1024


def encode_reply(message: dict[str, Any]) -> bytes:
    """Frame a reply; never raises: an over-long ``error`` (it may echo what the client sent)
    is cut, and a reply still too large becomes an error saying so."""
    error = message.get("error")
    if isinstance(error, str) and len(error) > MAX_ERROR_TEXT:
        message = {**message, "error": error[:MAX_ERROR_TEXT] + "..."}
    try:
        return encode_frame(message)
    except (FrameError, TypeError, ValueError, OverflowError) as exc:
        return encode_frame({"id": message.get("id"), "ok": False,
                             "error": f"the reply could not be sent: {str(exc)[:200]}"})


def decode_payload(data: bytes) -> dict[str, Any]:
    """One frame's payload -> a map; raises ``FrameError`` and nothing else."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME,
                                  max_str_len=MAX_FRAME, max_array_len=1024,
                                  max_map_len=256, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise FrameError(f"not a msgpack message: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError("a message must be a map")
    return message


class FrameDecoder:
    """Feed bytes, get messages. Bounded: at most one frame (``MAX_FRAME``) is buffered."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return every complete message. Raises ``FrameError`` (fatal)."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                self._buffer.clear()
                raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_LENGTH.size:end])
            del self._buffer[:end]
            messages.append(decode_payload(payload))
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held now."""
        return len(self._buffer)
