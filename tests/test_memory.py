"""Guest memory: the region table is validated once; every access is bounds-checked."""

from __future__ import annotations

import pytest

from device.errors import AddressOutOfRange, InvalidMemoryTable
from device.memory import GuestMemory, MemoryRegion
from tests.driver import MIB


@pytest.mark.parametrize("regions", [
    [],
    [(2 * MIB, MIB), (0, MIB)],              # unsorted
    [(0, 2 * MIB), (MIB, MIB)],              # overlapping
    [(0, 0)],                                # empty region
    [(100, MIB)],                            # not page aligned
])
def test_bad_region_tables_are_refused(ram, regions):
    with pytest.raises(InvalidMemoryTable):
        GuestMemory([MemoryRegion(a, n, ram.fd, file_offset=a) for a, n in regions])


def test_unmappable_region_is_refused_cleanly(ram):
    with pytest.raises(InvalidMemoryTable):
        GuestMemory([MemoryRegion(0, MIB, 987654)])


def test_two_regions_translate_and_bound_every_access(ram):
    regions = [MemoryRegion(0, MIB, ram.fd, 0, user_addr=0x7000_0000),
               MemoryRegion(4 * MIB, MIB, ram.fd, MIB, user_addr=0x9000_0000)]
    with GuestMemory(regions) as memory:
        memory.write_u32(4 * MIB + 8, 0xDEADBEEF)
        assert ram.map[MIB + 8:MIB + 12] == bytes.fromhex("efbeadde")
        assert memory.user_to_guest(0x9000_0010) == 4 * MIB + 0x10
        for addr, length in [(MIB - 2, 4), (2 * MIB, 1), (5 * MIB, 1), (-1, 1), (0, -1)]:
            with pytest.raises(AddressOutOfRange):
                memory.read(addr, length)
        with pytest.raises(AddressOutOfRange):
            memory.user_to_guest(0x8000_0000)


def test_region_longer_than_its_file_is_refused(ram):
    with pytest.raises(InvalidMemoryTable, match="past the end"):
        MemoryRegion.from_fd(ram.fd, 0, ram.size + 4096)
    with pytest.raises(InvalidMemoryTable, match="past the end"):
        MemoryRegion.from_fd(ram.fd, 0, ram.size, file_offset=4096)
    assert MemoryRegion.from_fd(ram.fd, 0, ram.size).size == ram.size
