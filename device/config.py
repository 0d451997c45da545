"""The balloon's configuration space (VIRTIO 1.2, 5.5.4), all fields little-endian le32.

    offset 0  num_pages               device writes (the target), driver reads
    offset 4  actual                  driver writes (pages in the balloon now)
    offset 8  free_page_hint_cmd_id   device writes, driver reads
    offset 12 poison_val              driver writes (with VIRTIO_BALLOON_F_PAGE_POISON)

A driver write must cover whole writable fields and nothing else; anything else is refused
whole, so a write is all-or-nothing. Reads past the end return nothing; a read that
starts inside and runs past the end is cut at the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device.errors import ConfigAccessError

CONFIG_SIZE = 16
NUM_PAGES_OFFSET = 0
ACTUAL_OFFSET = 4
FREE_PAGE_HINT_CMD_ID_OFFSET = 8
POISON_VAL_OFFSET = 12
_LAYOUT = struct.Struct("<IIII")
U32_MAX = 0xFFFF_FFFF


@dataclass
class BalloonConfig:
    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def pack(self) -> bytes:
        return _LAYOUT.pack(self.num_pages, self.actual, self.free_page_hint_cmd_id,
                            self.poison_val)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of config space, cut at its end."""
        if offset < 0 or length < 0:
            raise ConfigAccessError(f"config read at {offset} of {length} bytes")
        return self.pack()[offset:offset + length]

    def write(self, offset: int, data: bytes, poison_writable: bool = False) -> None:
        """Apply a driver write of whole writable le32 fields, or raise and change nothing.

        Writable: ``actual``, and ``poison_val`` when ``poison_writable``.
        Raises ``ConfigAccessError`` for any other offset or length.
        """
        writable = {ACTUAL_OFFSET} | ({POISON_VAL_OFFSET} if poison_writable else set())
        if offset < 0 or offset % 4 or not data or len(data) % 4 \
                or offset + len(data) > CONFIG_SIZE:
            raise ConfigAccessError(f"config write at {offset} of {len(data)} bytes")
        fields = range(offset, offset + len(data), 4)
        if any(f not in writable for f in fields):
            raise ConfigAccessError(f"config write at {offset} of {len(data)} bytes touches "
                                    f"a field the driver may not write")
        for f in fields:
            value = struct.unpack_from("<I", data, f - offset)[0]
            if f == ACTUAL_OFFSET:
                self.actual = value
            else:
                self.poison_val = value
