"""A fake guest: the Linux ``virtio_balloon`` driver's side of the rings, in real memory.

Guest RAM is a real memfd mapped shared; the driver writes real descriptor tables, avail
rings and PFN arrays into it, kicks real eventfds and reads the used rings the device
wrote. It mirrors what ``drivers/virtio/virtio_balloon.c`` does: 256 PFNs per inflate
buffer in descending order, ``actual`` written after each buffer comes back, one stats
buffer cycling, free page reports as chains of device-writable 4 MiB descriptors.

Layout of guest-physical memory: the first ``RING_AREA`` bytes hold the rings, PFN arrays
and the stats buffer; every page above that is "guest RAM" the balloon may take.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from device.balloon import (DEFLATE_QUEUE, INFLATE_QUEUE, REPORTING_QUEUE, STATS_QUEUE,
                            VIRTIO_BALLOON_F_PAGE_POISON, QueueSpec, VIRTIO_F_EVENT_IDX)
from device.config import ACTUAL_OFFSET
from device.memory import MemoryRegion
from device.virtqueue import (DESC, VIRTQ_DESC_F_NEXT,
                              VIRTQ_DESC_F_WRITE, QueueConfig)

PAGE = 4096
MIB = 1 << 20


def linux_acks(offered: int, poisons: bool = False) -> int:
    """What Linux's driver accepts of ``offered``: PAGE_POISON only when the guest zeroes or
    poisons the pages it frees (virtballoon_validate clears it otherwise)."""
    return offered if poisons else offered & ~(1 << VIRTIO_BALLOON_F_PAGE_POISON)
RING_AREA = 4 * MIB
PFNS_PER_BUFFER = 256
QUEUE_SIZE = 128
QUEUE_STRIDE = 64 * 1024     # each queue's rings + scratch buffers live in 64 KiB
SCRATCH = 16 * 1024          # offset of the queue's scratch buffers inside its stride


class GuestRam:
    """A memfd of ``size`` bytes, mapped shared; host usage is its ``st_blocks``."""

    def __init__(self, size: int, name: str = "guest-ram", huge: bool = False) -> None:
        """``huge``: back it with 2 MiB hugetlbfs pages (the host must have them free)."""
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0))
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def populate(self) -> None:
        """Make the host back every page, as a guest that used all its RAM.

        The ring area keeps its contents (rewritten in place: that allocates its pages);
        the rest is filled with a pattern.
        """
        self.map[:RING_AREA] = self.map[:RING_AREA]
        chunk = b"\xa5" * MIB
        end = self.size
        for off in range(RING_AREA, end, MIB):
            n = min(MIB, end - off)
            self.map[off:off + n] = chunk[:n]

    def host_bytes(self) -> int:
        """Bytes of host memory backing the guest now."""
        return os.fstat(self.fd).st_blocks * 512

    def region(self) -> MemoryRegion:
        return MemoryRegion.from_fd(self.fd, 0, self.size)

    def close(self) -> None:
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class DriverQueue:
    """The driver's half of one split queue at ``base`` in guest memory."""

    ram: GuestRam
    base: int
    size: int = QUEUE_SIZE
    event_idx: bool = False
    kick_fd: int = -1
    call_fd: int = -1
    next_avail: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free = list(range(self.size))
        self.ram.map[self.base:self.base + SCRATCH] = bytes(SCRATCH)

    @property
    def desc(self) -> int:
        return self.base

    @property
    def avail(self) -> int:
        return self.base + 16 * self.size

    @property
    def used(self) -> int:
        return self.base + 8192

    @property
    def scratch(self) -> int:
        return self.base + SCRATCH

    def config(self) -> QueueConfig:
        return QueueConfig(self.size, self.desc, self.avail, self.used, self.event_idx)

    def spec(self) -> QueueSpec:
        return QueueSpec(self.config(), self.kick_fd, self.call_fd)

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int,
                   table: int | None = None) -> None:
        table = self.desc if table is None else table
        DESC.pack_into(self.ram.map, table + 16 * index, addr, length, flags, next_index)

    def add(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]] = ()) -> int:
        """Chain the buffers into free descriptors, publish the head; return the head."""
        parts = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        indices = [self.free.pop(0) for _ in parts]
        for k, (addr, length, flags) in enumerate(parts):
            last = k == len(parts) - 1
            self.write_desc(indices[k], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                            0 if last else indices[k + 1])
        self.publish(indices[0])
        self._chains = getattr(self, "_chains", {})
        self._chains[indices[0]] = indices
        return indices[0]

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and move avail.idx (what virtqueue_add does)."""
        struct.pack_into("<H", self.ram.map, self.avail + 4 + 2 * (self.next_avail % self.size), head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        struct.pack_into("<H", self.ram.map, self.avail + 2, self.next_avail)

    def set_avail_idx(self, value: int) -> None:
        struct.pack_into("<H", self.ram.map, self.avail + 2, value & 0xFFFF)

    def kick(self) -> None:
        os.write(self.kick_fd, (1).to_bytes(8, "little"))

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram.map, self.used + 2)[0]

    def take_used(self) -> list[tuple[int, int]]:
        """Collect used elements since last time, freeing their descriptors."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack_from("<II", self.ram.map, slot)
            out.append((head, length))
            for index in getattr(self, "_chains", {}).pop(head, [head]):
                self.free.append(index)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # used_event: interrupt me when the device moves past what I have seen.
            struct.pack_into("<H", self.ram.map, self.avail + 4 + 2 * self.size, self.last_used)
        return out

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class BalloonDriver:
    """The Linux balloon driver's behaviour over ``DriverQueue``s.

    ``service`` is called after every kick: for a device running in this thread it
    processes the kicked queue; for a device in another thread or process it is a no-op and
    the driver waits for the used ring with a deadline.
    ``write_config(offset, data)`` is how the driver writes ``actual``.
    """

    def __init__(self, ram: GuestRam, queue_names: tuple[str, ...], features: int,
                 write_config: Callable[[int, bytes], None],
                 service: Callable[[str], None] = lambda name: None,
                 timeout: float = 10.0) -> None:
        self.ram = ram
        self.features = features
        self.write_config = write_config
        self.service = service
        self.timeout = timeout
        event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.queues = {name: DriverQueue(ram, i * QUEUE_STRIDE, event_idx=event_idx)
                       for i, name in enumerate(queue_names)}
        self.balloon: list[int] = []          # PFNs in the balloon, in the order given
        self.next_free_pfn = ram.size // PAGE - 1
        self.returned: list[int] = []         # deflated PFNs, reused first (as a guest would)
        self.actual = 0

    def specs(self) -> list[QueueSpec]:
        return [q.spec() for q in self.queues.values()]

    def close(self) -> None:
        for q in self.queues.values():
            q.close()

    def kick(self, name: str) -> None:
        self.queues[name].kick()
        self.service(name)

    def wait_used(self, name: str, count: int) -> list[tuple[int, int]]:
        """Wait (with the driver's deadline) until ``count`` buffers came back on ``name``."""
        queue = self.queues[name]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.timeout
        while True:
            got += queue.take_used()
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: {len(got)} of {count} buffers came back")
            select.select([queue.call_fd], [], [], min(left, 0.05))
            try:
                os.read(queue.call_fd, 8)
            except BlockingIOError:
                pass

    # -- inflate / deflate -----------------------------------------------------------------

    def take_pages(self, count: int) -> list[int]:
        """Allocate ``count`` guest pages from the top down (descending PFNs, as Linux)."""
        reused = self.returned[:count]
        del self.returned[:count]
        fresh = count - len(reused)
        lowest = RING_AREA // PAGE
        if self.next_free_pfn - fresh + 1 < lowest:
            raise MemoryError("the fake guest has no more pages to give")
        pfns = reused + list(range(self.next_free_pfn, self.next_free_pfn - fresh, -1))
        self.next_free_pfn -= fresh
        return pfns

    def send_pfns(self, name: str, pfns: list[int], batch: int = 1) -> None:
        """Send ``pfns`` in 256-PFN buffers on ``name``, ``batch`` buffers in flight."""
        queue = self.queues[name]
        chunks = [pfns[i:i + PFNS_PER_BUFFER] for i in range(0, len(pfns), PFNS_PER_BUFFER)]
        for start in range(0, len(chunks), batch):
            group = chunks[start:start + batch]
            for k, chunk in enumerate(group):
                addr = queue.scratch + k * PFNS_PER_BUFFER * 4
                struct.pack_into(f"<{len(chunk)}I", self.ram.map, addr, *chunk)
                queue.add([(addr, 4 * len(chunk))])
            self.kick(name)
            self.wait_used(name, len(group))

    def inflate(self, pages: int, batch: int = 1) -> list[int]:
        pfns = self.take_pages(pages)
        self.send_pfns(INFLATE_QUEUE, pfns, batch)
        self.balloon += pfns
        self.set_actual(len(self.balloon))
        return pfns

    def deflate(self, pages: int, batch: int = 1) -> list[int]:
        pfns = self.balloon[-pages:] if pages else []
        self.send_pfns(DEFLATE_QUEUE, pfns, batch)
        del self.balloon[len(self.balloon) - len(pfns):]
        self.returned += pfns
        self.set_actual(len(self.balloon))
        return pfns

    def set_actual(self, pages: int) -> None:
        self.actual = pages
        self.write_config(ACTUAL_OFFSET, struct.pack("<I", pages))

    # -- stats -----------------------------------------------------------------------------

    def stats_buffer(self, values: dict[int, int]) -> tuple[int, int]:
        queue = self.queues[STATS_QUEUE]
        data = b"".join(struct.pack("<HQ", tag, value) for tag, value in values.items())
        self.ram.map[queue.scratch:queue.scratch + len(data)] = data
        return queue.scratch, len(data)

    def send_stats(self, values: dict[int, int]) -> None:
        """Put the (one) stats buffer on the stats queue, as the driver does at probe."""
        self.queues[STATS_QUEUE].add([self.stats_buffer(values)])
        self.kick(STATS_QUEUE)

    def refresh_stats(self, values: dict[int, int]) -> None:
        """Wait for the device to hand the stats buffer back, then refill and resend it."""
        self.wait_used(STATS_QUEUE, 1)
        self.send_stats(values)

    # -- free page reporting ---------------------------------------------------------------

    def report(self, ranges: list[tuple[int, int]]) -> None:
        """Report free ``(addr, length)`` ranges as one chain of writable descriptors."""
        self.queues[REPORTING_QUEUE].add([], ranges)
        self.kick(REPORTING_QUEUE)
        self.wait_used(REPORTING_QUEUE, 1)


def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll ``condition`` until it is truthy (returned) or ``timeout`` passes (raised)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        select.select([], [], [], 0.005)
