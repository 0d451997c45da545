"""Guest memory: regions backed by file descriptors, mapped shared, every access checked.

A ``GuestMemory`` is built once from a region table and never changes; a new table means a
new object. The table is validated up front (non-empty, sorted by guest address, no overlap,
no zero-sized region), so lookups only have to find the one region that may hold an address.

Guest memory is guest-controlled data: only the jailed worker maps it. The parent may build
``MemoryRegion`` descriptions (they hold fds, not mappings).
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from device.errors import AddressOutOfRange, InvalidMemoryTable

SMALL_PAGE = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous range of guest-physical memory backed by ``fd`` at ``file_offset``.

    ``user_addr`` is where the VMM mapped the region in its own address space (vhost-user
    ring addresses are given in that space); it defaults to the guest address.
    ``page_size`` is the backing store's page size: 4 KiB for memfd/tmpfs, 2 MiB or 1 GiB
    for hugetlbfs. Pages are only ever released in whole backing pages.
    """

    guest_addr: int
    size: int
    fd: int
    file_offset: int = 0
    user_addr: int | None = None
    page_size: int = SMALL_PAGE

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @classmethod
    def from_fd(cls, fd: int, guest_addr: int, size: int, file_offset: int = 0,
                user_addr: int | None = None) -> "MemoryRegion":
        """Describe a region, reading the backing page size from the file system of ``fd``.

        Raises ``InvalidMemoryTable`` if ``fd`` is not a regular file (a memfd, a tmpfs or
        hugetlbfs file: a pipe, socket or directory cannot be guest memory, and is refused
        when it arrives rather than at activation), or a file shorter than the region:
        mapping past its end would SIGBUS whoever touches those pages.
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidMemoryTable(f"a memory region's fd must be a regular file (a memfd "
                                     f"or a tmpfs/hugetlbfs file), not a "
                                     f"{_file_kind(st.st_mode)}")
        if st.st_size < file_offset + size:
            raise InvalidMemoryTable(f"region of {size:#x} bytes at file offset {file_offset:#x} "
                                     f"runs past the end of its {st.st_size:#x}-byte file")
        page_size = max(SMALL_PAGE, os.fstatvfs(fd).f_bsize)
        return cls(guest_addr, size, fd, file_offset, user_addr, page_size)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def validate_regions(regions: list[MemoryRegion] | tuple[MemoryRegion, ...]) -> None:
    """Raise ``InvalidMemoryTable`` unless the table is non-empty, sorted and disjoint.

    Every region must be page aligned in guest address, size and file offset, because
    pages are released by guest page frame number.
    """
    if not regions:
        raise InvalidMemoryTable("the memory table is empty")
    previous_end = -1
    for region in regions:
        if region.size <= 0:
            raise InvalidMemoryTable(f"region at {region.guest_addr:#x} has size {region.size}")
        if region.guest_addr < 0 or region.file_offset < 0 or region.fd < 0:
            raise InvalidMemoryTable(f"region at {region.guest_addr:#x} has a negative field")
        if region.page_size < SMALL_PAGE or region.page_size & (region.page_size - 1):
            raise InvalidMemoryTable(f"page size {region.page_size} is not a power of two >= 4096")
        for name in ("guest_addr", "size", "file_offset"):
            if getattr(region, name) % SMALL_PAGE:
                raise InvalidMemoryTable(f"region {name} {getattr(region, name):#x} is not page aligned")
        if region.guest_addr < previous_end:
            raise InvalidMemoryTable(
                f"region at {region.guest_addr:#x} overlaps or precedes the one before it")
        previous_end = region.end


class GuestMemory:
    """Shared mappings of every region, with bounds-checked access by guest-physical address.

    Raises ``InvalidMemoryTable`` if the table is invalid or a region cannot be mapped, and
    ``AddressOutOfRange`` for any access that is not wholly inside one region.
    """

    def __init__(self, regions: list[MemoryRegion] | tuple[MemoryRegion, ...]) -> None:
        regions = tuple(regions)
        validate_regions(regions)
        self.regions = regions
        self._starts = [r.guest_addr for r in regions]
        self._maps: list[mmap.mmap] = []
        try:
            for region in regions:
                self._maps.append(mmap.mmap(region.fd, region.size, mmap.MAP_SHARED,
                                            mmap.PROT_READ | mmap.PROT_WRITE,
                                            offset=region.file_offset))
        except (OSError, ValueError) as exc:
            self.close()
            raise InvalidMemoryTable(f"cannot map guest memory: {exc}") from exc
        self._views = [memoryview(m) for m in self._maps]
        self._handed: list[memoryview] = []     # views given out, released on close

    @property
    def size(self) -> int:
        """Total bytes of guest memory over all regions."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical address."""
        return self.regions[-1].end

    def close(self) -> None:
        """Unmap every region. The fds in the table are not closed (the caller owns them).
        Every view given out is released first: using one afterwards raises ValueError."""
        for view in getattr(self, "_handed", []) + getattr(self, "_views", []):
            view.release()
        self._handed = []
        for m in self._maps:
            m.close()
        self._maps = []
        self._views = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def locate(self, addr: int, length: int) -> tuple[int, int]:
        """Return ``(region index, offset in region)`` for ``[addr, addr+length)``.

        Raises ``AddressOutOfRange`` unless the whole range lies in one region.
        ``length`` may be 0 (the address must still be inside a region).
        """
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            region = self.regions[i]
            offset = addr - region.guest_addr
            if offset + length <= region.size and (length > 0 or offset < region.size):
                return i, offset
        raise AddressOutOfRange(f"guest range {addr:#x}+{length:#x} is not inside guest memory")

    def view(self, addr: int, length: int) -> memoryview:
        """A writable memoryview of ``[addr, addr+length)``, bounds-checked once, for a
        structure read over and over (a virtqueue's rings); released by ``close()``."""
        i, offset = self.locate(addr, length)
        view = self._views[i][offset:offset + length]
        self._handed.append(view)
        return view

    def read(self, addr: int, length: int) -> bytes:
        i, offset = self.locate(addr, length)
        return self._maps[i][offset:offset + length]

    def write(self, addr: int, data: bytes) -> None:
        i, offset = self.locate(addr, len(data))
        self._maps[i][offset:offset + len(data)] = data

    def read_u16(self, addr: int) -> int:
        i, offset = self.locate(addr, 2)
        return _U16.unpack_from(self._maps[i], offset)[0]

    def write_u16(self, addr: int, value: int) -> None:
        i, offset = self.locate(addr, 2)
        _U16.pack_into(self._maps[i], offset, value)

    def read_u32(self, addr: int) -> int:
        i, offset = self.locate(addr, 4)
        return _U32.unpack_from(self._maps[i], offset)[0]

    def write_u32(self, addr: int, value: int) -> None:
        i, offset = self.locate(addr, 4)
        _U32.pack_into(self._maps[i], offset, value)

    def read_u64(self, addr: int) -> int:
        i, offset = self.locate(addr, 8)
        return _U64.unpack_from(self._maps[i], offset)[0]

    def unpack_from(self, fmt: struct.Struct, addr: int) -> tuple:
        """``fmt.unpack_from`` at a guest address, bounds-checked for ``fmt.size`` bytes."""
        i, offset = self.locate(addr, fmt.size)
        return fmt.unpack_from(self._maps[i], offset)

    def pack_into(self, fmt: struct.Struct, addr: int, *values: int) -> None:
        """``fmt.pack_into`` at a guest address, bounds-checked for ``fmt.size`` bytes."""
        i, offset = self.locate(addr, fmt.size)
        fmt.pack_into(self._maps[i], offset, *values)

    def remove(self, addr: int, length: int) -> None:
        """Give ``[addr, addr+length)`` back to the host: the backing pages are freed.

        Uses ``MADV_REMOVE`` on the shared mapping, which punches a hole in the backing file
        (the same as ``fallocate(PUNCH_HOLE|KEEP_SIZE)``). ``MADV_DONTNEED`` would only drop
        this process's page table entries and free nothing on shared memory. The range must
        be aligned to the region's page size; the caller guarantees it.
        """
        i, offset = self.locate(addr, length)
        self._maps[i].madvise(mmap.MADV_REMOVE, offset, length)

    def region_of(self, addr: int) -> MemoryRegion:
        return self.regions[self.locate(addr, 0)[0]]

    def user_to_guest(self, user_addr: int) -> int:
        return user_to_guest(self.regions, user_addr)


def user_to_guest(regions: tuple[MemoryRegion, ...] | list[MemoryRegion], user_addr: int) -> int:
    """Translate a VMM virtual address (as vhost-user rings are given) to guest-physical.

    Pure: needs the region table only, not a mapping. Raises ``AddressOutOfRange`` if no
    region covers it.
    """
    for region in regions:
        base = region.guest_addr if region.user_addr is None else region.user_addr
        if base <= user_addr < base + region.size:
            return region.guest_addr + (user_addr - base)
    raise AddressOutOfRange(f"VMM address {user_addr:#x} is not inside guest memory")
