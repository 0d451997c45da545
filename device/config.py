"""The balloon's configuration space (VIRTIO 1.2, 5.5.4), all fields little-endian le32.

    offset 0  num_pages               device writes (the target), driver reads
    offset 4  actual                  driver writes (pages in the balloon now)
    offset 8  free_page_hint_cmd_id   device writes, driver reads
    offset 12 poison_val              driver writes (with VIRTIO_BALLOON_F_PAGE_POISON)

A driver write may cover any span inside config space: only the bytes of fields the driver
may write (``actual``; ``poison_val`` with PAGE_POISON) are applied, and the bytes of
read-only fields are ignored whatever they hold. QEMU's generic vhost-user device forwards
each driver write as a write of the whole space, carrying its cached (possibly stale) copy
of ``num_pages``; User-Mode Linux writes ``actual`` alone. A span that leaves config space
is refused whole and changes nothing. Reads past the end return nothing; a read that
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
        """Apply the bytes of ``data`` that fall on driver-writable fields; ignore the rest.

        Writable: ``actual``, and ``poison_val`` when ``poison_writable``. Raises
        ``ConfigAccessError`` (changing nothing) for an empty span or one that leaves config
        space.
        """
        if offset == ACTUAL_OFFSET and len(data) == 4:
            self.actual = int.from_bytes(data, "little")   # what Linux writes, once per MiB
            return
        if offset < 0 or not data or offset + len(data) > CONFIG_SIZE:
            raise ConfigAccessError(f"config write at {offset} of {len(data)} bytes is outside "
                                    f"the {CONFIG_SIZE}-byte config space")
        writable = [ACTUAL_OFFSET] + ([POISON_VAL_OFFSET] if poison_writable else [])
        space = bytearray(self.pack())
        for start in writable:
            lo, hi = max(offset, start), min(offset + len(data), start + 4)
            if lo < hi:
                space[lo:hi] = data[lo - offset:hi - offset]
        _, self.actual, _, self.poison_val = _LAYOUT.unpack(space)
