"""A split virtqueue (VIRTIO 1.x, section 2.7) over guest memory.

The queue does not own guest memory; it is given a ``GuestMemory`` and only ever touches it
through bounds-checked accessors. Everything the driver writes is untrusted:

- a descriptor chain is walked at most ``size`` steps (an indirect table at most its own
  length), so a loop ends in ``DescriptorLoop`` instead of spinning;
- every descriptor's buffer must lie inside guest memory;
- an avail index that moves by more than the queue size stops the queue (``AvailIndexJump``):
  nothing sensible can be done with it, and the other queues keep working.

A bad chain is reported as ``BadChain`` carrying its head index, so the caller can return the
buffer to the driver (with length 0) and keep serving the queue.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device.errors import (AvailIndexJump, DescriptorIndexOutOfRange,
                           DescriptorLoop, GuestError, InvalidIndirect, InvalidQueueConfig,
                           MisalignedAddress, NestedIndirect, ReadableAfterWritable)
from device.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class Descriptor:
    addr: int
    length: int


@dataclass(frozen=True)
class DescriptorChain:
    """A validated buffer: device-readable descriptors, then device-writable ones."""

    head: int
    readable: tuple[Descriptor, ...]
    writable: tuple[Descriptor, ...]

    @property
    def readable_length(self) -> int:
        return sum(d.length for d in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(d.length for d in self.writable)


class BadChain(GuestError):
    """The chain starting at ``head`` is malformed; ``cause`` says how.

    ``head`` is a valid descriptor index, so the buffer can be returned to the driver.
    """

    def __init__(self, head: int, cause: GuestError) -> None:
        super().__init__(f"descriptor chain at head {head}: {cause}")
        self.head = head
        self.cause = cause


@dataclass(frozen=True)
class QueueConfig:
    """Where a queue lives in guest memory (guest-physical addresses) and how it behaves."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool = False
    indirect: bool = True


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if moving the index from ``old`` to ``new`` crossed ``event`` (mod 2**16)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitQueue:
    """The device side of one split virtqueue.

    ``next_avail`` is the next avail ring slot to take and ``next_used`` the next used ring
    slot to fill (both free-running 16-bit counters). A fresh queue starts both at 0; a
    worker that replaces a dead one starts both at the used index in guest memory, so
    buffers taken but never returned are taken again.

    Raises ``InvalidQueueConfig`` for a bad size, ``MisalignedAddress`` or
    ``AddressOutOfRange`` if a ring is misaligned or not inside guest memory.
    """

    def __init__(self, memory: GuestMemory, config: QueueConfig,
                 next_avail: int = 0, next_used: int = 0) -> None:
        size = config.size
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise InvalidQueueConfig(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        for name, addr, align, length in (
                ("descriptor table", config.desc_addr, 16, 16 * size),
                ("avail ring", config.avail_addr, 2, 6 + 2 * size),
                ("used ring", config.used_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise MisalignedAddress(f"{name} at {addr:#x} is not {align}-byte aligned")
            memory.locate(addr, length)
        self.memory = memory
        self.config = config
        self.size = size
        # The rings, bounds-checked once: every buffer reads and writes them several times.
        self._desc = memory.view(config.desc_addr, 16 * size)
        self._avail = memory.view(config.avail_addr, 6 + 2 * size)
        self._used = memory.view(config.used_addr, 6 + 8 * size)
        self.next_avail = next_avail & 0xFFFF
        self.next_used = next_used & 0xFFFF
        self._signalled_used = self.next_used
        self.broken: GuestError | None = None

    @classmethod
    def resume(cls, memory: GuestMemory, config: QueueConfig) -> "SplitQueue":
        """A queue that continues where the guest sees it: at the used index in memory."""
        used_idx = memory.read_u16(config.used_addr + 2)
        return cls(memory, config, next_avail=used_idx, next_used=used_idx)

    # -- driver -> device ------------------------------------------------------------------

    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """How many buffers the driver has made available that we have not taken.

        Raises ``AvailIndexJump`` (and marks the queue broken) if that exceeds the size.
        """
        if self.broken is not None:
            raise self.broken
        pending = (self.avail_idx() - self.next_avail) & 0xFFFF
        if pending > self.size:
            self.broken = AvailIndexJump(
                f"avail index moved {pending} past {self.next_avail}, queue size {self.size}")
            raise self.broken
        return pending

    def pop(self) -> DescriptorChain | None:
        """Take the next available buffer, or return None if there is none.

        Raises ``BadChain`` for a malformed chain (already taken: return it with length 0),
        ``DescriptorIndexOutOfRange`` if the avail ring names a head outside the table (the
        slot is consumed; the head cannot be returned), and ``AvailIndexJump``.
        """
        if not self.pending():
            return None
        head = _U16.unpack_from(self._avail, 4 + 2 * (self.next_avail % self.size))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if head >= self.size:
            raise DescriptorIndexOutOfRange(f"avail ring names descriptor {head} >= {self.size}")
        try:
            return self._walk(head)
        except GuestError as exc:
            raise BadChain(head, exc) from exc

    def _walk(self, head: int) -> DescriptorChain:
        readable: list[Descriptor] = []
        writable: list[Descriptor] = []
        table, table_size = self.config.desc_addr, self.size
        index, ttl, indirect = head, self.size, False
        while True:
            if ttl == 0:
                raise DescriptorLoop(f"chain is longer than its table ({table_size})")
            ttl -= 1
            if indirect:
                addr, length, flags, next_index = self.memory.unpack_from(DESC, table + 16 * index)
            else:
                addr, length, flags, next_index = DESC.unpack_from(self._desc, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise NestedIndirect("indirect descriptor inside an indirect table")
                if not self.config.indirect:
                    raise InvalidIndirect("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16:
                    raise InvalidIndirect(f"indirect table of {length} bytes, flags {flags:#x}")
                if length // 16 > self.size:
                    # A chain may not be longer than the queue (VIRTIO 2.7.5.3.1); without
                    # this a guest could hand over a table of millions of descriptors.
                    raise InvalidIndirect(f"indirect table of {length // 16} descriptors "
                                          f"exceeds the queue size {self.size}")
                self.memory.locate(addr, length)
                table, table_size = addr, length // 16
                index, ttl, indirect = 0, table_size, True
                continue
            self.memory.locate(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(Descriptor(addr, length))
            elif writable:
                raise ReadableAfterWritable("device-readable descriptor after a writable one")
            else:
                readable.append(Descriptor(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            if next_index >= table_size:
                raise DescriptorIndexOutOfRange(f"next descriptor {next_index} >= {table_size}")
            index = next_index

    # -- device -> driver ------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return buffer ``head`` to the driver, ``length`` bytes written into it.

        The element is written before the index that publishes it.
        """
        USED_ELEM.pack_into(self._used, 4 + 8 * (self.next_used % self.size), head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.next_used)

    def needs_notification(self) -> bool:
        """Whether the driver asked to be told about the buffers used since the last call.

        With ``VIRTIO_F_EVENT_IDX`` this follows ``used_event``; without it the avail
        ring's NO_INTERRUPT flag. Calling it resets the "since" point.
        """
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old == new:
            return False
        if self.config.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> None:
        """Ask the driver to kick for the next buffer (writes avail_event with EVENT_IDX)."""
        if self.config.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.next_avail)
        else:
            _U16.pack_into(self._used, 0, 0)
