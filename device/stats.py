"""Memory statistics the guest reports on the stats queue (VIRTIO 1.2, 5.5.6.3).

A stats buffer is a packed array of ``{le16 tag; le64 val}``. Tags are known 0-15; unknown
tags are ignored, entries may come in any order, and a later entry for a tag wins.
Names follow Firecracker's balloon statistics API, which operators already know.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from device.errors import BadBufferLayout

STAT_ENTRY = struct.Struct("<HQ")
MAX_STATS_BUFFER = 4096  # 16 tags need 160 bytes; anything far larger is not a stats buffer

VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
VIRTIO_BALLOON_S_OOM_KILL = 10
VIRTIO_BALLOON_S_ALLOC_STALL = 11
VIRTIO_BALLOON_S_ASYNC_SCAN = 12
VIRTIO_BALLOON_S_DIRECT_SCAN = 13
VIRTIO_BALLOON_S_ASYNC_RECLAIM = 14
VIRTIO_BALLOON_S_DIRECT_RECLAIM = 15

STAT_NAMES: dict[int, str] = {
    VIRTIO_BALLOON_S_SWAP_IN: "swap_in",
    VIRTIO_BALLOON_S_SWAP_OUT: "swap_out",
    VIRTIO_BALLOON_S_MAJFLT: "major_faults",
    VIRTIO_BALLOON_S_MINFLT: "minor_faults",
    VIRTIO_BALLOON_S_MEMFREE: "free_memory",
    VIRTIO_BALLOON_S_MEMTOT: "total_memory",
    VIRTIO_BALLOON_S_AVAIL: "available_memory",
    VIRTIO_BALLOON_S_CACHES: "disk_caches",
    VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb_allocations",
    VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb_failures",
    VIRTIO_BALLOON_S_OOM_KILL: "oom_kill",
    VIRTIO_BALLOON_S_ALLOC_STALL: "alloc_stall",
    VIRTIO_BALLOON_S_ASYNC_SCAN: "async_scan",
    VIRTIO_BALLOON_S_DIRECT_SCAN: "direct_scan",
    VIRTIO_BALLOON_S_ASYNC_RECLAIM: "async_reclaim",
    VIRTIO_BALLOON_S_DIRECT_RECLAIM: "direct_reclaim",
}


def parse_stats(buffer: bytes) -> dict[str, int]:
    """Decode a stats buffer into ``{name: value}``, ignoring unknown tags.

    Raises ``BadBufferLayout`` if the length is not a whole number of entries or too large.
    """
    if len(buffer) % STAT_ENTRY.size or len(buffer) > MAX_STATS_BUFFER:
        raise BadBufferLayout(f"stats buffer of {len(buffer)} bytes is not a whole number "
                              f"of {STAT_ENTRY.size}-byte entries (or is too large)")
    values: dict[str, int] = {}
    for tag, value in STAT_ENTRY.iter_unpack(buffer):
        name = STAT_NAMES.get(tag)
        if name is not None:
            values[name] = value
    return values


@dataclass
class StatsSnapshot:
    """The latest statistics and the (monotonic and wall) time they arrived; None if never."""

    values: dict[str, int] = field(default_factory=dict)
    updated_monotonic: float | None = None
    updated_wall: float | None = None
